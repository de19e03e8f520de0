"""Plan a run: pipeline size, micro-batches, schedule and partition, for a memory budget, from measured costs.

The search enumerates every pipeline size K that divides the world (the rest of the ranks are data-parallel
replicas), every number of micro-batches M that divides a replica's share of the global batch, and every registered
schedule in every variant it declares (:func:`~ds_pipe_ext.schedules.schedule_variants`). For each it takes the
optimal partition under the budget: the split whose slowest stage (measured seconds per micro-batch, with what its
cuts send) is fastest among the splits whose every stage fits (:func:`~ds_pipe_ext.partition.solver.
fastest_split_within`, exact). Memory per rank is :meth:`PartitionContext.stage_memory` with the schedule's
activations in flight from the simulator; the step time is the simulator fed with the stages' costs, then each
stage's optimizer step and gradient all-reduce (:func:`~ds_pipe_ext.partition.report.predict_step`). Plans that fit
are ranked by predicted step time; when none fits, the error names the smallest budget that would.

A virtual-stage schedule (v chunks per rank) is planned over K x v stages, on two ranks or more (on one, chunks only
add work): its split is the fastest of K x v stages, and a rank's memory is its chunks' parameters, gradients and
optimizer state plus the most activations the simulator sees it hold at once over its chunks. The budget couples a
rank's non-contiguous stages, which the exact solver does not model: a virtual plan takes the fastest split if every
rank fits, else the split lightest per stage if that fits, else it is over budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any

from deepspeed.runtime.pipe.schedule import PipeSchedule

from ..observe.simulation import simulate
from ..partition import PartitionContext
from ..partition.methods import fastest_measured_split
from ..partition.report import predict_step
from ..partition.solver import fastest_split_within, min_max_split
from ..schedules import available_schedules, schedule_variants
from ..topology import divisors

__all__ = ["NoPlanFits", "Plan", "PlanSearch", "PlanSpace", "byte_size", "search_plans"]


@dataclass(frozen=True)
class Plan:
    """One way to run the model on the world: a pipeline of ``stages`` ranks x ``data_parallel`` replicas, each step
    ``micro_batches`` micro-batches of ``micro_batch_size`` samples per replica, under ``schedule`` (with its
    ``knobs`` and ``virtual_stages`` chunks per rank), cut at ``boundaries``; and what the models predict for it."""

    stages: int
    data_parallel: int
    micro_batches: int
    micro_batch_size: int
    schedule: str
    boundaries: list[int]
    step_time: float  # predicted, in cost_unit (seconds when measured)
    bubble: float  # predicted share of the pipelined part that stages wait
    stage_memory: list[float]  # predicted peak bytes of each pipeline rank (all its chunks)
    cost_unit: str
    spread: float | None = None  # how far the measuring rounds lay apart on the least steady stage
    knobs: Mapping[str, Any] = field(default_factory=dict)
    virtual_stages: int = 1  # model chunks per rank: ``boundaries`` cuts stages x virtual_stages stages

    @property
    def world_size(self) -> int:
        return self.stages * self.data_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.data_parallel

    @property
    def peak_memory(self) -> float:
        """Predicted bytes on the fullest rank."""
        return max(self.stage_memory)

    @property
    def samples_per_second(self) -> float | None:
        return self.global_batch / self.step_time if self.cost_unit == "s" and self.step_time > 0 else None

    @property
    def partition_method(self) -> str:
        return "manual:" + ",".join(map(str, self.boundaries))

    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config keys this plan sets (merge them into yours)."""
        return {
            "train_batch_size": self.global_batch,
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.micro_batches,
            "pipeline": {"schedule": self.schedule, **self.knobs},
        }

    def module_kwargs(self) -> dict[str, Any]:
        """The ``ds_pipe_ext.PipelineModule`` arguments this plan sets (with ``topology=make_topology(world,
        stages)``, or ``num_stages``, DeepSpeed fills the data-parallel size from the world)."""
        chunks = {"virtual_stages": self.virtual_stages} if self.virtual_stages > 1 else {}
        return {
            "num_stages": self.stages,
            "partition_method": self.partition_method,
            "micro_batches": self.micro_batches,
            "schedule": self.schedule,
            **chunks,
        }

    def script_flags(self) -> list[str]:
        """The example scripts' flags for this plan (their config takes :meth:`ds_config`)."""
        flags = ["-p", str(self.stages), "--partition", self.partition_method, "--schedule", self.schedule]
        return flags + (["--virtual-stages", str(self.virtual_stages)] if self.virtual_stages > 1 else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "knobs": dict(self.knobs),
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "peak_memory": self.peak_memory,
            "samples_per_second": self.samples_per_second,
            "partition_method": self.partition_method,
            "ds_config": self.ds_config(),
            "module_kwargs": self.module_kwargs(),
        }

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Plan:
        """The plan :meth:`to_dict` (or ``ds-pipe plan --auto --json``) wrote; the derived entries are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in entry.items() if key in names})

    def describe(self) -> str:
        knobs = "".join(f", {key}={value}" for key, value in self.knobs.items())
        knobs += f", {self.virtual_stages} chunks per rank" if self.virtual_stages > 1 else ""
        return (
            f"{self.stages} stage(s) x {self.data_parallel} replica(s), {self.micro_batches} micro-batch(es) of "
            f"{self.micro_batch_size}, schedule {self.schedule}{knobs}, boundaries {self.boundaries}"
        )


class NoPlanFits(ValueError):
    """No plan fits the memory budget; ``smallest`` is the lightest plan, whose peak memory would fit."""

    def __init__(self, budget: float, smallest: Plan | None, reasons: Sequence[str] = ()):
        self.budget, self.smallest = budget, smallest
        if smallest is None:
            why = "; ".join(reasons) or "the search space is empty"
            super().__init__(f"no plan to evaluate: {why}")
            return
        need = smallest.peak_memory
        super().__init__(
            f"no plan fits the memory budget of {budget:.0f} bytes ({byte_size(budget)}) per rank: the smallest "
            f"budget that fits is {need:.0f} bytes ({byte_size(need)}), with {smallest.describe()}; raise the "
            "budget to at least that, or allow more pipeline stages or micro-batches"
        )


@dataclass(frozen=True)
class PlanSpace:
    """What the planner may choose from. ``None`` means every possibility: pipeline sizes that divide the world,
    micro-batch counts that divide a replica's share of the batch, registered schedules (virtual-stage ones with their
    own chunk count). ``virtual_stages`` keeps only plans with that many chunks per rank (a module already built
    with them); ``None``: any."""

    world_size: int
    global_batch: int
    memory_budget: float | None = None
    stages: Sequence[int] | None = None
    micro_batches: Sequence[int] | None = None
    schedules: Sequence[str] | None = None
    virtual_stages: int | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "global_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"the memory budget must be a positive number of bytes per rank, got {self.memory_budget}")


@dataclass(frozen=True)
class PlanSearch:
    """The outcome: the ``plans`` that fit, fastest first; for each combination that did not fit, its lightest
    split (``over_budget``, lightest first); and the combinations that could not be formed, with why."""

    plans: list[Plan]
    over_budget: list[Plan]
    skipped: list[str]
    budget: float | None

    def best(self) -> Plan:
        """The fastest plan that fits, or :class:`NoPlanFits` naming the smallest budget that would."""
        if not self.plans:
            raise NoPlanFits(self.budget or 0.0, self.over_budget[0] if self.over_budget else None, self.skipped)
        return self.plans[0]

    def near_best(self) -> list[Plan]:
        """The plans whose predicted step is within the best plan's measuring spread of it: a toss-up."""
        if not self.plans:
            return []
        best = self.plans[0]
        limit = best.step_time * (1 + (best.spread or 0.0))
        return [plan for plan in self.plans if plan.step_time <= limit]

    def to_json(self) -> str:
        return json.dumps(
            {
                "budget": self.budget,
                "plans": [plan.to_dict() for plan in self.plans],
                "over_budget": [plan.to_dict() for plan in self.over_budget],
                "skipped": self.skipped,
            },
            indent=1,
        )


