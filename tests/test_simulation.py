"""The validator accepts every real schedule and rejects broken ones; the simulator's timing matches pipeline theory."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
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
    TrainSchedule,
)

from ds_pipe_ext.engine import send_window
from ds_pipe_ext.observe.simulation import ScheduleError, ideal_bubble_fraction, simulate, validate
from ds_pipe_ext.schedules import Layout, available_schedules, get_schedule

GRID = [(stages, micro_batches) for stages in range(1, 7) for micro_batches in range(1, 13)]
END = [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]


def name_of(schedule: str | type[PipeSchedule]) -> str:
    return schedule if isinstance(schedule, str) else schedule.__name__


class Unknown(PipeInstruction):
    """An instruction the simulator has no spec for (as DeepSpeed 0.19.8's ``CommitP2P`` is)."""


LINKS = ((SendActivation, RecvActivation, +1), (SendGrad, RecvGrad, -1))


def layout_of(schedule: str, stages: int, micro_batches: int) -> Layout:
    return getattr(get_schedule(schedule)(micro_batches, stages, 0), "layout", None) or Layout(stages)


def sends_and_arrivals(timeline: list, layout: Layout, link: tuple[int, int], send: type, receive: type):
    """On one link between global stages, in order: when each send was posted, and when its tensor had arrived."""
    (sender, sender_chunk), (receiver, receiver_chunk) = layout.location(link[0]), layout.location(link[1])
    posted = sorted(e.start for e in timeline if (e.stage, e.chunk) == (sender, sender_chunk) and e.instruction is send)
    arrived = sorted(
        e.end for e in timeline if (e.stage, e.chunk) == (receiver, receiver_chunk) and e.instruction is receive
    )
    return posted, arrived


@pytest.mark.parametrize("schedule", available_schedules())
def test_the_send_the_engine_waits_for_has_always_arrived(schedule):
    """Before posting a send, SchedulePipelineEngine waits for the one ``send_window`` sends back on that link;
    under any pass times that one has arrived, so the engine never waits on its neighbour, as the simulator
    assumes. Without virtual stages the window is tight: one send fewer in flight would make some stage wait
    (with several chunks per rank a chunk's buffers can outnumber what one link keeps in flight)."""
    rng = random.Random(0)
    tight = False
    for stages, micro_batches in GRID:
        try:
            layout = layout_of(schedule, stages, micro_batches)
        except ValueError:  # a micro-batch count this schedule refuses
            continue
        for _ in range(2):
            costs = {key: [rng.uniform(0.1, 3.0) for _ in range(stages)] for key in ("forward", "backward", "send")}
            timeline = simulate(schedule, stages, micro_batches, costs).timeline
            for send, receive, direction in LINKS:
                for stage in range(layout.stages):
                    link = (stage, stage + direction)
                    if not 0 <= link[1] < layout.stages or layout.location(link[0])[0] == layout.location(link[1])[0]:
                        continue
                    posted, arrived = sends_and_arrivals(timeline, layout, link, send, receive)
                    window = send_window(get_schedule(schedule), micro_batches, stages, link)
                    assert all(arrived[k - window] <= posted[k] for k in range(window, len(posted)))
                    tight |= any(arrived[k - window + 1] > posted[k] for k in range(window - 1, len(posted)))
    assert tight or layout.chunks > 1


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", TrainSchedule], ids=name_of)
@pytest.mark.parametrize("forward, backward", [(1.0, 2.0), (1.5, 1.5)])
def test_uniform_costs_give_the_textbook_bubble_and_makespan(schedule, forward, backward):
    for stages, micro_batches in GRID:
        result = simulate(schedule, stages, micro_batches, {"forward": forward, "backward": backward})
        assert result.bubble_fraction == pytest.approx(ideal_bubble_fraction(stages, micro_batches), abs=1e-9)
        assert result.makespan == pytest.approx((micro_batches + stages - 1) * (forward + backward))


def test_peak_buffers_1f1b_holds_k_minus_s_gpipe_holds_m():
    for stages, micro_batches in GRID:
        one_f_one_b = simulate("1f1b", stages, micro_batches).peak_buffers
        assert one_f_one_b == [min(stages - stage, micro_batches) for stage in range(stages)]
        assert simulate("gpipe", stages, micro_batches).peak_buffers == [micro_batches] * stages


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_micro_batch_walks_down_and_back_up(schedule):
    forward, backward, send = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.25, 7.0]
    result = simulate(schedule, 3, 1, {"forward": forward, "backward": backward, "send": send})
    activations_sent, gradients_sent = sum(send[:-1]), sum(send[1:])  # a transfer costs what its sender's is
    assert result.makespan == pytest.approx(sum(forward) + sum(backward) + activations_sent + gradients_sent)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_timeline_respects_costs_and_dependencies(schedule):
    stages, micro_batches = 4, 6
    costs = {"forward": [1.0, 3.0, 1.0, 2.0], "backward": [2.0, 1.0, 4.0, 2.0], "send": [0.5, 0.25, 1.0, 0.0]}
    result = simulate(schedule, stages, micro_batches, costs)
    by_stage = [[e for e in result.timeline if e.stage == stage] for stage in range(stages)]
    for stage, events in enumerate(by_stage):
        assert all(later.start >= earlier.end for earlier, later in zip(events, events[1:]))
        for instruction, key in ((ForwardPass, "forward"), (BackwardPass, "backward")):
            work = [e for e in events if e.instruction is instruction]
            assert sorted(e.micro_batch for e in work) == list(range(micro_batches))
            assert all(e.end - e.start == costs[key][stage] for e in work)

    def compute(instruction, stage, micro_batch):
        return next(e for e in by_stage[stage] if e.instruction is instruction and e.micro_batch == micro_batch)

    for micro_batch in range(micro_batches):
        for stage in range(1, stages):
            arrival = compute(ForwardPass, stage - 1, micro_batch).end + costs["send"][stage - 1]
            assert compute(ForwardPass, stage, micro_batch).start >= arrival
            arrival = compute(BackwardPass, stage, micro_batch).end + costs["send"][stage]
            assert compute(BackwardPass, stage - 1, micro_batch).start >= arrival
    slowest = max(micro_batches * (f + b) for f, b in zip(costs["forward"], costs["backward"]))
    assert result.makespan >= slowest
    assert ideal_bubble_fraction(stages, micro_batches) < result.bubble_fraction < 1


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_sends_do_not_wait_and_receives_end_a_transfer_after_both_ends_posted(schedule):
    """On gloo: a send is posted and the stage goes on; the tensor arrives the sender's send cost after both ends
    have posted the transfer (each step of these schedules receives at most one tensor)."""
    send_cost = [0.5, 0.25, 0.0]
    result = simulate(schedule, 3, 4, {"send": send_cost})
    pairs = {send: (receive, direction) for send, receive, direction in LINKS}
    for send in (e for e in result.timeline if e.instruction in pairs):
        receive_class, peer = pairs[send.instruction]
        (receive,) = [
            e
            for e in result.timeline
            if e.instruction is receive_class and e.stage == send.stage + peer and e.micro_batch == send.micro_batch
        ]
        assert send.end == send.start
        assert receive.end == pytest.approx(max(receive.start, send.start) + send_cost[send.stage])


