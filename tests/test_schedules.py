"""The schedule registry, and the built-in schedules against DeepSpeed's own TrainSchedule."""

from __future__ import annotations

import pytest
from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    PipeSchedule,
    TrainSchedule,
)

from ds_pipe_ext.observe.simulation import validate
from ds_pipe_ext.schedules import (
    ComputeOrderSchedule,
    GPipeSchedule,
    OneFOneBSchedule,
    Pass,
    available_schedules,
    get_schedule,
    register_schedule,
)
from ds_pipe_ext.schedules import registry as schedule_registry

REGISTERED = "1f1b, 1f1b-split, deepspeed, dualpipev, gpipe, interleaved-1f1b, interleaved-zb, zb-h1, zb-v"

GRID = [(stages, micro_batches) for stages in range(1, 9) for micro_batches in range(1, 13)]


def instruction_stream(schedule: type[PipeSchedule], stages: int, micro_batches: int, stage: int) -> list[list[str]]:
    """Each step as the reprs of its instructions: class name and buffer id."""
    steps = schedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
    return [[repr(instruction) for instruction in step] for step in steps]


@pytest.mark.parametrize("stages, micro_batches", GRID)
def test_1f1b_emits_exactly_deepspeeds_train_schedule(stages, micro_batches):
    for stage in range(stages):
        ours = OneFOneBSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
        theirs = TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
        assert ours.num_pipe_buffers() == theirs.num_pipe_buffers()
        assert instruction_stream(OneFOneBSchedule, stages, micro_batches, stage) == instruction_stream(
            TrainSchedule, stages, micro_batches, stage
        )


@pytest.mark.parametrize("stages, micro_batches", GRID)
def test_gpipe_forwards_everything_then_backwards_in_reverse(stages, micro_batches):
    for stage in range(stages):
        schedule = GPipeSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
        instructions = [instruction for step in schedule for instruction in step]
        forwards = [i.buffer_id for i in instructions if isinstance(i, ForwardPass)]
        backwards = [i.buffer_id for i in instructions if isinstance(i, BackwardPass)]
        last_forward = max(n for n, i in enumerate(instructions) if isinstance(i, ForwardPass))
        first_backward = min(n for n, i in enumerate(instructions) if isinstance(i, BackwardPass))
        assert last_forward < first_backward
        assert forwards == list(range(micro_batches))
        assert backwards == list(reversed(range(micro_batches)))
        assert schedule.num_pipe_buffers() == max(2, micro_batches)  # DeepSpeed's engine allocates two at least


def test_names_are_case_insensitive():
    assert get_schedule("GPipe") is GPipeSchedule
    assert get_schedule("1F1B") is OneFOneBSchedule
    assert get_schedule("DeepSpeed") is TrainSchedule
    assert {"gpipe", "1f1b", "deepspeed"} <= set(available_schedules())


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown schedule 'pipedream'.*" + REGISTERED,
    ):
        get_schedule("pipedream")
    with pytest.raises(
        ValueError,
        match=REGISTERED,
    ):
        validate("pipedream", 2, 2)


@pytest.fixture
def registry(monkeypatch):
    """A registry the test may add to, restored afterwards."""
    monkeypatch.setattr(schedule_registry, "_REGISTRY", dict(schedule_registry._REGISTRY))


def test_the_decorator_registers_a_new_schedule(registry):
    @register_schedule("Forward-Order-GPipe")
    class ForwardOrderGPipe(ComputeOrderSchedule):
        """GPipe with backwards in forward order: still valid, as every stage uses the same order."""

        def order(self):
            forwards = [Pass("F", m) for m in range(self.micro_batches)]
            return forwards + [Pass("B", m) for m in range(self.micro_batches)]

    assert get_schedule("forward-order-gpipe") is ForwardOrderGPipe
    assert "forward-order-gpipe" in available_schedules()
    validate("FORWARD-ORDER-GPIPE", 3, 5)


def test_registration_refuses_clashes_and_non_schedules(registry):
    with pytest.raises(ValueError, match="already registered to GPipeSchedule"):
        register_schedule("GPIPE")(OneFOneBSchedule)
    with pytest.raises(ValueError, match="reserved for DeepSpeed's built-in TrainSchedule"):
        register_schedule("deepspeed")
    with pytest.raises(TypeError, match="needs a PipeSchedule subclass"):
        register_schedule("not-a-schedule")(dict)
    register_schedule("gpipe")(GPipeSchedule)  # registering the same class again is harmless