SampleForSize = Callable[[int], Any]


def search_plans(template: PartitionContext, space: PlanSpace, sample_input: SampleForSize | None = None) -> PlanSearch:
    """Every plan in ``space`` for the layers of ``template``, ranked (see the module's docstring).

    ``template`` gives the layers and how to cost them (``measure``, ``device``, ``repeats``, ``seconds_per_byte``,
    ``optimizer_state_bytes``, ``cache_path``); its schedule should be ``"auto"`` when split-backward schedules are
    among the candidates, so that measuring times both halves of the backward. ``sample_input(micro_batch_size)``
    is the first stage's micro-batch of that size; without it, ``template.sample_input`` serves every plan (for a
    space with one micro-batch size). Costs are measured once per micro-batch size, on every rank: a collective
    when a process group exists, so call it on every rank.
    """
    skipped: list[str] = []
    contexts: dict[int, PartitionContext] = {}
    fitting: list[tuple[tuple, Plan]] = []
    over_budget: list[Plan] = []
    for stages, data_parallel, micro_batches in _shapes(space, len(template.layers), skipped):
        size = space.global_batch // (data_parallel * micro_batches)
        if size not in contexts:
            contexts[size] = (
                template if sample_input is None else replace(template, sample_input=partial(sample_input, size))
            )
            contexts[size].measured_costs()  # once per size, shared by every variant below
        for order, (name, knobs, schedule) in enumerate(_schedules(space, stages, micro_batches, skipped)):
            chunks = getattr(schedule, "chunks", 1)
            if stages * chunks > len(template.layers):
                skipped.append(f"schedule {name} on {stages} stages: {stages} x {chunks} chunks exceed the layers")
                continue
            ctx = contexts[size].variant(
                num_stages=stages * chunks,
                virtual_stages=chunks,
                micro_batches=micro_batches,
                schedule=name,
                data_parallel_size=data_parallel,
            )
            plan, fits = _plan(ctx, size, knobs, schedule, space.memory_budget)
            if fits:
                fitting.append(((plan.step_time, plan.peak_memory, stages, micro_batches, order), plan))
            else:
                over_budget.append(plan)
    fitting.sort(key=lambda entry: entry[0])
    over_budget.sort(key=lambda plan: (plan.peak_memory, plan.step_time))
    reasons = list(dict.fromkeys(skipped))  # a schedule skipped for every shape: once
    return PlanSearch([plan for _, plan in fitting], over_budget, reasons, space.memory_budget)


