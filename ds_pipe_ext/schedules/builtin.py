"""The classic schedules: 1F1B (DeepSpeed's own order) and GPipe."""

from __future__ import annotations

from .compute_order import FORWARD, FULL_BACKWARD, ComputeOrderSchedule, Pass
from .registry import register_schedule

__all__ = ["GPipeSchedule", "OneFOneBSchedule"]


@register_schedule("1f1b")
class OneFOneBSchedule(ComputeOrderSchedule):
    """1F1B (PipeDream-Flush): after a warm-up of forwards, each stage alternates one forward and one backward.

    DeepSpeed's ``TrainSchedule`` as a compute order, on its clock of 2(M+K-1) steps: stage s forwards micro-batch m
    at step s + 2m and backwards it at step 2K-1-s + 2m, so a micro-batch moves one stage per step and neighbours are
    always on steps of opposite kind. Lowered, it gives exactly ``TrainSchedule``'s instructions. A stage holds at
    most K - s micro-batches.
    """

    def order(self) -> list[Pass | None]:
        return [self._work_at(step) for step in range(2 * (self.micro_batches + self.stages - 1))]

    def _work_at(self, step: int) -> Pass | None:
        if (step + self.stage_id) % 2 == 0:
            kind, micro_batch = FORWARD, (step - self.stage_id) // 2
        else:
            kind, micro_batch = FULL_BACKWARD, (step - (2 * self.stages - 1 - self.stage_id)) // 2
        return Pass(kind, micro_batch) if self._valid_micro_batch(micro_batch) else None


@register_schedule("gpipe")
class GPipeSchedule(ComputeOrderSchedule):
    """GPipe (Huang et al., 2019): every micro-batch forward through the stage, then every micro-batch backward.

    All M micro-batches are in flight at the turn, so the stage needs M buffers, and the engine must keep a loss and
    a received gradient per buffer. Backwards run in reverse micro-batch order, GPipe's and autograd's order, so the
    last stage starts with the micro-batch it forwarded last. On a clock, as 1F1B: stage s forwards micro-batch m at
    step s + m and backwards it at step M + 2K - 2 - s + (M - 1 - m), so each transfer is sent in the step its
    receiver receives it, which keeps GPipe valid even where every send waits for its receive.
    """

    def order(self) -> list[Pass | None]:
        stage, stages, micro_batches = self.stage_id, self.stages, self.micro_batches
        forwards = [Pass(FORWARD, m) for m in range(micro_batches)]
        backwards = [Pass(FULL_BACKWARD, m) for m in reversed(range(micro_batches))]
        turn = [None] * (2 * (stages - 1 - stage))
        return [*[None] * stage, *forwards, *turn, *backwards, *[None] * stage]
