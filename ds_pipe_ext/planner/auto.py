"""``partition_method="auto"``: the planner's best plan for the pipeline a module already is, as a partition method.

The stage count, micro-batches and data-parallel size are the module's; the planner chooses the partition (and,
with ``schedule="auto"``, the schedule) from measured costs, within ``memory_budget``. Like ``profile`` it
measures on every rank at once, and every rank reaches the same plan from the same shared costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..partition import PartitionContext, register_partition_method
from ..schedules import AUTO_SCHEDULE
from .search import PlanSpace, search_plans

__all__ = ["module_space"]


def module_space(ctx: PartitionContext) -> PlanSpace:
    """The plans open to a module: its own ranks, chunks per rank, micro-batches and replicas (the micro-batch size is
    the sample's first dimension, DeepSpeed's batch dimension); every registered schedule that runs its chunks if the
    schedule is ``"auto"``, else the named one."""
    sample = ctx.sample()
    first = sample[0] if isinstance(sample, (tuple, list)) else sample
    micro_batches = ctx.require("micro_batches", "partition method 'auto'")
    return PlanSpace(
        world_size=ctx.ranks * ctx.data_parallel_size,
        global_batch=first.shape[0] * micro_batches * ctx.data_parallel_size,
        memory_budget=ctx.memory_budget,
        stages=[ctx.ranks],
        micro_batches=[micro_batches],
        schedules=None if ctx.schedule_name == AUTO_SCHEDULE else [ctx.schedule_name],
        virtual_stages=ctx.virtual_stages,
    )


def _check_auto(ctx: PartitionContext, arg: str | None) -> None:
    ctx.require("sample_input", "partition method 'auto'")
    if ctx.require("micro_batches", "partition method 'auto'") < 1:
        raise ValueError(f"micro_batches must be at least 1, got {ctx.micro_batches}")
    if ctx.memory_budget is not None and not ctx.memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes per device, got {ctx.memory_budget!r}")


@register_partition_method("auto", check=_check_auto, chooses_schedule=True)
def _auto(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """The fastest plan that fits the budget (:func:`~ds_pipe_ext.planner.search.search_plans`); its schedule is
    recorded in ``ctx`` for the module to run. Collective, like ``profile``."""
    plan = search_plans(ctx, module_space(ctx)).best()
    ctx.choose_schedule(plan.schedule, plan)
    return plan.boundaries
