"""Partition methods: where to cut a pipeline's layer list into stages, chosen by name.

DeepSpeed's ``PipelineModule`` knows ``uniform``, ``parameters`` and ``type:REGEX``; they keep their exact DeepSpeed
results here. The methods added here (``manual:``, weighted ``type:``, ``flops``, ``memory``, ``profile``) all cut
with one exact solver that minimises the slowest stage, :func:`balance`. (DeepSpeed's ``partition_balanced``
minimises the spread between the slowest and the fastest stage, which can leave the slowest stage slower than
necessary: weights [7, 1, 9, 5, 16, 2] into 4 stages get a slowest stage of 18 there, 16 here.)

A method is a function ``(ctx, arg) -> boundaries`` registered by name with :func:`register_partition_method`;
``"name:arg"`` passes ``arg``. Boundaries are ``[0, b1, ..., n]``: stage ``s`` runs layers ``b[s]`` to ``b[s+1]-1``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Optional, Union

import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec
from torch import nn

from .costs import LayerCosts, LayerStats, count_layer_stats, shared_layer_costs

SampleInput = Union[torch.Tensor, Callable[[], torch.Tensor]]
PartitionFn = Callable[["PartitionContext", Optional[str]], Sequence[int]]
CheckFn = Callable[["PartitionContext", Optional[str]], None]
StageCost = Callable[[int, int, int], Any]

#: Schedule names that mean DeepSpeed's own ``TrainSchedule`` rather than a registered one.
_DEEPSPEED_SCHEDULE = "deepspeed"


# ---- the solver ----------------------------------------------------------------------------------------------------


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
    """
    n = len(weights)
    _check_stage_count(num_stages, n)
    if cut_costs is not None and len(cut_costs) != n:
        raise ValueError(f"cut_costs has {len(cut_costs)} entries, weights {n}: give one per layer")
    exact = _exact_integers([*weights, *(cut_costs or [])])
    prefix = [0]
    for w in exact[:n]:
        prefix.append(prefix[-1] + w)
    cut = exact[n:] or [0] * n

    def stage_sum(stage: int, start: int, stop: int) -> int:
        cost = prefix[stop] - prefix[start]
        if start > 0:
            cost += cut[start - 1]
        if stop < n:
            cost += cut[stop - 1]
        return cost

    return min_max_split(n, num_stages, stage_sum)[1]


