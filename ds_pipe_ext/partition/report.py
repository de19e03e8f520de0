"""The partition report: a partition stage by stage, with the schedule simulator's step time and bubble."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..observe.simulation import simulate
from .context import PartitionContext
from .costs import LayerCosts
from .methods import layer_type_name
from .registry import get_partition_method

__all__ = ["PartitionReport", "StageSummary", "compare_partitions", "format_comparison", "partition_report"]


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
    schedule_assumed: bool
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
            f"partition {self.method!r}: {len(self.stages)} stages, schedule {self.schedule}"
            f"{' (not named)' if self.schedule_assumed else ''}, "
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
    micro_batches = ctx.micro_batches or ctx.ranks
    memory = ctx.stage_memory() if ctx.sample_input is not None else None
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
        forward = [sum(costs.forward[a:b]) for a, b in zip(bounds, bounds[1:])]
        backward = [sum(costs.backward[a:b]) for a, b in zip(bounds, bounds[1:])]
        send = [_stage_send(costs, a, b, n) for a, b in zip(bounds, bounds[1:])]
        result = simulate(
            ctx.simulated_schedule(),
            ctx.ranks,
            micro_batches,
            costs={"forward": forward, "backward": backward, "send": send},
        )
        steps = [sum(costs.step[a:b]) * micro_batches for a, b in zip(bounds, bounds[1:])]
        rank_of = [ctx.layout.location(stage)[0] for stage in range(k)]
        optimizer = max(sum(t for t, r in zip(steps, rank_of) if r == rank) for rank in range(ctx.ranks))
        step_time, bubble = result.makespan + optimizer, result.bubble_fraction
    return PartitionReport(
        method=method,
        boundaries=bounds,
        schedule=ctx.schedule_name,
        micro_batches=micro_batches,
        micro_batches_assumed=ctx.micro_batches is None,
        schedule_assumed=ctx.schedule is None,
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
        ctx.require("sample_input", "comparing partitions by FLOPs")
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
