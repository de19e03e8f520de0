"""The partition report: a partition stage by stage, with the schedule simulator's step time and bubble."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deepspeed.runtime.pipe.schedule import PipeSchedule

from ..observe.simulation import simulate
from ..schedules import Layout
from .context import PartitionContext
from .costs import LayerCosts
from .methods import layer_type_name
from .registry import get_partition_method

__all__ = [
    "PartitionReport",
    "StageSummary",
    "compare_partitions",
    "format_comparison",
    "format_cost",
    "partition_report",
    "predict_step",
]


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
    spread: float | None = None  # the measured cost's interquartile range over its median, between rounds


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

    @property
    def spread(self) -> float | None:
        """The largest stage's spread: how far apart repeated measurements of the costs lay (``None``: counted)."""
        spreads = [stage.spread for stage in self.stages if stage.spread is not None]
        return max(spreads) if spreads else None

    def to_dict(self) -> dict[str, Any]:
        stage_costs = [stage.cost for stage in self.stages]
        return {**asdict(self), "stage_costs": stage_costs, "imbalance": self.imbalance, "spread": self.spread}

    def format(self) -> str:
        unit = {"s": "seconds", "FLOP": "FLOPs", None: "no costs: give sample_input"}.get(
            self.cost_unit, self.cost_unit
        )
        assumed = " (micro_batches not given)" if self.micro_batches_assumed else ""
        lines = [
            f"partition {self.method!r}: {len(self.stages)} stages, schedule {self.schedule}"
            f"{' (not named)' if self.schedule_assumed else ''}, "
            f"{self.micro_batches} micro-batches{assumed}; cost per micro-batch in {unit}",
            f"{'stage':>5}  {'layers':<9} {'cost':>10} {'spread':>6} {'share':>6} {'params':>8} {'memory':>10}  types",
        ]
        for index, stage in enumerate(self.stages):
            layers = f"{stage.start}-{stage.stop - 1}"
            lines.append(
                f"{index:>5}  {layers:<9} {format_cost(stage.cost, self.cost_unit):>10} {_percent(stage.spread):>6} "
                f"{_percent(stage.cost_share):>6} {_count(stage.params):>8} {_mebibytes(stage.memory_bytes):>10}  "
                f"{stage.layer_types}"
            )
        if self.step_time is not None:
            lines.append(
                f"slowest/mean stage {self.imbalance:.2f}; predicted step "
                f"{format_cost(self.step_time, self.cost_unit)}, bubble {_percent(self.bubble_fraction)}"
            )
        if self.spread is not None:
            lines.append(
                f"spread: the middle half of the measuring rounds lay within {_percent(self.spread)} of each other "
                "on the least steady stage; splits closer than that are a toss-up"
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
    micro_batches = ctx.micro_batches or ctx.ranks
    memory = ctx.stage_memory() if ctx.sample_input is not None else None
    names = [layer_type_name(layer) or type(layer).__name__ for layer in ctx.layers]
    stage_time = costs.stage_time(micro_batches) if costs else None
    stage_costs = [stage_time(s, a, b) if costs else None for s, (a, b) in enumerate(zip(bounds, bounds[1:]))]
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
            spread=costs.spread(start, stop) if costs else None,
        )
        for s, (start, stop, cost) in enumerate(zip(bounds, bounds[1:], stage_costs))
    ]
    step_time, bubble = predict_step(ctx, bounds, costs) if costs is not None else (None, None)
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


def predict_step(
    ctx: PartitionContext,
    boundaries: Sequence[int],
    costs: LayerCosts,
    schedule: type[PipeSchedule] | None = None,
) -> tuple[float, float]:
    """The step time and bubble the schedule simulator predicts for ``boundaries`` under ``costs``.

    Every stage's passes and transfers are replayed in the schedule's order (``schedule``, default the context's,
    with its chunks per rank); after its last pass each rank runs its optimizer step for the stages it holds and,
    with data-parallel replicas, the all-reduce of their gradients. The step ends when the last of those ends:
    DeepSpeed's ``train_batch`` ends by broadcasting the loss from the last stage, so no rank moves on before every
    stage is done.
    """
    schedule = schedule or ctx.simulated_schedule()
    bounds = list(boundaries)
    spans = list(zip(bounds, bounds[1:]))
    n, k = len(ctx.layers), len(spans)
    chunks = getattr(schedule, "chunks", 1)
    layout = Layout(k // chunks, chunks, getattr(schedule, "placement", "loop"))
    per_stage = lambda values: [sum(values[a:b]) for a, b in spans]
    passes = {"forward": per_stage(costs.forward), "backward": per_stage(costs.backward)}
    if costs.backward_input is not None and costs.backward_weight is not None:
        passes.update(backward_input=per_stage(costs.backward_input), backward_weight=per_stage(costs.backward_weight))
    passes["send"] = [_stage_send(costs, a, b, n) for a, b in spans]
    result = simulate(schedule, layout.ranks, ctx.micro_batches or layout.ranks, costs=passes)
    ends, tails = [0.0] * layout.ranks, [0.0] * layout.ranks
    for event in result.timeline:
        ends[event.stage] = max(ends[event.stage], event.end)
    for stage, (step, nbytes) in enumerate(zip(per_stage(costs.step), per_stage(ctx.stats().grad_bytes))):
        tails[layout.location(stage)[0]] += step + costs.link.allreduce(nbytes, ctx.data_parallel_size)
    return max(end + tail for end, tail in zip(ends, tails)), result.bubble_fraction


def _stage_send(costs: LayerCosts, start: int, stop: int, n: int) -> float:
    """The simulator takes one send cost per stage: the mean of what the stage sends (its output forward, its
    input's gradient backward)."""
    sends = ([costs.cut[stop - 1]] if stop < n else []) + ([costs.cut[start - 1]] if start > 0 else [])
    return sum(sends) / len(sends) if sends else 0.0


def format_cost(value: float | None, unit: str | None) -> str:
    """A cost for people: milliseconds or seconds when measured, else the number and its unit."""
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
    predicted step time, the measurement's spread and the bubble, and the fullest device's memory."""
    rows = [("method", "boundaries", "stage shares", "slowest/mean", "step", "spread", "bubble", "peak memory")]
    for report in reports:
        memory = [stage.memory_bytes for stage in report.stages]
        rows.append(
            (
                report.method,
                ",".join(map(str, report.boundaries)),
                " ".join(f"{100 * stage.cost_share:.0f}%" for stage in report.stages if stage.cost_share is not None),
                "-" if report.imbalance is None else f"{report.imbalance:.2f}",
                format_cost(report.step_time, report.cost_unit),
                _percent(report.spread),
                _percent(report.bubble_fraction),
                _mebibytes(None if None in memory else max(memory)),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
