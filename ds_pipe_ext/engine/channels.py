"""The point-to-point channels between pipeline stages: one process group per direction of each link.

Between two ranks, NCCL runs the transfers of one process group in the order they were posted, and a send completes
only once its receive is posted; without tags, the k-th send meets the k-th receive. With one group for everything,
a rank that posted a send ahead of a receive from the same neighbour can deadlock with a neighbour that did the
opposite (ZB-H1's order does), and with virtual stages two kinds of tensor between the same two ranks can meet the
wrong receive. Here each direction of each link between global stages (stage g to g + 1 for activations, g + 1 to g
for gradients) has a process group of its own: on it the tensors are all of one kind, in the micro-batch order both
ends run that chunk in, and no transfer waits behind another kind. A rank then waits only for the tensors its next
pass needs, which the schedule's own dependencies guarantee (the simulator checks it, ``transport="engine"``).

A link's first activation is preceded by a message with the tensor shapes, on the same channel, so the receiver
can allocate the tensors it receives into.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..schedules.layout import Layout

__all__ = ["Channels", "Shapes"]

#: Numbers in a shapes message: how many tensors, then per tensor its dtype, rank and sizes; zero-padded.
SHAPES_SIZE = 256
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


class Channels:
    """The process groups of this rank's links: ``group(link)`` for a link ``(from stage, to stage)``.

    Built on every rank of the job at once (creating a group is a collective): every pipeline replica gets a group
    per direction of each link whose two stages live on different ranks.
    """

    def __init__(self, pipelines: list[list[int]], layout: Layout, rank: int):
        self.layout = layout
        timeout = job_timeout()
        self.groups: dict[tuple[int, int], Any] = {}
        self.peers: dict[tuple[int, int], int] = {}
        for pipeline in pipelines:
            for stage in range(layout.stages - 1):
                for link in ((stage, stage + 1), (stage + 1, stage)):
                    ranks = [pipeline[layout.location(end)[0]] for end in link]
                    if ranks[0] == ranks[1]:
                        continue
                    group = dist.new_group(sorted(ranks), timeout=timeout)
                    if rank in ranks:
                        self.groups[link] = group
                        self.peers[link] = ranks[1] if ranks[0] == rank else ranks[0]

    def group(self, link: tuple[int, int]) -> Any:
        return self.groups[link]

    def peer(self, link: tuple[int, int]) -> int:
        """The global rank at the other end of ``link``."""
        return self.peers[link]


def job_timeout() -> timedelta | None:
    """The default group's timeout (``deepspeed.init_distributed(timeout=...)``). A new group does not inherit it
    (it gets the backend's default, 30 minutes on gloo), so a channel would wait for a dead or hung peer that long
    instead of failing the job when the user asked; ``None`` where torch does not say."""
    group = dist.distributed_c10d._get_default_group()
    try:
        return group._get_backend(group._device_types[0]).options._timeout
    except (AttributeError, IndexError, RuntimeError):
        return None


@dataclass(frozen=True)
class Shapes:
    """What a link carries: each tensor's sizes and dtype, and whether the stage's output is a tuple."""

    tensors: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    as_tuple: bool

    @classmethod
    def of(cls, tensors: list[torch.Tensor], as_tuple: bool) -> Shapes:
        return cls(tuple((tuple(t.shape), t.dtype) for t in tensors), as_tuple)

    def empty(self, device: torch.device) -> list[torch.Tensor]:
        """Tensors to receive into."""
        return [torch.empty(size, dtype=dtype, device=device) for size, dtype in self.tensors]

    def encode(self, device: torch.device) -> torch.Tensor:
        """The fixed-size message: tuple or not, how many tensors, then each one's dtype, rank and sizes."""
        numbers = [int(self.as_tuple), len(self.tensors)]
        for size, dtype in self.tensors:
            numbers += [_DTYPES.index(dtype), len(size), *size]
        if len(numbers) > SHAPES_SIZE:
            raise ValueError(f"the tensors between two stages need more than {SHAPES_SIZE} numbers to describe")
        message = self.message(device)
        message[: len(numbers)] = torch.tensor(numbers, dtype=torch.int64)
        return message

    @staticmethod
    def message(device: torch.device) -> torch.Tensor:
        return torch.zeros(SHAPES_SIZE, dtype=torch.int64, device=device)

    @classmethod
    def decode(cls, message: torch.Tensor) -> Shapes:
        numbers = message.tolist()
        tensors, position = [], 2
        for _ in range(numbers[1]):
            dtype, dims = _DTYPES[numbers[position]], numbers[position + 1]
            tensors.append((tuple(numbers[position + 2 : position + 2 + dims]), dtype))
            position += 2 + dims
        return cls(tuple(tensors), bool(numbers[0]))
