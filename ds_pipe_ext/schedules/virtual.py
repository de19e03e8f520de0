"""Schedules with virtual stages: each pipeline rank holds several model chunks.

- ``interleaved-1f1b`` (Narayanan et al. 2021, Megatron's interleaved schedule): the loop placement, any number of
  chunks; the 1F1B bubble divided by the chunk count.
- ``interleaved-zb`` (Qi et al. 2024, ZB-1P interleaved): the same order with each backward split and the weight
  halves deferred by the rank's position.
- ``zb-v`` (Qi et al., "Pipeline Parallelism with Controllable Memory", 2024): the v placement, a near-zero bubble
  at 1F1B's activation memory.
- ``dualpipev`` (DeepSeek-V3): the v placement, forward of one chunk paired with backward of the other, with the
  weight halves deferred as DeepSeek's own implementation does (DeepSpeed 0.19.8's ``DualPipeVSchedule`` keeps
  them inside the backward).

The orders are the ones ``torch.distributed.pipelining`` computes for the same schedules (tests compare them),
without its idle slots: the lowering places every transfer.
"""

from __future__ import annotations

from collections import deque

from .compute_order import BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD, ComputeOrderSchedule, Pass
from .registry import register_schedule

__all__ = [
    "DualPipeVSchedule",
    "InterleavedOneFOneBSchedule",
    "InterleavedZeroBubbleSchedule",
    "ZBVSchedule",
]


class _PassCounter:
    """Hands out each chunk's micro-batches in order, per kind of pass."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def __call__(self, kind: str, chunk: int) -> Pass:
        micro_batch = self.next.get((kind, chunk), 0)
        self.next[(kind, chunk)] = micro_batch + 1
        return Pass(kind, micro_batch, chunk)


@register_schedule("interleaved-1f1b")
class InterleavedOneFOneBSchedule(ComputeOrderSchedule):
    """Interleaved 1F1B: each rank forwards a round of micro-batches through one chunk, then the next chunk, and in
    the steady state alternates one forward with one backward, backwards through the chunks in reverse.

    Micro-batches go in rounds of ``M // max(1, M // K)``; M must be a multiple of the number of rounds (as in
    torch's schedule, which relaxes Megatron's M % K == 0).
    """

    placement = "loop"
    chunks = 2
    warmup_factor = 2  # forwards of warm-up added per rank between this one and the last
    split_backward = False

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches, stages, stage_id)
        rounds = max(1, micro_batches // stages)
        if micro_batches % rounds:
            raise ValueError(
                f"{type(self).__name__} runs micro-batches in rounds of {micro_batches // rounds} on {stages} stages: "
                f"use a multiple of {rounds} micro-batches, not {micro_batches}"
            )
        self.per_round = micro_batches // rounds

    def order(self) -> list[Pass | None]:
        total = self.micro_batches * self.chunks
        warmup = min((self.chunks - 1) * self.per_round + self.warmup_factor * (self.stages - 1 - self.stage_id), total)
        forward_chunk = lambda op: (op // self.per_round) % self.chunks
        backward_chunk = lambda op: self.chunks - 1 - ((op - warmup) // self.per_round) % self.chunks
        backward = BACKWARD_INPUT if self.split_backward else FULL_BACKWARD
        next_pass, order, deferred = _PassCounter(), [], deque()
        for op in range(total + warmup):
            if op < total:
                order.append(next_pass(FORWARD, forward_chunk(op)))
            if op >= warmup:
                order.append(next_pass(backward, backward_chunk(op)))
                deferred.append(backward_chunk(op))
                if self.split_backward and op - warmup >= self.stage_id:
                    order.append(next_pass(BACKWARD_WEIGHT, deferred.popleft()))
        order += [next_pass(BACKWARD_WEIGHT, chunk) for chunk in deferred if self.split_backward]
        return order


@register_schedule("interleaved-zb")
class InterleavedZeroBubbleSchedule(InterleavedOneFOneBSchedule):
    """Interleaved 1F1B with each backward split into I and W (ZB-1P): rank r runs the W of a backward r backwards
    later, and its warm-up is one forward per rank shorter than interleaved 1F1B's."""

    warmup_factor = 1
    split_backward = True