def min_max_split(num_items: int, num_stages: int, stage_cost: StageCost) -> tuple[Any, list[int]]:
    """The largest stage cost and the boundaries that minimise it, for any ``stage_cost(stage, start, stop)``.

    Dynamic programming over suffixes, O(num_stages x num_items^2) calls of ``stage_cost``; among optimal splits the
    lexicographically largest boundaries. ``math.inf`` marks a stage that is not allowed; if no split avoids one,
    the result is ``(math.inf, [])``. Give exact numbers (integers, fractions) for exact ties.
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


def _check_stage_count(num_stages: int, num_layers: int) -> None:
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


# ---- what methods can look at ----------------------------------------------------------------------------------------


@dataclass
class PartitionContext:
    """Everything a partition method may use. ``layers`` and ``num_stages`` are always there; a method that needs
    more raises a ValueError naming the missing argument (see :meth:`require`).

    ``sample_input`` is the micro-batch the first stage receives (a tensor or tuple of tensors, or a function
    returning one); ``memory_budget`` is bytes per device; ``optimizer_state_bytes`` is per trainable parameter
    (Adam's two fp32 moments: 8); ``seconds_per_byte`` is the link between stages (``None``: measured between the
    ranks, 0 in a single process); ``measure`` replaces :func:`ds_pipe_ext.costs.measure_layer_costs`.
    """

    layers: Sequence[Any]
    num_stages: int
    sample_input: SampleInput | None = None
    micro_batches: int | None = None
    schedule: str = "1f1b"
    memory_budget: float | None = None
    cache_path: str | os.PathLike | None = None
    measure: Callable[[PartitionContext], LayerCosts] | None = None
    device: str | torch.device = "cpu"
    optimizer_state_bytes: float = 8.0
    seconds_per_byte: float | None = None
    repeats: int = 3
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def require(self, name: str, method: str) -> Any:
        """``self.<name>``, or a ValueError saying that ``method`` needs it and what it is."""
        if method in _METHODS:
            method = f"partition method {method!r}"
        value = getattr(self, name)
        if value is None:
            hint = {
                "sample_input": "the micro-batch the first stage receives, e.g. sample_input=torch.zeros(8, 3, 224, "
                "224) or a function returning it",
                "micro_batches": "micro-batches per step, i.e. gradient accumulation steps",
            }.get(name, name)
            raise ValueError(f"{method} needs {name}= ({hint})")
        return value

    def sample(self) -> Any:
        if "sample" not in self._memo:
            sample = self.require("sample_input", "counting or measuring layer costs")
            self._memo["sample"] = sample() if callable(sample) else sample
        return self._memo["sample"]

    def stats(self) -> LayerStats:
        """Parameters, and FLOPs and activations if a sample input is given; no collectives, no compute."""
        if "stats" not in self._memo:
            sample = self.sample() if self.sample_input is not None else None
            self._memo["stats"] = count_layer_stats(self.layers, sample)
        return self._memo["stats"]

    def measured_costs(self) -> LayerCosts:
        """Measured seconds, equal on every rank. Collective: every rank must call it."""
        if "measured" not in self._memo:
            self._memo["measured"] = shared_layer_costs(self)
        return self._memo["measured"]

    def known_costs(self) -> LayerCosts | None:
        """The best costs available without a collective: measured if already measured, else counted FLOPs."""
        if "measured" in self._memo:
            return self._memo["measured"]
        if self.sample_input is None:
            return None
        stats = self.stats()
        return LayerCosts.counted(stats.forward_flops, stats.backward_flops, unit="FLOP")

    def in_flight(self) -> list[int]:
        """Per stage, the most micro-batches the schedule keeps forwarded but not yet backwarded (1F1B:
        min(K - s, M); GPipe: M), from the schedule simulator, so every registered schedule is covered."""
        from .simulation import simulate

        micro_batches = self.micro_batches or self.num_stages
        return simulate(_simulated_schedule(self.schedule), self.num_stages, micro_batches).peak_buffers


def _simulated_schedule(name: str | None) -> Any:
    name = (name or "1f1b").lower()
    if name == _DEEPSPEED_SCHEDULE:
        from deepspeed.runtime.pipe.schedule import TrainSchedule

        return TrainSchedule
    return name


# ---- the registry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionMethod:
    """A registered method: ``fn(ctx, arg)`` returns boundaries; ``check(ctx, arg)``, if given, rejects bad input
    cheaply and before any process group exists; ``prefix`` methods take ``name:arg``, the others no argument."""

    name: str
    fn: PartitionFn
    prefix: bool = False
    check: CheckFn | None = None


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``"name"`` or ``"name:arg"``, ready to check and run."""

    method: PartitionMethod
    arg: str | None = None

    def __str__(self) -> str:
        return self.method.name if self.arg is None else f"{self.method.name}:{self.arg}"

    def check(self, ctx: PartitionContext) -> None:
        """Everything that can be wrong with the spec, the stage count and the inputs, without measuring."""
        _check_stage_count(ctx.num_stages, len(ctx.layers))
        if self.method.check is not None:
            self.method.check(ctx, self.arg)

    def __call__(self, ctx: PartitionContext) -> list[int]:
        self.check(ctx)
        boundaries = [int(b) for b in self.method.fn(ctx, self.arg)]
        check_boundaries(boundaries, len(ctx.layers), ctx.num_stages, source=f"partition method {str(self)!r}")
        return boundaries


_METHODS: dict[str, PartitionMethod] = {}


def register_partition_method(
    name: str, *, prefix: bool = False, check: CheckFn | None = None
) -> Callable[[PartitionFn], PartitionFn]:
    """Decorator: make ``fn(ctx, arg) -> boundaries`` selectable as ``name`` (case-insensitive), or as
    ``name:arg`` with ``prefix=True``. ``check(ctx, arg)`` runs first, on every rank, before process groups exist."""
    key = name.lower()
    if not key or ":" in key:
        raise ValueError(f"partition method names must be non-empty and contain no ':', got {name!r}")

    def register(fn: PartitionFn) -> PartitionFn:
        if key in _METHODS and _METHODS[key].fn is not fn:
            raise ValueError(f"partition method {key!r} is already registered to {_METHODS[key].fn.__qualname__}")
        _METHODS[key] = PartitionMethod(key, fn, prefix, check)
        return fn

    return register