def scripted(program: Callable[[int], list[list[PipeInstruction]]], buffers: int) -> type[PipeSchedule]:
    """A schedule whose steps on stage s are ``program(s)``."""

    class Scripted(PipeSchedule):
        def steps(self):
            yield from program(self.stage_id)

        def num_pipe_buffers(self):
            return buffers

    return Scripted


def forward_then_backward(micro_batches: int, skip_backward: int = -1) -> list[list[PipeInstruction]]:
    """One stage alone, one buffer per micro-batch."""
    steps = [[LoadMicroBatch(m), ForwardPass(m)] for m in range(micro_batches)]
    return steps + [[BackwardPass(m)] for m in range(micro_batches) if m != skip_backward]


#: The last of two stages, two micro-batches: both forwards, then both backwards.
LAST_OF_TWO_STAGES = [
    [RecvActivation(0), LoadMicroBatch(0), ForwardPass(0)],
    [RecvActivation(1), LoadMicroBatch(1), ForwardPass(1)],
    [BackwardPass(0), SendGrad(0)],
    [BackwardPass(1), SendGrad(1), *END],
]

TWO_STAGE_FORWARDS = [[LoadMicroBatch(0), ForwardPass(0), SendActivation(0)], [LoadMicroBatch(1), ForwardPass(1)]]

