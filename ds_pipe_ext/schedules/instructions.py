"""The instructions ds_pipe_ext adds to DeepSpeed's: the two halves of a split backward.

DeepSpeed's ``BackwardPass`` computes the gradient of the stage input and of the weights at once. Zero-bubble
schedules (Qi et al., arXiv 2401.10241) split it: the previous stage waits for the input gradient (B, here
``BackwardInputPass``), nobody waits for the weight gradients (W, ``BackwardWeightPass``), so W can fill a bubble.
:class:`~ds_pipe_ext.engine.SchedulePipelineEngine` executes both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from deepspeed.runtime.pipe.schedule import (
    BufferOpInstruction,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

__all__ = [
    "RECEIVES",
    "SENDS",
    "BackwardInputPass",
    "BackwardWeightPass",
    "splits_backward",
    "transfer_runs",
    "uses_split_backward",
]

SENDS: tuple[type[PipeInstruction], ...] = (SendActivation, SendGrad)
RECEIVES: tuple[type[PipeInstruction], ...] = (RecvActivation, RecvGrad)


class BackwardInputPass(BufferOpInstruction):
    """B: the gradient of the stage input for the micro-batch in ``buffer_id``, which the previous stage waits for.

    Its gradient goes out with DeepSpeed's ``SendGrad``; the received gradient is freed, the activations are kept
    for the matching :class:`BackwardWeightPass`.
    """


class BackwardWeightPass(BufferOpInstruction):
    """W: accumulate the weight gradients of the micro-batch in ``buffer_id`` into ``.grad``, then free its
    activations. Comes after the micro-batch's :class:`BackwardInputPass` and before ``ReduceGrads``."""


def uses_split_backward(schedule: PipeSchedule) -> bool:
    """Whether ``schedule`` (one stage's) runs a backward split into I and W passes, which only some engines and
    backends can run."""
    return any(isinstance(cmd, (BackwardInputPass, BackwardWeightPass)) for step in schedule for cmd in step)


def splits_backward(schedule_class: type[PipeSchedule]) -> bool:
    """Whether ``schedule_class`` splits the backward on any stage (looked at on a two-stage pipeline with four
    micro-batches, the fewest DualPipeV runs there)."""
    return any(uses_split_backward(schedule_class(micro_batches=4, stages=2, stage_id=stage)) for stage in (0, 1))


def transfer_runs(step: Sequence[PipeInstruction]) -> Iterator[list[PipeInstruction]]:
    """``step`` in the groups the engine executes: each run of consecutive sends and receives is one group, its
    sends first (a send does not wait, so no receive holds it up), and every other instruction is a group of one."""
    run: list[PipeInstruction] = []
    for instruction in step:
        if isinstance(instruction, SENDS + RECEIVES):
            run.append(instruction)
            continue
        if run:
            yield sorted(run, key=lambda transfer: not isinstance(transfer, SENDS))
            run = []
        yield [instruction]
    if run:
        yield sorted(run, key=lambda transfer: not isinstance(transfer, SENDS))
