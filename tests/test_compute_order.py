"""Compute orders and the one function that lowers them to DeepSpeed's instructions."""

from __future__ import annotations

import pytest
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)

from ds_pipe_ext.observe.simulation import ScheduleError, validate
from ds_pipe_ext.schedules import (
    BackwardInputPass,
    BackwardWeightPass,
    ComputeOrderSchedule,
    Pass,
    available_schedules,
    get_schedule,
    lower,
)
from ds_pipe_ext.schedules.compute_order import fewest_buffers
from ds_pipe_ext.schedules.layout import Layout

END = [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]


def layout(schedule, stages: int) -> Layout:
    return Layout(stages, schedule.chunks, schedule.placement)


COMPUTE_ORDERS = [name for name in available_schedules() if issubclass(get_schedule(name), ComputeOrderSchedule)]


def reprs(steps) -> list[list[str]]:
    return [[repr(instruction) for instruction in step] for step in steps]


def test_a_middle_stage_receives_before_and_sends_after_each_pass():
    order = [Pass("F", 0), Pass("F", 1), Pass("B", 1), Pass("B", 0)]
    steps = lower(order, 1, Layout(3), buffer_id=lambda p: p.micro_batch)
    assert reprs(steps) == reprs(
        [
            [RecvActivation(0), ForwardPass(0)],
            [RecvActivation(1), SendActivation(0), ForwardPass(1)],
            [RecvGrad(1), SendActivation(1), BackwardPass(1)],
            [SendGrad(1), RecvGrad(0), BackwardPass(0)],
            [SendGrad(0), *END],
        ]
    )


def test_the_first_and_last_stage_load_and_neither_talks_past_the_ends():
    order = [Pass("F", 0), Pass("I", 0), Pass("W", 0)]
    first = lower(order, 0, Layout(2), buffer_id=lambda p: 0)
    last = lower(order, 1, Layout(2), buffer_id=lambda p: 0)
    assert reprs(first) == reprs(
        [
            [LoadMicroBatch(0), ForwardPass(0)],
            [RecvGrad(0), SendActivation(0), BackwardInputPass(0)],
            [
                BackwardWeightPass(0),
                *END,
            ],
        ]
    )
    assert reprs(last) == reprs(
        [
            [RecvActivation(0), LoadMicroBatch(0), ForwardPass(0)],
            [BackwardInputPass(0)],
            [
                SendGrad(0),
                BackwardWeightPass(0),
                *END,
            ],
        ]
    )


def test_an_idle_step_still_sends_what_the_previous_pass_made():
    steps = lower([Pass("F", 0), None, None], 0, Layout(2), buffer_id=lambda p: 0)
    assert reprs(steps) == reprs([[LoadMicroBatch(0), ForwardPass(0)], [SendActivation(0)], [*END]])


def test_a_pass_kind_must_be_one_of_torchs_letters():
    with pytest.raises(ValueError, match="unknown pass kind 'X': use one of F, B, I, W"):
        Pass("X", 0)
    assert str(Pass("I", 3)) == "I3"


@pytest.mark.parametrize("name", COMPUTE_ORDERS)
def test_the_derived_buffer_count_is_the_fewest_that_is_valid(name):
    """With one buffer fewer than :func:`fewest_buffers` some stage overwrites a micro-batch still in use."""
    schedule = get_schedule(name)
    for stages in range(1, 5):
        for micro_batches in range(1, 9):
            try:
                schedule(micro_batches, stages, 0)
            except ValueError:  # too few micro-batches for this schedule
                continue
            counts = [
                fewest_buffers(schedule(micro_batches, stages, stage).order(), stage, layout(schedule, stages))
                for stage in range(stages)
            ]
            validate(schedule, stages, micro_batches)
            for tight in (stage for stage, count in enumerate(counts) if count > 1):

                class OneFewer(schedule):
                    buffers_per_chunk = property(
                        lambda self, tight=tight, counts=counts: counts[self.stage_id] - (self.stage_id == tight)
                    )

                with pytest.raises(ScheduleError, match="overwrites"):
                    validate(OneFewer, stages, micro_batches)