BROKEN = [
    pytest.param(
        scripted(lambda s: forward_then_backward(2, skip_backward=1) + [END], buffers=2),
        1,
        2,
        r"stage 0, step 3, ReduceTiedGrads\(\): comes before the backward_input of micro-batch 1 "
        r"\(BackwardPass or BackwardInputPass\)",
        id="missing backward",
    ),
    pytest.param(
        scripted(lambda s: forward_then_backward(3, skip_backward=0), buffers=3),
        1,
        3,
        r"stage 0: the schedule never does the backward_input of micro-batch 0",
        id="missing backward, no end of batch",
    ),
    pytest.param(
        scripted(
            lambda s: (
                [
                    [LoadMicroBatch(0), ForwardPass(0), SendActivation(0)],
                    [RecvGrad(0), BackwardPass(0)],
                    [LoadMicroBatch(1), ForwardPass(1), SendActivation(1)],
                    [RecvGrad(1), BackwardPass(1), *END],
                ]
                if s == 0
                else LAST_OF_TWO_STAGES
            ),
            buffers=2,
        ),
        2,
        2,
        r"deadlock \(gloo, .*\): stage 0, step 1, RecvGrad\(buffer_id=0\) waits for stage 1; "
        r"stage 1, step 1, RecvActivation\(buffer_id=1\) waits for stage 0",
        id="deadlock",
    ),
    pytest.param(
        scripted(lambda s: [[LoadMicroBatch(0), ForwardPass(0)], [LoadMicroBatch(0), ForwardPass(0)]], buffers=1),
        1,
        2,
        r"step 1, ForwardPass\(buffer_id=0\): overwrites buffer 0's activation of micro-batch 0, "
        r"still needed for its backward_input, backward_weight",
        id="activation overwritten while needed",
    ),
    pytest.param(
        scripted(
            lambda s: (
                [
                    [LoadMicroBatch(0), ForwardPass(0), SendActivation(0)],
                    [LoadMicroBatch(1), ForwardPass(1), SendActivation(1)],
                ]
                if s == 0
                else [[RecvActivation(0), LoadMicroBatch(0), ForwardPass(0), BackwardPass(0)], [RecvActivation(0)]]
            ),
            buffers=2,
        ),
        2,
        2,
        r"stage 1, step 1, RecvActivation\(buffer_id=0\): overwrites buffer 0's received activation of "
        r"micro-batch 0, still needed for its send_grad",
        id="received activation overwritten while needed",
    ),
    pytest.param(
        scripted(lambda s: [*forward_then_backward(2), END], buffers=1),
        1,
        2,
        r"stage 0, step 1, LoadMicroBatch\(buffer_id=1\): buffer_id 1 is out of range: num_pipe_buffers\(\) is 1",
        id="buffer id out of range",
    ),
    pytest.param(
        scripted(
            lambda s: [*forward_then_backward(2, skip_backward=1), [OptimizerStep()], [BackwardPass(1)]], buffers=2
        ),
        1,
        2,
        r"stage 0, step 3, OptimizerStep\(\): comes before the backward_input of micro-batch 1",
        id="optimizer step before the last backward",
    ),
    pytest.param(
        scripted(lambda s: [*forward_then_backward(2, skip_backward=1), END, [BackwardPass(1)]], buffers=2),
        1,
        2,
        r"ReduceTiedGrads\(\): comes before",
        id="compute after the optimizer step",
    ),
    pytest.param(
        scripted(lambda s: forward_then_backward(2), buffers=2),
        1,
        2,
        r"stage 0: a batch must end with ReduceTiedGrads, ReduceGrads, OptimizerStep .*none of them",
        id="no end of batch",
    ),
    pytest.param(
        scripted(lambda s: [TWO_STAGE_FORWARDS[0], [BackwardPass(0)]] if s == 0 else [[RecvActivation(0)]], buffers=1),
        2,
        1,
        r"stage 0, step 1, BackwardPass\(buffer_id=0\): buffer 0 holds no received gradient",
        id="backward before its gradient arrived",
    ),
    pytest.param(
        scripted(lambda s: [[LoadMicroBatch(0), BackwardPass(0)]], buffers=1),
        1,
        1,
        r"BackwardPass\(buffer_id=0\): buffer 0 holds no activation",
        id="backward before forward",
    ),
    pytest.param(
        scripted(
            lambda s: (
                [
                    [LoadMicroBatch(0), ForwardPass(0), SendActivation(0)],
                    [LoadMicroBatch(1), ForwardPass(1), SendActivation(1)],
                    [RecvGrad(1), BackwardPass(1)],
                    [RecvGrad(0), BackwardPass(0), *END],
                ]
                if s == 0
                else LAST_OF_TWO_STAGES
            ),
            buffers=2,
        ),
        2,
        2,
        r"stage 0, step 2, RecvGrad\(buffer_id=1\): receives micro-batch 0's grad into buffer 1, "
        r"which holds the activation of micro-batch 1",
        id="gradient routed to the wrong buffer",
    ),
    pytest.param(
        scripted(lambda s: [[LoadMicroBatch(0), ForwardPass(0), SendActivation(0)]], buffers=1),
        1,
        1,
        r"SendActivation\(buffer_id=0\): stage 0 has no next stage",
        id="send from the last stage",
    ),
    pytest.param(
        scripted(lambda s: [[LoadMicroBatch(0)]], buffers=1),
        3,
        1,
        r"stage 1, step 0, LoadMicroBatch\(buffer_id=0\): stage 1 has no loaded micro-batch buffer",
        id="load on a middle stage",
    ),
    pytest.param(
        scripted(lambda s: [[LoadMicroBatch(0)], [LoadMicroBatch(0)]], buffers=1),
        1,
        1,
        r"loads more than the 1 micro-batches",
        id="too many loads",
    ),
    pytest.param(
        scripted(lambda s: [[Unknown()]], buffers=1),
        1,
        1,
        r"Unknown\(\): unknown instruction; describe Unknown in INSTRUCTION_SPECS",
        id="unknown instruction",
    ),
]


@pytest.mark.parametrize("schedule, stages, micro_batches, message", BROKEN)
def test_broken_schedules_are_rejected_with_the_reason(schedule, stages, micro_batches, message):
    with pytest.raises(ScheduleError, match=message):
        validate(schedule, stages, micro_batches)


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="registered schedule name or a PipeSchedule subclass"):
        validate(object, 2, 2)
    with pytest.raises(ValueError, match="at least one stage and one micro-batch"):
        validate("1f1b", 0, 2)
    with pytest.raises(ValueError, match="unknown cost 'recompute'; known costs: forward, backward, send"):
        simulate("1f1b", 2, 2, {"recompute": 1.0})
    with pytest.raises(ValueError, match="cost 'forward' has 3 values; give one number or one per stage \\(2\\)"):
        simulate("1f1b", 2, 2, {"forward": [1, 2, 3]})
    with pytest.raises(ValueError, match="negative"):
        simulate("1f1b", 2, 2, {"send": -1})