def available_partition_methods() -> list[str]:
    """Registered names, in registration order (DeepSpeed's first)."""
    return list(_METHODS)


def get_partition_method(spec: str) -> PartitionSpec:
    """Parse ``"name"`` or ``"name:arg"``; a ValueError lists the registered methods for an unknown name."""
    if not isinstance(spec, str):
        raise ValueError(f"partition method must be a string such as 'parameters', got {spec!r}")
    name, colon, arg = spec.partition(":")
    method = _METHODS.get(name.strip().lower())
    if method is None:
        choices = ", ".join(f"{m.name}:ARG" if m.prefix else m.name for m in _METHODS.values())
        raise ValueError(
            f"unknown partition method {spec!r}; registered: {choices} "
            "(add one with @ds_pipe_ext.register_partition_method)"
        )
    if method.prefix and not arg:
        raise ValueError(f"partition method {method.name!r} needs an argument: {method.name}:ARG")
    if not method.prefix and colon:
        raise ValueError(f"partition method {method.name!r} takes no argument, got {spec!r}")
    return PartitionSpec(method, arg if colon else None)


# ---- DeepSpeed's methods, with DeepSpeed's exact results ---------------------------------------------------------


def layer_type_name(layer: Any) -> str | None:
    """The name ``type:`` matches, as DeepSpeed's ``_find_layer_type`` sees it (``None``: it skips the layer)."""
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


