"""``torch.distributed.pipelining``'s own schedules as oracles, built without a process group.

Shared by the tests that compare our orders with torch's (``test_virtual``) and read torch's action CSV
(``test_interchange``).
"""

from __future__ import annotations

import torch.distributed.pipelining.schedules as torch_schedules

Order = dict[int, list[tuple[str, int, int]]]  # rank -> (kind, micro-batch, global stage) per pass


def torch_pipeline_order(cls: type, ranks: int, micro_batches: int, chunks: int = 1) -> dict[int, list] | None:
    """torch's ``pipeline_order`` for ``cls`` (rank -> its actions, ``None`` for an idle step), or None where torch's
    constructor refuses the sizes. Only the attributes the order reads are set, as its ``__init__`` sets them:
    ``_get_pipeline_order()`` for the one-stage-per-rank schedules (Schedule1F1B, ScheduleGPipe), else
    ``_calculate_single_rank_operations`` per rank."""
    schedule = cls.__new__(cls)
    schedule.pp_group_size, schedule._n_microbatches, schedule.n_local_stages = ranks, micro_batches, chunks
    schedule.num_stages = schedule._num_stages = ranks * chunks
    if issubclass(cls, torch_schedules.PipelineScheduleSingle):
        return schedule._get_pipeline_order()
    if cls in (torch_schedules.ScheduleInterleaved1F1B, torch_schedules.ScheduleInterleavedZeroBubble):
        schedule.number_of_rounds = max(1, micro_batches // ranks)
        schedule.microbatches_per_round = micro_batches // schedule.number_of_rounds
        if micro_batches % schedule.number_of_rounds:
            return None  # torch raises: "requires the number of microbatches to be a multiple of the rounds"
    if cls is torch_schedules.ScheduleDualPipeV and micro_batches < schedule._num_stages:
        return None  # torch raises: "requires at least as many microbatches as stages"
    return {rank: schedule._calculate_single_rank_operations(rank) for rank in range(ranks)}


def torch_order(cls: type, ranks: int, micro_batches: int, chunks: int) -> Order | None:
    """torch's per-rank compute order: idle slots dropped, DualPipeV's overlapped F+B pairs as their two passes."""
    pipeline_order = torch_pipeline_order(cls, ranks, micro_batches, chunks)
    if pipeline_order is None:
        return None
    order = {}
    for rank, actions in pipeline_order.items():
        passes = [sub for action in actions if action is not None for sub in (action.sub_actions or (action,))]
        order[rank] = [(p.computation_type.value, p.microbatch_index, p.stage_index) for p in passes]
    return order


def dump_csv(pipeline_order: dict[int, list], path) -> None:
    """torch's own ``_dump_csv`` (compute only) of ``pipeline_order``, as torchtitan writes a schedule CSV."""
    holder = torch_schedules.PipelineScheduleMulti.__new__(torch_schedules.PipelineScheduleMulti)
    holder.pipeline_order = pipeline_order
    torch_schedules.PipelineScheduleMulti._dump_csv(holder, str(path))
