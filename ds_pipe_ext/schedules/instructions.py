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
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

__all__ = ["RECEIVES", "SENDS", "BackwardInputPass", "BackwardWeightPass", "transfer_runs"]

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