@register_partition_method("uniform")
def _uniform(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    return ds_utils.partition_uniform(num_items=len(ctx.layers), num_parts=ctx.num_stages)


@register_partition_method("parameters")
def _parameters(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    # DeepSpeed's _count_layer_params, including its real builds of LayerSpecs (and the random numbers they draw,
    # so that the model built afterwards gets the same weights as under DeepSpeed's own PipelineModule).
    counts = []
    for layer in ctx.layers:
        module = layer.build() if isinstance(layer, LayerSpec) else layer
        trainable = module.parameters() if isinstance(module, nn.Module) else ()
        counts.append(sum(p.numel() for p in trainable if p.requires_grad))
    return ds_utils.partition_balanced(weights=counts, num_parts=ctx.num_stages)


def _type_terms(arg: str) -> list[tuple[re.Pattern, float]] | None:
    """``conv:3|linear:1`` as (regex, weight) pairs; ``None`` for DeepSpeed's plain ``type:REGEX``.

    The argument is weighted when any ``|``-separated term ends in ``:<number>``; terms without one weigh 1. So
    ``type:conv|linear`` stays DeepSpeed's regex alternation with DeepSpeed's result.
    """
    terms = []
    weighted = False
    for term in arg.split("|"):
        pattern, colon, weight = term.rpartition(":")
        try:
            value = float(weight) if colon else None
        except ValueError:
            value = None
        if value is None:
            pattern, value = term, 1.0
        else:
            weighted = True
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"type: weight {weight!r} of {pattern!r} must be a finite number >= 0")
        try:
            terms.append((re.compile(pattern, re.IGNORECASE), value))
        except re.error as error:
            raise ValueError(f"type: {pattern!r} is not a valid regular expression ({error})") from None
    return terms if weighted else None


def _type_weights(ctx: PartitionContext, arg: str) -> tuple[list[float], bool]:
    """Per-layer weights of ``type:arg`` and whether the argument was weighted."""
    names = [layer_type_name(layer) for layer in ctx.layers]
    terms = _type_terms(arg)
    weighted = terms is not None
    if not weighted:
        # DeepSpeed lower-cases the method and keeps what follows the first ':' up to the next one.
        terms = [(re.compile(arg.lower().split(":")[0], re.IGNORECASE), 1.0)]
    known = sorted({name for name in names if name})
    for pattern, _ in terms:
        if not any(name and pattern.search(name) for name in names):
            raise ValueError(
                f"type: {pattern.pattern!r} matches no layer; the layer types are: {', '.join(known) or 'none'}"
            )
    weights = [sum(w for pattern, w in terms if name and pattern.search(name)) for name in names]
    return weights, weighted


def _check_type(ctx: PartitionContext, arg: str | None) -> None:
    _type_weights(ctx, arg)


@register_partition_method("type", prefix=True, check=_check_type)
def _type(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """DeepSpeed's ``type:REGEX`` (layers whose type matches weigh 1, others 0, cut by DeepSpeed's solver), or
    weighted types ``type:conv:3|linear:1`` (a layer weighs the sum of the weights it matches, cut by
    :func:`balance`)."""
    weights, weighted = _type_weights(ctx, arg)
    if weighted:
        return balance(weights, ctx.num_stages)
    return ds_utils.partition_balanced(weights=[int(w > 0) for w in weights], num_parts=ctx.num_stages)


# ---- the new methods -------------------------------------------------------------------------------------------------


def _manual_boundaries(ctx: PartitionContext, arg: str | None) -> list[int]:
    try:
        boundaries = [int(item) for item in arg.split(",")]
    except ValueError:
        raise ValueError(f"manual:{arg} must be comma-separated integers, e.g. manual:0,9,{len(ctx.layers)}") from None
    check_boundaries(boundaries, len(ctx.layers), ctx.num_stages, source=f"manual:{arg}")
    return boundaries


register_partition_method("manual", prefix=True, check=_manual_boundaries)(_manual_boundaries)


def _check_flops(ctx: PartitionContext, arg: str | None) -> None:
    ctx.require("sample_input", "flops")


@register_partition_method("flops", check=_check_flops)
def _flops(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Forward + backward FLOPs per layer on the sample input's shapes (PyTorch's FlopCounterMode)."""
    stats = ctx.stats()
    return balance([f + b for f, b in zip(stats.forward_flops, stats.backward_flops)], ctx.num_stages)


def _check_memory(ctx: PartitionContext, arg: str | None) -> None:
    _check_profile(ctx, arg, "memory")
    if ctx.memory_budget is not None and not ctx.memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes per device, got {ctx.memory_budget!r}")


def stage_memory(ctx: PartitionContext) -> StageCost:
    """``bytes(stage, start, stop)``: parameters, gradients, optimizer state, and the activations the schedule keeps
    in flight on that stage (``ctx.in_flight()`` micro-batches of ``activation_bytes``)."""
    stats = ctx.stats()
    static = [
        p + g + ctx.optimizer_state_bytes * n for p, g, n in zip(stats.param_bytes, stats.grad_bytes, stats.params)
    ]
    prefix = [0]
    for value in static:
        prefix.append(prefix[-1] + value)
    in_flight = ctx.in_flight()
    return lambda stage, start, stop: (
        prefix[stop] - prefix[start] + in_flight[stage] * stats.activation_bytes(start, stop)
    )


@register_partition_method("memory", check=_check_memory)
def _memory(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Without a budget: the split whose fullest device needs least memory. With ``memory_budget``: the split
    balanced by FLOPs among those that fit, or a ValueError naming the smallest budget that fits."""
    n, k = len(ctx.layers), ctx.num_stages
    memory = stage_memory(ctx)
    smallest, lightest = min_max_split(n, k, memory)
    budget = ctx.memory_budget
    if budget is None:
        return lightest
    if smallest > budget:
        raise ValueError(
            f"no split into {k} stages fits memory_budget={budget:.0f} bytes ({budget / 2**20:.1f} MiB) per device: "
            f"the smallest budget that fits is {smallest:.0f} bytes ({smallest / 2**20:.1f} MiB), with boundaries "
            f"{lightest}; raise the budget, add stages, or use fewer micro-batches in flight"
        )
    stats = ctx.stats()
    flops = [0]
    for f, b in zip(stats.forward_flops, stats.backward_flops):
        flops.append(flops[-1] + f + b)
    fits = lambda stage, start, stop: flops[stop] - flops[start] if memory(stage, start, stop) <= budget else math.inf
    return min_max_split(n, k, fits)[1]


def _check_profile(ctx: PartitionContext, arg: str | None, method: str = "profile") -> None:
    ctx.require("sample_input", method)
    if ctx.require("micro_batches", method) < 1:
        raise ValueError(f"micro_batches must be at least 1, got {ctx.micro_batches}")


@register_partition_method("profile", check=_check_profile)
def _profile(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Measured seconds per layer (forward, backward, optimizer share), shared by all ranks, cut by :func:`balance`
    with each cut charged its measured transfer twice (the activation forward, its gradient backward)."""
    costs = ctx.measured_costs()
    return balance(costs.totals(), ctx.num_stages, cut_costs=[2 * c for c in costs.cut])


# ---- the report ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSummary:
    """One stage of a partition: its layers, what it costs per micro-batch, its parameters and its memory."""

    start: int
    stop: int
    layer_types: str
    cost: float | None
    cost_share: float | None
    params: int
    memory_bytes: float | None


@dataclass(frozen=True)
class PartitionReport:
    """A partition, stage by stage, with the schedule simulator's step time and bubble for its costs."""

    method: str
    boundaries: list[int]
    schedule: str
    micro_batches: int
    micro_batches_assumed: bool
    cost_unit: str | None
    stages: list[StageSummary]
    step_time: float | None
    bubble_fraction: float | None

    @property
    def imbalance(self) -> float | None:
        """Slowest stage over the mean stage: 1.0 is perfectly balanced."""
        costs = [stage.cost for stage in self.stages]
        if None in costs or not sum(costs):
            return None
        return max(costs) / (sum(costs) / len(costs))

    def to_dict(self) -> dict[str, Any]:
        stage_costs = [stage.cost for stage in self.stages]
        return {**asdict(self), "stage_costs": stage_costs, "imbalance": self.imbalance}

    def format(self) -> str:
        unit = {"s": "seconds", "FLOP": "FLOPs", None: "no costs: give sample_input"}.get(
            self.cost_unit, self.cost_unit
        )
        assumed = " (micro_batches not given)" if self.micro_batches_assumed else ""
        lines = [
            f"partition {self.method!r}: {len(self.stages)} stages, schedule {self.schedule}, "
            f"{self.micro_batches} micro-batches{assumed}; cost per micro-batch in {unit}",
            f"{'stage':>5}  {'layers':<9} {'cost':>10} {'share':>6} {'params':>8} {'memory':>10}  types",
        ]
        for index, stage in enumerate(self.stages):
            layers = f"{stage.start}-{stage.stop - 1}"
            lines.append(
                f"{index:>5}  {layers:<9} {_number(stage.cost, self.cost_unit):>10} "
                f"{_percent(stage.cost_share):>6} {_count(stage.params):>8} {_mebibytes(stage.memory_bytes):>10}  "
                f"{stage.layer_types}"
            )
        if self.step_time is not None:
            lines.append(
                f"slowest/mean stage {self.imbalance:.2f}; predicted step {_number(self.step_time, self.cost_unit)}, "
                f"bubble {_percent(self.bubble_fraction)}"
            )
        return "\n".join(lines)


def partition_report(
    ctx: PartitionContext, boundaries: Sequence[int], method: str = "", costs: LayerCosts | None = None
) -> PartitionReport:
    """Describe ``boundaries`` under ``costs`` (default: ``ctx.known_costs()``: measured if the partition method
    measured, else FLOPs if there is a sample input, else none). Runs no collective."""
    costs = costs if costs is not None else ctx.known_costs()
    stats = ctx.stats()
    bounds = list(boundaries)
    n, k = len(ctx.layers), len(bounds) - 1
    micro_batches = ctx.micro_batches or k
    memory = stage_memory(ctx) if ctx.sample_input is not None else None
    names = [layer_type_name(layer) or type(layer).__name__ for layer in ctx.layers]
    stage_costs = [_stage_cost(costs, start, stop, n) if costs else None for start, stop in zip(bounds, bounds[1:])]
    total = sum(stage_costs) if costs else 0
    stages = [
        StageSummary(
            start=start,
            stop=stop,
            layer_types=", ".join(
                f"{name} x{count}" if count > 1 else name for name, count in Counter(names[start:stop]).items()
            ),
            cost=cost,
            cost_share=cost / total if total else None,
            params=sum(stats.params[start:stop]),
            memory_bytes=memory(s, start, stop) if memory else None,
        )
        for s, (start, stop, cost) in enumerate(zip(bounds, bounds[1:], stage_costs))
    ]
    step_time = bubble = None
    if costs is not None:
        from .simulation import simulate

        forward = [sum(costs.forward[a:b]) for a, b in zip(bounds, bounds[1:])]
        backward = [sum(costs.backward[a:b]) for a, b in zip(bounds, bounds[1:])]
        send = [_stage_send(costs, a, b, n) for a, b in zip(bounds, bounds[1:])]
        result = simulate(
            _simulated_schedule(ctx.schedule),
            k,
            micro_batches,
            costs={"forward": forward, "backward": backward, "send": send},
        )
        optimizer = max(sum(costs.step[a:b]) * micro_batches for a, b in zip(bounds, bounds[1:]))
        step_time, bubble = result.makespan + optimizer, result.bubble_fraction
    return PartitionReport(
        method=method,
        boundaries=bounds,
        schedule=(ctx.schedule or "1f1b").lower(),
        micro_batches=micro_batches,
        micro_batches_assumed=ctx.micro_batches is None,
        cost_unit=costs.unit if costs else None,
        stages=stages,
        step_time=step_time,
        bubble_fraction=bubble,
    )


def _stage_cost(costs: LayerCosts, start: int, stop: int, n: int) -> float:
    """What :func:`balance` charged the stage: its layers, plus two transfers at each end that is a cut."""
    cuts = (costs.cut[start - 1] if start > 0 else 0) + (costs.cut[stop - 1] if stop < n else 0)
    return sum(costs.totals()[start:stop]) + 2 * cuts


def _stage_send(costs: LayerCosts, start: int, stop: int, n: int) -> float:
    """The simulator takes one send cost per stage: the mean of what the stage sends (its output forward, its
    input's gradient backward)."""
    sends = ([costs.cut[stop - 1]] if stop < n else []) + ([costs.cut[start - 1]] if start > 0 else [])
    return sum(sends) / len(sends) if sends else 0.0


def _number(value: float | None, unit: str | None) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.3g}" if unit is None else f"{value:.3g} {unit}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _count(value: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


def _mebibytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def compare_partitions(ctx: PartitionContext, methods: Sequence[str], costs: str = "profile") -> list[PartitionReport]:
    """Run every method in ``methods`` on ``ctx`` and report each under the same costs: ``"profile"`` (measured)
    or ``"flops"`` (counted), so that their stage times and predicted steps can be compared."""
    specs = [get_partition_method(method) for method in methods]
    for spec in specs:
        spec.check(ctx)
    if costs == "profile":
        common = ctx.measured_costs()
    elif costs == "flops":
        ctx.require("sample_input", "flops")
        common = LayerCosts.counted(ctx.stats().forward_flops, ctx.stats().backward_flops, unit="FLOP")
    else:
        raise ValueError(f"costs must be 'profile' or 'flops', got {costs!r}")
    return [partition_report(ctx, spec(ctx), method=str(spec), costs=common) for spec in specs]


def format_comparison(reports: Sequence[PartitionReport]) -> str:
    """Methods side by side: boundaries, each stage's share of the cost, the slowest stage over the mean, the
    predicted step time and bubble, and the fullest device's memory."""
    rows = [("method", "boundaries", "stage shares", "slowest/mean", "step", "bubble", "peak memory")]
    for report in reports:
        memory = [stage.memory_bytes for stage in report.stages]
        rows.append(
            (
                report.method,
                ",".join(map(str, report.boundaries)),
                " ".join(f"{100 * stage.cost_share:.0f}%" for stage in report.stages if stage.cost_share is not None),
                "-" if report.imbalance is None else f"{report.imbalance:.2f}",
                _number(report.step_time, report.cost_unit),
                _percent(report.bubble_fraction),
                _mebibytes(None if None in memory else max(memory)),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
