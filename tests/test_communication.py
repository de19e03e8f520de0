"""Transfers that cannot deadlock: the models of gloo and NCCL, over the engine's channels, one shared channel
and DeepSpeed's blocking handlers, and the engine's check.

NCCL cannot run here (no machine with two GPUs), so safety on it is shown on a model of its ordering: on a process
group, the transfers between two ranks run in the order they were posted, the k-th send meets the k-th receive,
and a send completes only once its receive is posted.
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
    get_schedule,
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


def supported(schedule: str, stages: int, micro_batches: int) -> bool:
    try:
        get_schedule(schedule)(micro_batches, stages, 0)
    except ValueError:  # e.g. dualpipev with fewer than 2K micro-batches: refused, with the reason
        return False
    return True


@pytest.mark.parametrize("schedule", available_schedules())
def test_every_schedule_is_safe_on_gloo_and_nccl_over_the_engines_channels(schedule):
    for stages in range(1, 9):
        for micro_batches in range(1, 17):
            if supported(schedule, stages, micro_batches):
                for backend in ("gloo", "nccl"):
                    validate(schedule, stages, micro_batches, backend=backend)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb-h1", "interleaved-1f1b", "zb-v", "dualpipev"])
def test_over_the_engines_channels_nccl_costs_nothing(schedule):
    """Each direction of each link has its own channel, so a send never holds up another kind of transfer: the
    timeline on nccl is gloo's."""
    costs = {"forward": [1.0, 2.5, 1.5], "backward": [2.0, 3.0, 1.0], "send": [0.3, 0.1, 0.2]}
    gloo, nccl = (simulate(schedule, 3, 6, costs, backend=backend).timeline for backend in ("gloo", "nccl"))
    assert gloo == nccl


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "interleaved-1f1b", "interleaved-zb", "zb-v", "dualpipev"])
def test_one_shared_channel_deadlocks_on_nccl(schedule):
    """What the per-link channels avoid: on one process group for all transfers a stage that posted a send ahead of
    a receive from the same neighbour waits for that neighbour, which posted the opposite. With the v placement two
    kinds of tensor go from one rank to the other, and on one channel even gloo hands a receive the wrong one."""
    with pytest.raises(ScheduleError, match=r"deadlock \(nccl, one process group for all transfers"):
        validate(schedule, 4, 8, backend="nccl", transport="shared")
    if get_schedule(schedule).placement == "v":
        with pytest.raises(ScheduleError, match=r"RecvGrad\(.*\) meets SendActivation\(.*must pair up in order"):
            validate(schedule, 4, 8, backend="gloo", transport="shared")
    else:
        validate(schedule, 4, 8, backend="gloo", transport="shared")


NON_VIRTUAL = [name for name in available_schedules() if getattr(get_schedule(name), "chunks", 1) == 1]


@pytest.mark.parametrize("schedule", NON_VIRTUAL)
def test_with_deepspeeds_blocking_handlers_only_split_schedules_short_of_micro_batches_deadlock(schedule):
    """DeepSpeed's own handlers (partitioned or dynamically shaped activations) post one blocking transfer at a
    time. 1F1B and GPipe, on their clocks, pair every transfer within a step; the split schedules deadlock exactly
    when there are fewer micro-batches than stages, and the engine refuses those runs."""
    deadlocked = set()
    for stages in range(1, 9):
        for micro_batches in range(1, 17):
            try:
                validate(schedule, stages, micro_batches, transport="blocking")
            except ScheduleError:
                deadlocked.add((stages, micro_batches))
    expected = {(k, m) for k in range(1, 9) for m in range(1, 17) if m < k} if schedule in SPLIT else set()
    assert deadlocked == expected


