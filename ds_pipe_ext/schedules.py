"""Training schedules for DeepSpeed's pipeline engine, chosen by name.

A schedule is a DeepSpeed ``PipeSchedule``: for one stage it yields steps, each a list of DeepSpeed's own
instructions, which the engine executes in order. Writing a new one takes a ``steps()`` generator, an honest
``num_pipe_buffers()`` and ``@register_schedule("name")``; :func:`validate` checks it before it runs.
"""

from __future__ import annotations

from typing import Callable, TypeVar

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
)

from ds_pipe_ext.simulation import ScheduleError, SimulationResult, TimelineEvent, simulate, validate

__all__ = [
    "GPipeSchedule",
    "OneFOneBSchedule",
    "ScheduleError",
    "SimulationResult",
    "TimelineEvent",
    "available_schedules",
    "get_schedule",
    "register_schedule",
    "simulate",
    "validate",
]

ScheduleClass = TypeVar("ScheduleClass", bound=type)

_REGISTRY: dict[str, type[PipeSchedule]] = {}
_RESERVED = "deepspeed"  # the engine's name for DeepSpeed's untouched built-in TrainSchedule


def register_schedule(name: str) -> Callable[[ScheduleClass], ScheduleClass]:
    """Class decorator that makes a ``PipeSchedule`` subclass selectable by ``name`` (case-insensitive)."""
    key = name.lower()
    if key == _RESERVED:
        raise ValueError(f"{name!r} is reserved for DeepSpeed's built-in TrainSchedule; pick another name")

    def register(cls: ScheduleClass) -> ScheduleClass:
        if not (isinstance(cls, type) and issubclass(cls, PipeSchedule)):
            raise TypeError(f"@register_schedule({name!r}) needs a PipeSchedule subclass, got {cls!r}")
        if _REGISTRY.get(key, cls) is not cls:
            raise ValueError(f"schedule {name!r} is already registered to {_REGISTRY[key].__qualname__}")
        _REGISTRY[key] = cls
        return cls

    return register


def get_schedule(name: str) -> type[PipeSchedule]:
    """The schedule class registered under ``name`` (case-insensitive)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown schedule {name!r}; registered: {', '.join(available_schedules())} "
            "(add one with @ds_pipe_ext.register_schedule)"
        ) from None


def available_schedules() -> list[str]:
    return sorted(_REGISTRY)


@register_schedule("1f1b")
class OneFOneBSchedule(PipeSchedule):
    """1F1B (PipeDream-Flush): after a warm-up of forwards, each stage alternates one forward and one backward.

    Emits exactly DeepSpeed's ``TrainSchedule`` stream, from a closed form: on a clock of 2(M+K-1) steps, stage s
    forwards micro-batch m at step s + 2m and backwards it at step 2K-1-s + 2m, so a micro-batch moves one stage per
    step and forward and backward steps alternate. Each step first trades with the neighbours what the previous step
    produced (a forward step sends the input gradient of the last backward and receives its own input; a backward
    step receives its own gradient and sends the output of the last forward): neighbours are always on steps of
    opposite kind, so every send meets its receive in the same step. A stage holds at most K - s micro-batches.
    """

    def steps(self):
        total_steps = 2 * (self.micro_batches + self.stages - 1)
        for step in range(total_steps):
            micro_batch, is_forward = self._work_at(step)
            previous, _ = self._work_at(step - 1)
            cmds: list[PipeInstruction] = []
            if is_forward:
                if self._valid_micro_batch(previous) and not self.is_first_stage:
                    cmds.append(SendGrad(self._buffer_idx(previous)))
                if self._valid_micro_batch(micro_batch) and not self.is_first_stage:
                    cmds.append(RecvActivation(self._buffer_idx(micro_batch)))
            else:
                if self._valid_micro_batch(micro_batch) and not self.is_last_stage:
                    cmds.append(RecvGrad(self._buffer_idx(micro_batch)))
                if self._valid_micro_batch(previous) and not self.is_last_stage:
                    cmds.append(SendActivation(self._buffer_idx(previous)))
            if self._valid_micro_batch(micro_batch):
                buffer = self._buffer_idx(micro_batch)
                if is_forward and (self.is_first_stage or self.is_last_stage):
                    cmds.append(LoadMicroBatch(buffer))
                cmds.append(ForwardPass(buffer) if is_forward else BackwardPass(buffer))
            if step == total_steps - 1:
                cmds.extend([ReduceTiedGrads(), ReduceGrads(), OptimizerStep()])
            yield cmds

    def num_pipe_buffers(self) -> int:
        """K - s micro-batches are in flight at most; two buffers at least, as DeepSpeed allocates them."""
        return max(2, min(self.stages - self.stage_id, self.micro_batches))

    def _work_at(self, step: int) -> tuple[int, bool]:
        """The micro-batch this stage works on at ``step`` (maybe out of range: idle) and whether it is a forward."""
        if (step + self.stage_id) % 2 == 0:
            return (step - self.stage_id) // 2, True
        return (step - (2 * self.stages - 1 - self.stage_id)) // 2, False


@register_schedule("gpipe")
class GPipeSchedule(PipeSchedule):
    """GPipe (Huang et al., 2019): every micro-batch forward through the stage, then every micro-batch backward.

    All M micro-batches are in flight at the turn, so the stage needs M buffers, and the engine must keep a loss and
    a received gradient per buffer. Backwards run in reverse micro-batch order, GPipe's and autograd's order, so the
    last stage starts with the micro-batch it forwarded last. Any order shared by all stages would keep the links
    matched: stage s+1's k-th SendGrad meets stage s's k-th RecvGrad, both for the k-th micro-batch of that order.
    One micro-batch per step keeps each step atomic: its sends and receives meet the neighbours' in the same step.
    """

    def steps(self):
        for micro_batch in range(self.micro_batches):
            yield self._forward(micro_batch)
        for micro_batch in reversed(range(self.micro_batches)):
            cmds = self._backward(micro_batch)
            if micro_batch == 0:
                cmds.extend([ReduceTiedGrads(), ReduceGrads(), OptimizerStep()])
            yield cmds

    def num_pipe_buffers(self) -> int:
        return self.micro_batches

    def _forward(self, micro_batch: int) -> list[PipeInstruction]:
        cmds: list[PipeInstruction] = []
        if not self.is_first_stage:
            cmds.append(RecvActivation(micro_batch))
        if self.is_first_stage or self.is_last_stage:
            cmds.append(LoadMicroBatch(micro_batch))
        cmds.append(ForwardPass(micro_batch))
        if not self.is_last_stage:
            cmds.append(SendActivation(micro_batch))
        return cmds

    def _backward(self, micro_batch: int) -> list[PipeInstruction]:
        cmds: list[PipeInstruction] = []
        if not self.is_last_stage:
            cmds.append(RecvGrad(micro_batch))
        cmds.append(BackwardPass(micro_batch))
        if not self.is_first_stage:
            cmds.append(SendGrad(micro_batch))
        return cmds


# Registered here so that every ``get_schedule`` caller sees it; the module imports this one, hence at the end.
import ds_pipe_ext.zero_bubble  # noqa: E402, F401
