"""ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024): 1F1B with each backward split into B and W.

B, the gradient of the stage input, is what the previous stage waits for; W, the gradient of the weights, is what
nobody waits for. With B alone on the critical path the first backward reaches stage 0 sooner, and the W passes
fill the bubble at the end of the batch. Stage s keeps 1F1B's order of forwards and B passes and runs the W of
micro-batch i right after the B of micro-batch i + s: every stage then holds the activations of at most K
micro-batches, stage 0's 1F1B peak, and with equal F, B and W times the bubble is (K-1)(T_F + T_B - T_W) per stage
instead of 1F1B's (K-1)(T_F + T_B + T_W), about a third.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from deepspeed.runtime.pipe.schedule import (
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

from ds_pipe_ext.schedules import register_schedule
from ds_pipe_ext.split_backward import BackwardInputPass, BackwardWeightPass

__all__ = ["ZBH1Schedule"]

FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "F", "B", "W"
Pass = tuple[str, int]  # (kind, micro-batch)
_WORK = 4  # a pass starting at a moment comes after the transfers of that moment


@register_schedule("zb-h1")
class ZBH1Schedule(PipeSchedule):
    """ZB-H1 on DeepSpeed's engine: 1F1B's forwards and B passes, with stage s's W passes deferred by s.

    Each stage runs its passes in :meth:`passes` order. Where the transfers go in that stream is read off the
    timeline all stages would follow with unit-time passes (the paper's T_F = T_B = T_W): a tensor moves at the
    moment it is produced, and within one moment even stages talk to their next stage first and odd stages to their
    previous one. Both ends of every link then list their transfers in the same global order, so DeepSpeed's
    blocking sends and receives match and cannot deadlock, whatever the real pass times are.
    """

    def passes(self, stage: int | None = None) -> list[Pass]:
        """The order in which ``stage`` (default: this one) runs its forwards, B and W passes."""
        stage = self.stage_id if stage is None else stage
        warmup = min(self.stages - stage - 1, self.micro_batches)
        order = [(FORWARD, micro_batch) for micro_batch in range(warmup)]
        weights_done = 0
        for micro_batch in range(self.micro_batches):
            if micro_batch + warmup < self.micro_batches:
                order.append((FORWARD, micro_batch + warmup))
            order.append((BACKWARD_INPUT, micro_batch))
            if micro_batch >= stage:
                order.append((BACKWARD_WEIGHT, weights_done))
                weights_done += 1
        order.extend((BACKWARD_WEIGHT, micro_batch) for micro_batch in range(weights_done, self.micro_batches))
        return order

    def steps(self) -> Iterator[list[PipeInstruction]]:
        timeline = self._unit_time_timeline()
        moments: dict[int, list[tuple[int, PipeInstruction]]] = defaultdict(list)
        for (kind, micro_batch), (start, _) in timeline[self.stage_id].items():
            moments[start].extend((_WORK, instruction) for instruction in self._work(kind, micro_batch))
        for moment, rank, instruction in self._transfers(timeline):
            moments[moment].append((rank, instruction))
        for moment in sorted(moments):
            yield [instruction for _, instruction in sorted(moments[moment], key=lambda item: item[0])]
        yield [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        """Every stage holds up to K micro-batches between forward and W; two buffers at least, as DeepSpeed."""
        return max(2, min(self.stages, self.micro_batches))

    def _work(self, kind: str, micro_batch: int) -> list[PipeInstruction]:
        buffer = self._buffer_idx(micro_batch)
        if kind == BACKWARD_INPUT:
            return [BackwardInputPass(buffer)]
        if kind == BACKWARD_WEIGHT:
            return [BackwardWeightPass(buffer)]
        load = [LoadMicroBatch(buffer)] if self.is_first_stage or self.is_last_stage else []
        return [*load, ForwardPass(buffer)]

    def _transfers(self, timeline: list[dict[Pass, tuple[int, int]]]) -> list[tuple[int, int, PipeInstruction]]:
        """(moment, rank within the moment, instruction) for every send and receive of this stage.

        A tensor moves when the pass producing it ends. Within a moment an even stage talks to its next stage first
        and an odd stage to its previous one, so both ends of a link reach it together; on a link, the activation
        goes before the gradient.
        """
        stage = self.stage_id
        next_link, previous_link = (0, 2) if stage % 2 == 0 else (2, 0)
        transfers = []
        for (kind, micro_batch), (_, end) in timeline[stage].items():
            buffer = self._buffer_idx(micro_batch)
            if kind == FORWARD and not self.is_last_stage:
                transfers.append((end, next_link, SendActivation(buffer)))
            if kind == BACKWARD_INPUT and not self.is_first_stage:
                transfers.append((end, previous_link + 1, SendGrad(buffer)))
        if not self.is_first_stage:
            for (kind, micro_batch), (_, end) in timeline[stage - 1].items():
                if kind == FORWARD:
                    transfers.append((end, previous_link, RecvActivation(self._buffer_idx(micro_batch))))
        if not self.is_last_stage:
            for (kind, micro_batch), (_, end) in timeline[stage + 1].items():
                if kind == BACKWARD_INPUT:
                    transfers.append((end, next_link + 1, RecvGrad(self._buffer_idx(micro_batch))))
        return transfers

    def _unit_time_timeline(self) -> list[dict[Pass, tuple[int, int]]]:
        """(start, end) of every pass of every stage when each pass takes one unit and waits for its input: a
        forward for the previous stage's forward, a B for the next stage's B."""
        orders = [self.passes(stage) for stage in range(self.stages)]
        timeline: list[dict[Pass, tuple[int, int]]] = [{} for _ in range(self.stages)]
        clock = [0] * self.stages
        position = [0] * self.stages
        progressed = True
        while progressed:
            progressed = False
            for stage in range(self.stages):
                while position[stage] < len(orders[stage]):
                    kind, micro_batch = orders[stage][position[stage]]
                    feeder = stage - 1 if kind == FORWARD else stage + 1 if kind == BACKWARD_INPUT else None
                    ready = 0
                    if feeder is not None and 0 <= feeder < self.stages:
                        if (kind, micro_batch) not in timeline[feeder]:
                            break
                        ready = timeline[feeder][(kind, micro_batch)][1]
                    start = max(clock[stage], ready)
                    clock[stage] = start + 1
                    timeline[stage][(kind, micro_batch)] = (start, start + 1)
                    position[stage] += 1
                    progressed = True
        if position != [len(order) for order in orders]:
            raise AssertionError(f"ZB-H1 pass orders deadlock at K={self.stages}, M={self.micro_batches}")
        return timeline
