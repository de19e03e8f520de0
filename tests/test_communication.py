"""Transfers that cannot deadlock: the models of gloo, NCCL and DeepSpeed's blocking posting, and the engine's check.

NCCL cannot run here (no machine with two GPUs), so safety on it is shown on a model of its ordering: between two
ranks the transfers run in the order they were posted, a send completes only once its receive is posted, and a
batch posted with ``batch_isend_irecv`` progresses as a group.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)

from ds_pipe_ext.engine import SchedulePipelineEngine, pipeline_engine
from ds_pipe_ext.observe.simulation import ScheduleError, simulate, validate
from ds_pipe_ext.schedules import (
    BackwardInputPass,
    BackwardWeightPass,
    OneFOneBSchedule,
    ZBH1Schedule,
    available_schedules,
)

END = [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
SPLIT = {"zb-h1", "1f1b-split"}


class PlainSendZBH1(ZBH1Schedule):
    """ZB-H1's order with each receive right before its pass and each send right after it, in a group of its own:
    how DeepSpeed's blocking handlers, or a plain isend per instruction, would post it."""

    def steps(self):
        first, last = self.is_first_stage, self.is_last_stage
        for entry in self.order():
            buffer = self._buffer_idx(entry.micro_batch)
            if entry.kind == "F":
                receive = [] if first else [RecvActivation(buffer)]
                load = [LoadMicroBatch(buffer)] if first or last else []
                yield [*receive, *load, ForwardPass(buffer), *([] if last else [SendActivation(buffer)])]
            elif entry.kind == "I":
                receive = [] if last else [RecvGrad(buffer)]
                yield [*receive, BackwardInputPass(buffer), *([] if first else [SendGrad(buffer)])]
            else:
                yield [BackwardWeightPass(buffer)]
        yield END


def crossing(together: bool) -> type[PipeSchedule]:
    """Two stages, two micro-batches: stage 0 sends its second activation before it receives the first gradient,
    stage 1 sends the first gradient before it receives the second activation; ``together`` posts each pair of
    crossing transfers in one batch."""

    class Crossing(PipeSchedule):
        def steps(self):
            if self.stage_id == 0:
                crossed = [[SendActivation(1), RecvGrad(0)]] if together else [[SendActivation(1)], [RecvGrad(0)]]
                yield from [[LoadMicroBatch(0), ForwardPass(0)], [SendActivation(0), LoadMicroBatch(1)]]
                yield from [[ForwardPass(1)], *crossed, [BackwardPass(0)], [RecvGrad(1)], [BackwardPass(1), *END]]
            else:
                crossed = [[SendGrad(0), RecvActivation(1)]] if together else [[SendGrad(0)], [RecvActivation(1)]]
                yield from [[RecvActivation(0), LoadMicroBatch(0), ForwardPass(0), BackwardPass(0)], *crossed]
                yield from [[LoadMicroBatch(1), ForwardPass(1), BackwardPass(1)], [SendGrad(1), *END]]

        def num_pipe_buffers(self):
            return 2

    return Crossing


@pytest.mark.parametrize("schedule", available_schedules())
def test_every_schedule_is_safe_on_gloo_and_nccl_as_the_engine_posts_it(schedule):
    for stages in range(1, 9):
        for micro_batches in range(1, 17):
            for backend in ("gloo", "nccl"):
                validate(schedule, stages, micro_batches, backend=backend)


@pytest.mark.parametrize("schedule", available_schedules())
def test_with_deepspeeds_blocking_posting_only_split_schedules_short_of_micro_batches_deadlock(schedule):
    """DeepSpeed's own handlers (partitioned or dynamically shaped activations) post one blocking transfer at a
    time. 1F1B and GPipe, on their clocks, pair every transfer within a step; the split schedules deadlock exactly
    when there are fewer micro-batches than stages, and the engine refuses those runs."""
    deadlocked = set()
    for stages in range(1, 9):
        for micro_batches in range(1, 17):
            try:
                validate(schedule, stages, micro_batches, posting="blocking")
            except ScheduleError:
                deadlocked.add((stages, micro_batches))
    expected = {(k, m) for k in range(1, 9) for m in range(1, 17) if m < k} if schedule in SPLIT else set()
    assert deadlocked == expected