def _shapes(space: PlanSpace, num_layers: int, skipped: list[str]) -> list[tuple[int, int, int]]:
    """(stages, replicas, micro-batches) of every plan the space allows; what it names but cannot be, in ``skipped``."""
    shapes = []
    for stages in space.stages or [k for k in divisors(space.world_size) if k <= num_layers]:
        if space.world_size % stages or stages > num_layers:
            reason = "does not divide the world" if space.world_size % stages else f"exceeds the {num_layers} layers"
            skipped.append(f"{stages} stages: {stages} {reason} of {space.world_size} ranks")
            continue
        data_parallel = space.world_size // stages
        if space.global_batch % data_parallel:
            skipped.append(
                f"{stages} stages: global batch {space.global_batch} does not split over {data_parallel} replicas"
            )
            continue
        per_replica = space.global_batch // data_parallel
        for micro_batches in space.micro_batches or divisors(per_replica):
            if per_replica % micro_batches:
                skipped.append(
                    f"{stages} stages, {micro_batches} micro-batches: a replica's {per_replica} samples do not split "
                    f"into {micro_batches}"
                )
                continue
            shapes.append((stages, data_parallel, micro_batches))
    return shapes


def _schedules(
    space: PlanSpace, stages: int, micro_batches: int, skipped: list[str]
) -> list[tuple[str, dict[str, Any], type[PipeSchedule]]]:
    """(name, knobs, class) of every schedule variant worth trying for this pipeline shape."""
    names = space.schedules or available_schedules()
    variants = []
    for name in names:
        for knobs, schedule in schedule_variants(name, stages, micro_batches):
            chunks = getattr(schedule, "chunks", 1)
            wanted = space.virtual_stages or chunks
            try:
                if stages == 1 and chunks > 1 and space.virtual_stages is None:
                    raise ValueError("one rank has no bubble for chunks to shrink, only more work")
                if wanted != chunks:
                    if min(wanted, chunks) == 1:
                        raise ValueError(f"it runs {chunks} chunk(s) per rank, the module holds {wanted}")
                    schedule = schedule.with_chunks(wanted)
                schedule(micro_batches=micro_batches, stages=stages, stage_id=0)
            except ValueError as refusal:
                skipped.append(f"schedule {name} on {stages} stages, {micro_batches} micro-batches: {refusal}")
                continue
            variants.append((name, knobs, schedule))
    return variants


