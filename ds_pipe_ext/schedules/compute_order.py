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
from .layout import Layout

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
    """One pass over one micro-batch: ``kind`` is ``F``, ``B``, ``I`` or ``W``; ``chunk`` is which of the rank's
    model chunks (virtual stages) it runs, 0 without virtual stages."""

    kind: str
    micro_batch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _COMPUTE:
            raise ValueError(f"unknown pass kind {self.kind!r}: use one of {', '.join(_COMPUTE)}")

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}" + (f"c{self.chunk}" if self.chunk else "")


def lower(
    order: Sequence[Pass | None], rank: int, layout: Layout, buffer_id: Callable[[Pass], int]
) -> list[list[PipeInstruction]]:
    """The instruction steps that run ``order`` on pipeline rank ``rank`` of ``layout``: one step per entry
    (``None`` is a step in which the rank computes nothing but still sends what the previous pass produced), one
    more if the last pass produced something to send, and the end-of-batch reduction appended to the last step.

    With virtual stages every instruction names its chunk, and the engine and the simulator find the neighbour a
    transfer goes to from the layout (the same rank, for the turn of the v placement). A rank loads each
    micro-batch once: where it holds the first and the last stage, the load names the last stage's buffer for the
    labels.
    """
    tag = layout.chunks > 1
    ends = [layout.location(0), layout.location(layout.stages - 1)]
    both_ends = ends[0][0] == ends[1][0] == rank and ends[0] != ends[1]  # two chunks of this rank
    steps: list[list[PipeInstruction]] = []
    produced: list[PipeInstruction] = []
    for entry in order:
        transfers, work = list(produced), []
        produced = []
        if entry is not None:
            buffer, chunk = buffer_id(entry), {"chunk": entry.chunk} if tag else {}
            stage = layout.stage(rank, entry.chunk)
            first, last = stage == 0, stage == layout.stages - 1
            if entry.kind == FORWARD:
                transfers += [] if first else [RecvActivation(buffer, **chunk)]
                if first and both_ends:
                    labels = buffer_id(Pass(FORWARD, entry.micro_batch, ends[1][1]))
                    work.append(LoadMicroBatch(buffer, label_buffer=labels, **chunk))
                elif first or (last and not both_ends):
                    work.append(LoadMicroBatch(buffer, **chunk))
                produced = [] if last else [SendActivation(buffer, **chunk)]
            elif entry.kind in (FULL_BACKWARD, BACKWARD_INPUT):
                transfers += [] if last else [RecvGrad(buffer, **chunk)]
                produced = [] if first else [SendGrad(buffer, **chunk)]
            work.append(_COMPUTE[entry.kind](buffer, **chunk))
        transfers.sort(key=lambda instruction: _TRANSFER_ORDER.index(type(instruction)))
        steps.append(transfers + work)
    if produced:
        steps.append(produced)
    steps[-1] += [end() for end in END_OF_BATCH]
    return steps


def fewest_buffers(order: Sequence[Pass | None], rank: int, layout: Layout) -> int:
    """The fewest pipeline buffers per chunk ``order`` needs on ``rank`` when micro-batch ``m`` of a chunk uses
    that chunk's buffer ``m % n``: two micro-batches may share a buffer only if no instruction of one falls
    between the first and last of the other."""
    keys = sorted({(p.chunk, p.micro_batch) for p in order if p is not None})
    unique = {key: index for index, key in enumerate(keys)}
    first_use: dict[int, int] = {}
    last_use: dict[int, int] = {}
    steps = lower(order, rank, layout, lambda p: unique[(p.chunk, p.micro_batch)])
    for position, instruction in enumerate(i for step in steps for i in step):
        if isinstance(instruction, BufferOpInstruction):
            first_use.setdefault(instruction.buffer_id, position)
            last_use[instruction.buffer_id] = position
    for buffers in range(1, len(keys) + 1):
        sharing: dict[tuple[int, int], list[int]] = {}
        for (chunk, micro_batch), index in unique.items():
            sharing.setdefault((chunk, micro_batch % buffers), []).append(index)
        if all(_disjoint(group, first_use, last_use) for group in sharing.values()):
            return buffers
    return max(1, len(keys))


def _disjoint(group: list[int], first_use: dict[int, int], last_use: dict[int, int]) -> bool:
    spans = sorted((first_use[m], last_use[m]) for m in group)
    return all(end < start for (_, end), (start, _) in zip(spans, spans[1:]))


class ComputeOrderSchedule(PipeSchedule):
    """A ``PipeSchedule`` defined by :meth:`order`, each rank's passes; :func:`lower` writes its instructions.

    ``stages`` is the number of pipeline ranks, as for DeepSpeed's schedules; a schedule with virtual stages says
    how many chunks each rank holds and how they are placed (``chunks``, ``placement``; :meth:`with_chunks` makes a
    variant with another count). Micro-batch ``m`` of chunk ``c`` uses buffer ``c * n + m % n``, and ``n`` is
    derived from the order (:func:`fewest_buffers`), two at least, as DeepSpeed's engine allocates. A new schedule
    is one ``order()`` and ``@register_schedule("name")``.
    """

    placement: str = "loop"
    chunks: int = 1

    @abstractmethod
    def order(self) -> list[Pass | None]:
        """This rank's passes in the order it runs them; ``None`` is a step with no pass."""

    @classmethod
    def with_chunks(cls, chunks: int) -> type[ComputeOrderSchedule]:
        """This schedule with ``chunks`` chunks per rank."""
        if chunks == cls.chunks:
            return cls
        Layout(1, chunks, cls.placement)  # refuses a count the placement cannot hold
        return type(cls.__name__, (cls,), {"chunks": chunks, "__doc__": cls.__doc__, "__module__": cls.__module__})

    @property
    def layout(self) -> Layout:
        return Layout(self.stages, self.chunks, self.placement)

    def steps(self) -> Iterator[list[PipeInstruction]]:
        yield from lower(self.order(), self.stage_id, self.layout, self.buffer_id)

    def buffer_id(self, entry: Pass) -> int:
        """The pipeline buffer ``entry``'s micro-batch uses on its chunk."""
        return entry.chunk * self.buffers_per_chunk + entry.micro_batch % self.buffers_per_chunk

    def num_pipe_buffers(self) -> int:
        return self.chunks * self.buffers_per_chunk

    @cached_property
    def buffers_per_chunk(self) -> int:
        """Pipeline buffers per chunk: the fewest the order needs (:func:`fewest_buffers`), two at least."""
        return max(2, fewest_buffers(self.order(), self.stage_id, self.layout))
