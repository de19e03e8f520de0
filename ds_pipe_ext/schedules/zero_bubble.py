"""ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024): 1F1B with each backward split into I and W.

I, the gradient of the stage input, is what the previous stage waits for; W, the gradient of the weights, is what
nobody waits for. With I alone on the critical path the first backward reaches stage 0 sooner, and the W passes
fill the bubble at the end of the batch. Stage s keeps 1F1B's order of forwards and I passes and runs the W of
micro-batch i right after the I of micro-batch i + s: every stage then holds the activations of at most K
micro-batches, stage 0's 1F1B peak, and with equal F, I and W times the bubble is (K-1)(T_F + T_I - T_W) per stage
instead of 1F1B's (K-1)(T_F + T_I + T_W), about a third.

That is the paper's memory claim: no stage above 1F1B's peak. Per stage it is more: the last stage holds K
micro-batches instead of one. ``1f1b-split`` keeps 1F1B's memory on every stage by running each W right after
its I, for a smaller gain; no order of passes within that memory does better (docs/zero_bubble.md).
"""

from __future__ import annotations

from .compute_order import BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, ComputeOrderSchedule, Pass
from .registry import register_schedule

__all__ = ["SplitOneFOneBSchedule", "ZBH1Schedule"]


@register_schedule("zb-h1")
class ZBH1Schedule(ComputeOrderSchedule):
    """ZB-H1 on DeepSpeed's engine: 1F1B's forwards and I passes, with stage s's W passes deferred by s.

    The W passes only help if a transfer does not stop both stages until they meet: the engine's sends do not wait
    for their receive (:class:`~ds_pipe_ext.engine.SchedulePipelineEngine`).
    """

    def order(self) -> list[Pass | None]:
        warmup = min(self.stages - self.stage_id - 1, self.micro_batches)
        order = [Pass(FORWARD, micro_batch) for micro_batch in range(warmup)]
        weights_done = 0
        for micro_batch in range(self.micro_batches):
            if micro_batch + warmup < self.micro_batches:
                order.append(Pass(FORWARD, micro_batch + warmup))
            order.append(Pass(BACKWARD_INPUT, micro_batch))
            if micro_batch >= self.weight_delay():
                order.append(Pass(BACKWARD_WEIGHT, weights_done))
                weights_done += 1
        order.extend(Pass(BACKWARD_WEIGHT, micro_batch) for micro_batch in range(weights_done, self.micro_batches))
        return order

    def weight_delay(self) -> int:
        """How many I passes this stage runs before its first W: ZB-H1 delays stage s's W passes by s."""
        return self.stage_id


@register_schedule("1f1b-split")
class SplitOneFOneBSchedule(ZBH1Schedule):
    """1F1B with each backward split into I and W, every W right after its I.

    The previous stage gets its gradient one W earlier, and every stage holds what it holds under 1F1B (K - s
    micro-batches), where ZB-H1 holds K on every stage. For when the last stages' memory binds: simulated with
    F = I = W, its bubble is about 30% below 1F1B's, ZB-H1's about 60%.
    """

    def weight_delay(self) -> int:
        return 0