def _plan(
    ctx: PartitionContext, size: int, knobs: dict[str, Any], schedule: type[PipeSchedule], budget: float | None
) -> tuple[Plan, bool]:
    """The fastest split of ``ctx`` that fits ``budget`` as a plan, and ``True``; or, if none fits, the plan with the
    split that needs least memory, and ``False``."""
    costs = ctx.measured_costs()
    n, k, micro_batches, layout = len(ctx.layers), ctx.num_stages, ctx.micro_batches, ctx.layout
    simulated = simulate(schedule, layout.ranks, micro_batches)
    memory = ctx.stage_memory(in_flight=simulated.peak_per_stage)
    static = ctx.stage_memory(in_flight=[0] * k)

    def rank_memory(boundaries: Sequence[int]) -> list[float]:
        spans = list(zip(boundaries, boundaries[1:]))
        if layout.chunks == 1:
            return [memory(stage, a, b) for stage, (a, b) in enumerate(spans)]
        per_rank = simulated.peak_activation_bytes([ctx.stats().activation_bytes(a, b) for a, b in spans])
        for stage, (a, b) in enumerate(spans):
            per_rank[layout.location(stage)[0]] += static(stage, a, b)
        return per_rank

    boundaries = fastest_measured_split(ctx)
    fits = True
    if budget is not None and layout.chunks == 1:
        boundaries = fastest_split_within(n, k, costs.stage_time(micro_batches), memory, budget, fastest=boundaries)
        if not boundaries:
            fits, boundaries = False, min_max_split(n, k, memory)[1]
    elif budget is not None and max(rank_memory(boundaries)) > budget:
        boundaries = min_max_split(n, k, memory)[1]
        fits = max(rank_memory(boundaries)) <= budget
    spans = list(zip(boundaries, boundaries[1:]))
    step_time, bubble = predict_step(ctx, boundaries, costs, schedule)
    spreads = [spread for spread in (costs.spread(a, b) for a, b in spans) if spread is not None]
    plan = Plan(
        stages=layout.ranks,
        data_parallel=ctx.data_parallel_size,
        micro_batches=micro_batches,
        micro_batch_size=size,
        schedule=ctx.schedule_name,
        boundaries=boundaries,
        step_time=step_time,
        bubble=bubble,
        stage_memory=rank_memory(boundaries),
        cost_unit=costs.unit,
        spread=max(spreads) if spreads else None,
        knobs=knobs,
        virtual_stages=layout.chunks,
    )
    return plan, fits


def byte_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1 (1.50 GiB, 300.0 MiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes:.0f} bytes"