@register_schedule("zb-v")
class ZBVSchedule(ComputeOrderSchedule):
    """ZB-V: the v placement; after a warm-up of forwards down chunk 0 and back up chunk 1, each rank alternates
    chunk 0's F, I, W with chunk 1's F, I, W, and ends with the I passes and then the W passes it held back.

    With equal F, I and W times its bubble is near zero, and no rank holds more activations than 1F1B's first
    stage. Fewer than 2K - 1 micro-batches leave gaps in the pattern (the missing micro-batches are left out).
    """

    placement = "v"
    chunks = 2

    def order(self) -> list[Pass | None]:
        rank, ranks = self.stage_id, self.stages
        padded = max(2 * ranks - 1, self.micro_batches)
        next_pass, order = _PassCounter(), []
        order += [next_pass(FORWARD, 0) for _ in range(2 * (ranks - rank) - 1)]
        for _ in range(rank):
            order += [next_pass(FORWARD, 1), next_pass(FORWARD, 0)]
        for _ in range(ranks - rank):
            order += [next_pass(FORWARD, 1), next_pass(BACKWARD_INPUT, 1), next_pass(BACKWARD_WEIGHT, 1)]
        while next_pass.next[(FORWARD, 1)] < next_pass.next[(FORWARD, 0)] or next_pass.next[(FORWARD, 0)] < padded:
            if next_pass.next[(FORWARD, 0)] < padded:
                order.append(next_pass(FORWARD, 0))
            order += [next_pass(BACKWARD_INPUT, 0), next_pass(BACKWARD_WEIGHT, 0)]
            order += [next_pass(FORWARD, 1), next_pass(BACKWARD_INPUT, 1), next_pass(BACKWARD_WEIGHT, 1)]
        for _ in range(rank):
            order += [next_pass(BACKWARD_INPUT, 0), next_pass(BACKWARD_INPUT, 1)]
        for _ in range(ranks - rank):
            order += [next_pass(BACKWARD_INPUT, 0), next_pass(BACKWARD_WEIGHT, 0)]
        for chunk in (1, 0):
            while next_pass.next.get((BACKWARD_WEIGHT, chunk), 0) < next_pass.next[(BACKWARD_INPUT, chunk)]:
                order.append(next_pass(BACKWARD_WEIGHT, chunk))
        return [entry for entry in order if entry.micro_batch < self.micro_batches]


@register_schedule("dualpipev")
class DualPipeVSchedule(ComputeOrderSchedule):
    """DualPipeV (DeepSeek-V3, DeepSeek's DualPipe repository): the v placement, in eight phases; in the main phase
    a forward of one chunk is paired with a backward of the other. As in DeepSeek's implementation, the weight
    halves are deferred where that fills a bubble (phases 3, 6, 7 and 8); elsewhere the backward is whole.

    ``split_weights = False`` keeps every backward whole: the compute order of DeepSpeed 0.19.8's own
    ``DualPipeVSchedule``. Needs at least 2K micro-batches.
    """

    placement = "v"
    chunks = 2
    split_weights = True

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches, stages, stage_id)
        if micro_batches < 2 * stages:
            raise ValueError(
                f"dualpipev needs at least 2 x {stages} = {2 * stages} micro-batches on {stages} stages, got "
                f"{micro_batches}: raise gradient_accumulation_steps"
            )

    def order(self) -> list[Pass | None]:
        rank, ranks = self.stage_id, self.stages
        next_pass, order, held = _PassCounter(), [], deque()

        def backward(chunk: int, split: bool) -> None:
            if split and self.split_weights:
                entry = next_pass(BACKWARD_INPUT, chunk)
                held.append(Pass(BACKWARD_WEIGHT, entry.micro_batch, chunk))
            else:
                entry = next_pass(BACKWARD_INPUT, chunk)
                entry = Pass(FULL_BACKWARD, entry.micro_batch, chunk)
            order.append(entry)

        def weight() -> None:
            if held:
                order.append(held.popleft())

        order += [next_pass(FORWARD, 0) for _ in range(2 * (ranks - rank - 1))]
        for _ in range(rank + 1):
            order += [next_pass(FORWARD, 0), next_pass(FORWARD, 1)]
        for _ in range(ranks - rank - 1):
            backward(1, split=True)
            weight()
            order.append(next_pass(FORWARD, 1))
        for _ in range(self.micro_batches - 2 * ranks + rank + 1):
            order.append(next_pass(FORWARD, 0))
            backward(1, split=False)
            order.append(next_pass(FORWARD, 1))
            backward(0, split=False)
        for _ in range(ranks - rank - 1):
            backward(1, split=False)
            order.append(next_pass(FORWARD, 1))
            backward(0, split=False)
        split = False
        for step in range(rank + 1):
            split |= step == (rank + 1) // 2 and rank % 2 == 1
            backward(1, split)
            split |= step == (rank + 1) // 2 and rank % 2 == 0
            backward(0, split)
        for _ in range(ranks - rank - 1):
            weight()
            backward(0, split)
        for _ in range(rank + 1):
            weight()
        order += held
        return order