def test_the_nccl_model_rejects_zb_h1_with_plain_sends_naming_who_waits_for_whom():
    validate(PlainSendZBH1, 4, 8, backend="gloo")  # on gloo a send does not wait, so this order is fine
    with pytest.raises(ScheduleError) as error:
        validate(PlainSendZBH1, 4, 8, backend="nccl")
    assert str(error.value).startswith(
        "deadlock (nccl: a send waits for its receive and a batch for all its transfers): stage 0, step 3, "
        "SendActivation(buffer_id=3) waits for stage 1; stage 1, step 2, SendActivation(buffer_id=2) waits for "
        "stage 2; stage 2, step 1, SendActivation(buffer_id=1) waits for stage 3; stage 3, step 1, "
        "SendGrad(buffer_id=0) waits for stage 2."
    )


def test_crossing_transfers_deadlock_on_nccl_unless_posted_together():
    validate(crossing(together=False), 2, 2, backend="gloo")
    with pytest.raises(ScheduleError, match=r"stage 0, step 3, SendActivation\(buffer_id=1\) waits for stage 1; "):
        validate(crossing(together=False), 2, 2, backend="nccl")
    validate(crossing(together=True), 2, 2, backend="nccl")


def test_on_nccl_a_stage_waits_for_its_sends_to_be_received():
    costs = {"forward": [1.0, 4.0], "backward": [2.0, 2.0]}  # stage 1 is slow to post its receives
    gloo, nccl = (simulate("zb-h1", 2, 6, costs, backend=backend) for backend in ("gloo", "nccl"))
    assert nccl.makespan >= gloo.makespan
    sends = [e for e in nccl.timeline if e.instruction is SendActivation and e.stage == 0]
    assert any(send.end > send.start for send in sends)
    assert all(e.end == e.start for e in gloo.timeline if e.instruction is SendActivation and e.stage == 0)


def engine(schedule, backend: str, batched: bool, monkeypatch, micro_batches: int = 8) -> SimpleNamespace:
    """What ``_check_transport`` reads of a SchedulePipelineEngine with 4 stages."""
    monkeypatch.setattr(pipeline_engine.dist, "get_backend", lambda: backend)
    return SimpleNamespace(
        schedule_cls=schedule, num_stages=4, micro_batches=micro_batches, _posts_in_batches=lambda: batched
    )


def test_the_engine_refuses_only_what_the_model_rejects(monkeypatch):
    check = SchedulePipelineEngine._check_transport
    for schedule in (OneFOneBSchedule, ZBH1Schedule, PlainSendZBH1):
        check(engine(schedule, "gloo", batched=True, monkeypatch=monkeypatch))
    for schedule in (OneFOneBSchedule, ZBH1Schedule):
        check(engine(schedule, "nccl", batched=True, monkeypatch=monkeypatch))
    check(engine(OneFOneBSchedule, "nccl", batched=False, monkeypatch=monkeypatch, micro_batches=2))
    check(engine(ZBH1Schedule, "gloo", batched=False, monkeypatch=monkeypatch, micro_batches=4))
    with pytest.raises(ValueError, match=r"PlainSendZBH1 cannot run on nccl, where a send waits for its receive: "):
        check(engine(PlainSendZBH1, "nccl", batched=True, monkeypatch=monkeypatch))
    with pytest.raises(
        ValueError,
        match=r"ZBH1Schedule cannot run with DeepSpeed's blocking send and receive .* "
        r"Use schedule '1f1b'",
    ):
        check(engine(ZBH1Schedule, "gloo", batched=False, monkeypatch=monkeypatch, micro_batches=3))
