"""Schedules written once, as the order in which each stage computes, and lowered to DeepSpeed's instructions.

A schedule says, per stage, which passes run in which order: ``F`` (forward), ``B`` (a whole backward), ``I``
(the input half of a split backward) and ``W`` (its weight half), each for one micro-batch; the letters are
``torch.distributed.pipelining``'s. :func:`lower` is the one function that turns such an order into the steps
DeepSpeed's engine executes: it adds the loads on the first and last stage, the receive each pass needs, the send
of what each pass produced and the end-of-batch reduction, so no schedule places a transfer by hand.

Each lowered step is one pass with its transfers: first the sends of what the previous pass produced and the
receive this pass needs, in DeepSpeed's order (``SendGrad``, ``RecvActivation``, ``RecvGrad``,
``SendActivation``), then the load, then the pass. That is how DeepSpeed's ``TrainSchedule`` and Megatron's
1F1B trade with their neighbours, and 1F1B's order lowers to exactly ``TrainSchedule``'s instructions.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    BufferOpInstruction,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)

from .instructions import BackwardInputPass, BackwardWeightPass

__all__ = [
    "BACKWARD_INPUT",
    "BACKWARD_WEIGHT",
    "FORWARD",
    "FULL_BACKWARD",
    "ComputeOrderSchedule",
    "Pass",
    "fewest_buffers",
    "lower",
]

FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "F", "B", "I", "W"

_COMPUTE: dict[str, type[BufferOpInstruction]] = {
    FORWARD: ForwardPass,
    FULL_BACKWARD: BackwardPass,
    BACKWARD_INPUT: BackwardInputPass,
    BACKWARD_WEIGHT: BackwardWeightPass,
}
_TRANSFER_ORDER: tuple[type[PipeInstruction], ...] = (SendGrad, RecvActivation, RecvGrad, SendActivation)
END_OF_BATCH: tuple[type[PipeInstruction], ...] = (ReduceTiedGrads, ReduceGrads, OptimizerStep)


@dataclass(frozen=True)
class Pass:
    """One pass of one stage over one micro-batch: ``kind`` is ``F``, ``B``, ``I`` or ``W``."""

    kind: str
    micro_batch: int

    def __post_init__(self) -> None:
        if self.kind not in _COMPUTE:
            raise ValueError(f"unknown pass kind {self.kind!r}: use one of {', '.join(_COMPUTE)}")

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"


def lower(
    order: Sequence[Pass | None], stage: int, stages: int, buffer_id: Callable[[Pass], int]
) -> list[list[PipeInstruction]]:
    """The instruction steps that run ``order`` on ``stage`` of ``stages``: one step per entry (``None`` is a step
    in which the stage computes nothing but still sends what the previous pass produced), one more if the last
    pass produced something to send, and the end-of-batch reduction appended to the last step."""
    first, last = stage == 0, stage == stages - 1
    steps: list[list[PipeInstruction]] = []
    produced: list[PipeInstruction] = []
    for entry in order:
        transfers, work = list(produced), []
        produced = []
        if entry is not None:
            buffer = buffer_id(entry)
            if entry.kind == FORWARD:
                transfers += [] if first else [RecvActivation(buffer)]
                work += [LoadMicroBatch(buffer)] if first or last else []
                produced = [] if last else [SendActivation(buffer)]
            elif entry.kind in (FULL_BACKWARD, BACKWARD_INPUT):
                transfers += [] if last else [RecvGrad(buffer)]
                produced = [] if first else [SendGrad(buffer)]
            work.append(_COMPUTE[entry.kind](buffer))
        transfers.sort(key=lambda instruction: _TRANSFER_ORDER.index(type(instruction)))
        steps.append(transfers + work)
    if produced:
        steps.append(produced)
    steps[-1] += [end() for end in END_OF_BATCH]
    return steps


def fewest_buffers(order: Sequence[Pass | None], stage: int, stages: int) -> int:
    """The fewest pipeline buffers ``order`` needs on ``stage`` when micro-batch ``m`` uses buffer ``m % n``: two
    micro-batches may share a buffer only if no instruction of one falls between the first and last of the other."""
    first_use: dict[int, int] = {}
    last_use: dict[int, int] = {}
    instructions = (i for step in lower(order, stage, stages, lambda p: p.micro_batch) for i in step)
    for position, instruction in enumerate(instructions):
        if isinstance(instruction, BufferOpInstruction):
            first_use.setdefault(instruction.buffer_id, position)
            last_use[instruction.buffer_id] = position
    micro_batches = sorted(first_use)
    for buffers in range(1, len(micro_batches) + 1):
        sharing: dict[int, list[int]] = {}
        for micro_batch in micro_batches:
            sharing.setdefault(micro_batch % buffers, []).append(micro_batch)
        if all(_disjoint(group, first_use, last_use) for group in sharing.values()):
            return buffers
    return max(1, len(micro_batches))


def _disjoint(group: list[int], first_use: dict[int, int], last_use: dict[int, int]) -> bool:
    spans = sorted((first_use[m], last_use[m]) for m in group)
    return all(end < start for (_, end), (start, _) in zip(spans, spans[1:]))


class ComputeOrderSchedule(PipeSchedule):
    """A ``PipeSchedule`` defined by :meth:`order`, each stage's passes; :func:`lower` writes its instructions.

    Micro-batch ``m`` uses buffer ``m % num_pipe_buffers()``, and the buffer count is derived from the order
    (:func:`fewest_buffers`), two at least, as DeepSpeed's engine allocates. A new schedule is one ``order()``
    and ``@register_schedule("name")``.
    """

    @abstractmethod
    def order(self) -> list[Pass | None]:
        """This stage's passes in the order it runs them; ``None`` is a step with no pass."""

    def steps(self) -> Iterator[list[PipeInstruction]]:
        yield from lower(self.order(), self.stage_id, self.stages, lambda p: self._buffer_idx(p.micro_batch))

    def num_pipe_buffers(self) -> int:
        return self._buffers

    @cached_property
    def _buffers(self) -> int:
        return max(2, fewest_buffers(self.order(), self.stage_id, self.stages))
