"""Schedules by name: the one place a name becomes a ``PipeSchedule`` class.

``"deepspeed"`` is registered from the start as DeepSpeed's own ``TrainSchedule``: for the simulator, the pictures
and the partition planner it is that schedule; for :func:`ds_pipe_ext.initialize` it means DeepSpeed's untouched
engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from deepspeed.runtime.pipe.schedule import PipeSchedule, TrainSchedule

__all__ = [
    "DEEPSPEED_BUILTIN",
    "DEFAULT_SCHEDULE",
    "available_schedules",
    "get_schedule",
    "register_schedule",
    "schedule_name",
]

#: The name of DeepSpeed's untouched engine and its ``TrainSchedule``.
DEEPSPEED_BUILTIN = "deepspeed"
#: What runs when nobody chose: 1F1B, DeepSpeed's own order.
DEFAULT_SCHEDULE = "1f1b"

ScheduleClass = TypeVar("ScheduleClass", bound=type)

_REGISTRY: dict[str, type[PipeSchedule]] = {DEEPSPEED_BUILTIN: TrainSchedule}


def register_schedule(name: str) -> Callable[[ScheduleClass], ScheduleClass]:
    """Class decorator that makes a ``PipeSchedule`` subclass selectable by ``name`` (case-insensitive)."""
    key = name.lower()
    if key == DEEPSPEED_BUILTIN:
        raise ValueError(f"{name!r} is reserved for DeepSpeed's built-in TrainSchedule; pick another name")

    def register(cls: ScheduleClass) -> ScheduleClass:
        if not (isinstance(cls, type) and issubclass(cls, PipeSchedule)):
            raise TypeError(f"@register_schedule({name!r}) needs a PipeSchedule subclass, got {cls!r}")
        if _REGISTRY.get(key, cls) is not cls:
            raise ValueError(f"schedule {name!r} is already registered to {_REGISTRY[key].__qualname__}")
        _REGISTRY[key] = cls
        return cls

    return register


def schedule_name(name: str) -> str:
    """``name`` as registered (lower case), or a ValueError that lists the registered names."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown schedule {name!r}; registered: {', '.join(available_schedules())} "
            "(add one with @ds_pipe_ext.register_schedule)"
        )
    return key


def get_schedule(name: str) -> type[PipeSchedule]:
    """The schedule class registered under ``name`` (case-insensitive)."""
    return _REGISTRY[schedule_name(name)]


def available_schedules() -> list[str]:
    """Every registered name, ``deepspeed`` included, sorted."""
    return sorted(_REGISTRY)