def test_the_nccl_model_rejects_zb_h1_with_plain_sends_on_one_channel_naming_who_waits_for_whom():
    validate(PlainSendZBH1, 4, 8, backend="gloo", transport="shared")  # on gloo a send does not wait
    validate(PlainSendZBH1, 4, 8, backend="nccl")  # on the engine's channels neither does it hold anything up
    with pytest.raises(ScheduleError) as error:
        validate(PlainSendZBH1, 4, 8, backend="nccl", transport="shared")
    assert str(error.value).startswith(
        "deadlock (nccl, one process group for all transfers, posted without waiting): stage 0, step 4, "
        "RecvGrad(buffer_id=0) waits for stage 1 (queued on their channel behind SendActivation(buffer_id=3)); "
        "stage 1, step 3, RecvGrad(buffer_id=0) waits for stage 2 (queued on their channel behind "
        "SendActivation(buffer_id=2)); stage 2, step 2, RecvGrad(buffer_id=0) waits for stage 3 (queued on their "
        "channel behind SendActivation(buffer_id=1)); stage 3, step 2, RecvActivation(buffer_id=1) waits for stage 2 "
        "(queued on their channel behind SendGrad(buffer_id=0))."
    )


def test_crossing_transfers_deadlock_on_one_nccl_channel_and_not_on_the_engines():
    for together in (False, True):
        validate(crossing(together), 2, 2, backend="gloo", transport="shared")
        validate(crossing(together), 2, 2, backend="nccl")
    crossed = r"stage 0, step 4, RecvGrad\(buffer_id=0\) waits for stage 1 \(queued on their channel behind Send"
    with pytest.raises(ScheduleError, match=crossed):
        validate(crossing(together=False), 2, 2, backend="nccl", transport="shared")


class ReceivesFirst(PipeSchedule):
    """Stage 0 waits for the gradient of the activation it has not sent yet: a deadlock on any transport."""

    def steps(self):
        if self.stage_id == 0:
            yield from [[LoadMicroBatch(0), ForwardPass(0)], [RecvGrad(0)], [SendActivation(0)], [BackwardPass(0)]]
        else:
            yield from [[RecvActivation(0), LoadMicroBatch(0), ForwardPass(0), BackwardPass(0)], [SendGrad(0)]]
        yield END

    def num_pipe_buffers(self):
        return 1


def engine(schedule, backend: str, own_transfers: bool, monkeypatch, micro_batches: int = 8) -> SimpleNamespace:
    """What ``_check_transport`` reads of a SchedulePipelineEngine with 4 stages (2 for ReceivesFirst)."""
    monkeypatch.setattr(pipeline_engine.dist, "get_backend", lambda: backend)
    return SimpleNamespace(
        schedule_cls=schedule,
        num_stages=2 if schedule is ReceivesFirst else 4,
        micro_batches=1 if schedule is ReceivesFirst else micro_batches,
        _posts_own_transfers=lambda: own_transfers,
    )


def test_the_engine_refuses_only_what_the_model_rejects(monkeypatch):
    check = SchedulePipelineEngine._check_transport
    for schedule in (OneFOneBSchedule, ZBH1Schedule, PlainSendZBH1):
        for backend in ("gloo", "nccl"):
            check(engine(schedule, backend, own_transfers=True, monkeypatch=monkeypatch))
    check(engine(OneFOneBSchedule, "nccl", own_transfers=False, monkeypatch=monkeypatch, micro_batches=2))
    check(engine(ZBH1Schedule, "gloo", own_transfers=False, monkeypatch=monkeypatch, micro_batches=4))
    with pytest.raises(ValueError, match=r"ReceivesFirst cannot run on nccl: deadlock .* Use schedule '1f1b'"):
        check(engine(ReceivesFirst, "nccl", own_transfers=True, monkeypatch=monkeypatch))
    with pytest.raises(ValueError, match=r"ZBH1Schedule cannot run with DeepSpeed's blocking send and receive .* "):
        check(engine(ZBH1Schedule, "gloo", own_transfers=False, monkeypatch=monkeypatch, micro_batches=3))


def test_the_channels_take_the_jobs_timeout(single_rank_group):
    """The channels are new groups, which torch gives its own default; they take the one the job was started with
    (DeepSpeed's default here), read from the default group."""
    from deepspeed.constants import default_pg_timeout

    from ds_pipe_ext.engine.channels import job_timeout

    assert job_timeout() == default_pg_timeout
