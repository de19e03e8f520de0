"""ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024): 1F1B with each backward split into B and W.

B, the gradient of the stage input, is what the previous stage waits for; W, the gradient of the weights, is what
nobody waits for. With B alone on the critical path the first backward reaches stage 0 sooner, and the W passes
fill the bubble at the end of the batch. Stage s keeps 1F1B's order of forwards and B passes and runs the W of
micro-batch i right after the B of micro-batch i + s: every stage then holds the activations of at most K
micro-batches, stage 0's 1F1B peak, and with equal F, B and W times the bubble is (K-1)(T_F + T_B - T_W) per stage
instead of 1F1B's (K-1)(T_F + T_B + T_W), about a third.

That is the paper's memory claim: no stage above 1F1B's peak. Per stage it is more: the last stage holds K
micro-batches instead of one. ``1f1b-split`` keeps 1F1B's memory on every stage by running each W right after
its B, for a smaller gain; no order of passes within that memory does better (docs/zero_bubble.md).
"""

from __future__ import annotations

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

__all__ = ["SplitOneFOneBSchedule", "ZBH1Schedule"]

FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT = "F", "B", "W"
Pass = tuple[str, int]  # (kind, micro-batch)


@register_schedule("zb-h1")
class ZBH1Schedule(PipeSchedule):
    """ZB-H1 on DeepSpeed's engine: 1F1B's forwards and B passes, with stage s's W passes deferred by s.

    Each stage runs its passes in :meth:`passes` order, receives right before the pass that needs the tensor and
    sends right after the pass that made it. That placement relies on the engine's sends not blocking
    (:class:`~ds_pipe_ext.engine.SchedulePipelineEngine`): with rendezvous sends, each transfer would stop both
    stages until they meet, and the W passes would move those meetings instead of filling the bubble.
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
            if micro_batch >= self.weight_delay(stage):
                order.append((BACKWARD_WEIGHT, weights_done))
                weights_done += 1
        order.extend((BACKWARD_WEIGHT, micro_batch) for micro_batch in range(weights_done, self.micro_batches))
        return order

    def weight_delay(self, stage: int) -> int:
        """How many B passes ``stage`` runs before its first W: ZB-H1 delays stage s's W passes by s."""
        return stage

    def steps(self) -> Iterator[list[PipeInstruction]]:
        for kind, micro_batch in self.passes():
            buffer = self._buffer_idx(micro_batch)
            if kind == FORWARD:
                receive = [] if self.is_first_stage else [RecvActivation(buffer)]
                load = [LoadMicroBatch(buffer)] if self.is_first_stage or self.is_last_stage else []
                send = [] if self.is_last_stage else [SendActivation(buffer)]
                yield [*receive, *load, ForwardPass(buffer), *send]
            elif kind == BACKWARD_INPUT:
                receive = [] if self.is_last_stage else [RecvGrad(buffer)]
                send = [] if self.is_first_stage else [SendGrad(buffer)]
                yield [*receive, BackwardInputPass(buffer), *send]
            else:
                yield [BackwardWeightPass(buffer)]
        yield [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        """1F1B's K - s micro-batches awaiting B, plus the W passes held back (ZB-H1: K on every stage); two
        buffers at least, as DeepSpeed."""
        in_flight = self.stages - self.stage_id + self.weight_delay(self.stage_id)
        return max(2, min(in_flight, self.micro_batches))


@register_schedule("1f1b-split")
class SplitOneFOneBSchedule(ZBH1Schedule):
    """1F1B with each backward split into B and W, every W right after its B.

    The previous stage gets its gradient one W earlier, and every stage holds what it holds under 1F1B (K - s
    micro-batches), where ZB-H1 holds K on every stage. For when the last stages' memory binds: simulated with
    F = B = W, its bubble is about 30% below 1F1B's, ZB-H1's about 60%.
    """

    def weight_delay(self, stage: int) -> int:
        return 0
