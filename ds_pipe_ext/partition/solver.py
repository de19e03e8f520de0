"""The exact min-max solver: cut a list of layer costs into contiguous stages whose slowest stage is fastest.

DeepSpeed's ``partition_balanced`` minimises the spread between the slowest and the fastest stage, which can leave
the slowest stage slower than necessary: weights [7, 1, 9, 5, 16, 2] into 4 stages get a slowest stage of 18 there,
16 here. Boundaries are ``[0, b1, ..., n]``: stage ``s`` runs layers ``b[s]`` to ``b[s+1]-1``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "StageCost",
    "balance",
    "check_boundaries",
    "check_stage_count",
    "fastest_split_within",
    "min_max_split",
]

StageCost = Callable[[int, int, int], Any]


def balance(weights: Sequence[float], num_stages: int, *, cut_costs: Sequence[float] | None = None) -> list[int]:
    """Boundaries ``[0, ..., n]`` of the split of ``weights`` into ``num_stages`` contiguous, non-empty stages whose
    largest stage sum is as small as possible.

    Exact: the weights are turned into integers without rounding (every float is a fraction with a power-of-two
    denominator), so equal stage sums are really equal. Ties go to the lexicographically largest boundaries, i.e.
    each stage takes as many layers as the optimum allows: layers that cost nothing (activations, pooling,
    reshapes under ``flops`` or ``type:``) stay with the layer before them instead of starting the next stage.

    ``cut_costs[i]`` (optional) is what a cut after layer ``i`` costs each of the two stages it separates (sending or
    receiving layer ``i``'s output and its gradient). Unlike a weight, it counts only where a stage really starts
    or ends, so a cut after a layer with a small output is cheaper than one after a large output.

    Binary search on the answer, exact on integers: whether every stage can keep within a bound is a greedy walk
    (K binary searches over the prefix sums) without cut costs, so 2000 layers into 64 stages take milliseconds;
    with cut costs a stage's cost is not monotone in its length, and one pass over the layers per stage decides it.
    """
    n = len(weights)
    check_stage_count(num_stages, n)
    if cut_costs is not None and len(cut_costs) != n:
        raise ValueError(f"cut_costs has {len(cut_costs)} entries, weights {n}: give one per layer")
    exact = _exact_integers([*weights, *(cut_costs or [])])
    prefix = [0]
    for w in exact[:n]:
        prefix.append(prefix[-1] + w)
    cut = exact[n:] or [0] * n
    enter = [0] + [cut[i - 1] for i in range(1, n)]  # what a stage starting at layer i pays for its input
    leave = [0] + [cut[i - 1] for i in range(1, n)] + [0]  # what a stage ending before layer i pays for its output

    def feasible(bound: int) -> bool:
        if any(cut):
            return _ends_within(prefix, enter, leave, num_stages, bound)[num_stages][n]
        return _fewest_stages(prefix, bound, num_stages) <= num_stages  # splitting a stage never costs more

    low, high = max(exact[:n]), prefix[n] + 2 * max(cut)
    while low < high:  # the smallest bound every stage can keep to
        middle = (low + high) // 2
        if feasible(middle):
            high = middle
        else:
            low = middle + 1
    return _largest_boundaries(prefix, enter, leave, num_stages, low)


def _fewest_stages(prefix: list[int], bound: int, give_up_after: int) -> int:
    """How many stages of at most ``bound`` the greedy walk needs (each stage takes all the layers it can), or
    ``give_up_after + 1`` once it needs more."""
    n, start, stages = len(prefix) - 1, 0, 0
    while start < n and stages <= give_up_after:
        stop = bisect.bisect_right(prefix, prefix[start] + bound, lo=start + 1) - 1
        if stop == start:
            return give_up_after + 1  # one layer alone is over the bound
        start, stages = stop, stages + 1
    return stages if start == n else give_up_after + 1


def _ends_within(
    prefix: list[int], enter: list[int], leave: list[int], num_stages: int, bound: int
) -> list[list[bool]]:
    """``ends[s][i]``: layers ``0..i-1`` split into ``s`` non-empty stages each costing at most ``bound``.

    A stage from ``a`` to ``b`` costs ``prefix[b] - prefix[a] + enter[a] + leave[b]``; ``b`` can end stage ``s`` if
    some ``a`` that ends stage ``s - 1`` has ``enter[a] - prefix[a]`` at most ``bound - leave[b] - prefix[b]``,
    so a running minimum over ``a`` decides each ``b`` in one pass.
    """
    n = len(prefix) - 1
    ends = [[False] * (n + 1) for _ in range(num_stages + 1)]
    ends[0][0] = True
    for stage in range(1, num_stages + 1):
        previous, current = ends[stage - 1], ends[stage]
        best = math.inf
        for b in range(stage, n + 1):
            a = b - 1
            if previous[a]:
                best = min(best, enter[a] - prefix[a])
            current[b] = best <= bound - leave[b] - prefix[b]
    return ends


def _largest_boundaries(
    prefix: list[int], enter: list[int], leave: list[int], num_stages: int, bound: int
) -> list[int]:
    """Among the splits whose stages all cost at most ``bound``, the lexicographically largest boundaries: each
    stage, in order, ends as late as a split of the rest into the remaining stages allows."""
    n = len(prefix) - 1
    # starts[j][a]: layers a..n-1 split into j non-empty stages within the bound (the mirror of _ends_within)
    starts = [[False] * (n + 1) for _ in range(num_stages + 1)]
    starts[0][n] = True
    for stages in range(1, num_stages + 1):
        previous, current = starts[stages - 1], starts[stages]
        best = math.inf
        for a in range(n - stages, -1, -1):
            b = a + 1
            if previous[b]:
                best = min(best, prefix[b] + leave[b])
            current[a] = best <= bound - enter[a] + prefix[a]
    boundaries = [0]
    for stage in range(num_stages):
        a, rest = boundaries[-1], num_stages - 1 - stage
        boundaries.append(
            next(
                b
                for b in range(n - rest, a, -1)
                if starts[rest][b] and prefix[b] - prefix[a] + enter[a] + leave[b] <= bound
            )
        )
    return boundaries


def min_max_split(num_items: int, num_stages: int, stage_cost: StageCost) -> tuple[Any, list[int]]:
    """The largest stage cost and the boundaries that minimise it, for any ``stage_cost(stage, start, stop)``.

    Dynamic programming over suffixes, O(num_stages x num_items^2) calls of ``stage_cost``; among optimal splits the
    lexicographically largest boundaries. ``math.inf`` marks a stage that is not allowed; if no split avoids one,
    the result is ``(math.inf, [])``. Give exact numbers (integers, fractions) for exact ties. For costs that are
    sums of per-layer weights, :func:`balance` is much faster.
    """
    n, k = num_items, num_stages
    # best[s][i]: the smallest possible largest cost of stages s..k-1 over items i..n-1, each stage non-empty
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    best[k][n] = 0
    for s in range(k - 1, -1, -1):
        last_stop = n - (k - 1 - s)
        for start in range(s, last_stop):
            for stop in range(start + 1, last_stop + 1):
                rest = best[s + 1][stop]
                if rest < best[s][start]:
                    best[s][start] = min(best[s][start], max(stage_cost(s, start, stop), rest))
    optimum = best[0][0]
    if optimum == math.inf:
        return math.inf, []
    boundaries = [0]
    for s in range(k):
        start = boundaries[-1]
        stop = next(
            stop
            for stop in range(n - (k - 1 - s), start, -1)
            if best[s + 1][stop] <= optimum and stage_cost(s, start, stop) <= optimum
        )
        boundaries.append(stop)
    return optimum, boundaries


def fastest_split_within(
    num_items: int,
    num_stages: int,
    stage_time: StageCost,
    stage_memory: StageCost,
    budget: float,
    fastest: Sequence[int] | None = None,
) -> list[int]:
    """Among the splits whose every stage's ``stage_memory`` is within ``budget``, the one whose slowest stage
    (``stage_time``) is fastest; ``[]`` if none fits. ``fastest``, the fastest split regardless of memory if the
    caller knows it (from :func:`balance`, in milliseconds), is the answer whenever it fits."""
    if fastest and all(stage_memory(s, a, b) <= budget for s, (a, b) in enumerate(zip(fastest, fastest[1:]))):
        return list(fastest)
    within = lambda stage, start, stop: (
        stage_time(stage, start, stop) if stage_memory(stage, start, stop) <= budget else math.inf
    )
    return min_max_split(num_items, num_stages, within)[1]


def _exact_integers(values: Sequence[float]) -> list[int]:
    fractions = []
    for index, value in enumerate(values):
        number = value if isinstance(value, (int, Fraction)) else float(value)
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"weight {index} is {value!r}: weights must be finite numbers")
        if number < 0:
            raise ValueError(f"weight {index} is negative ({value!r}): weights must be >= 0")
        fractions.append(Fraction(number))
    scale = math.lcm(*(f.denominator for f in fractions)) if fractions else 1
    return [int(f * scale) for f in fractions]


def check_stage_count(num_stages: int, num_layers: int) -> None:
    """Raise a ValueError naming the fix unless ``num_layers`` can be cut into ``num_stages`` non-empty stages."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int):
        raise ValueError(f"num_stages must be an integer, got {num_stages!r}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(
            f"cannot cut {num_layers} layers into {num_stages} non-empty stages: use at most {num_layers} stages"
        )


def check_boundaries(boundaries: Sequence[int], num_layers: int, num_stages: int, source: str = "boundaries") -> None:
    """Raise a ValueError naming the problem unless ``boundaries`` cut ``num_layers`` into ``num_stages`` stages."""
    b = list(boundaries)
    if len(b) != num_stages + 1:
        raise ValueError(
            f"{source} gives {len(b) - 1} stage(s) but the pipeline has {num_stages}: "
            f"give {num_stages + 1} boundaries from 0 to {num_layers}"
        )
    if b[0] != 0:
        raise ValueError(f"{source} must start at 0 (the first layer), not {b[0]}")
    if b[-1] != num_layers:
        raise ValueError(f"{source} must end at {num_layers} (the number of layers), not {b[-1]}")
    for left, right in zip(b, b[1:]):
        if right <= left:
            raise ValueError(f"{source} must increase strictly (no empty stage), but {left} is followed by {right}")
