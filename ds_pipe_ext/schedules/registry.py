"""Schedules by name: the one place a name becomes a ``PipeSchedule`` class.

``"deepspeed"`` is registered from the start as DeepSpeed's own ``TrainSchedule``: for the simulator, the pictures
and the partition planner it is that schedule; for :func:`ds_pipe_ext.initialize` it means DeepSpeed's untouched
engine. ``"auto"`` is no schedule but a name for the planner's choice (:mod:`ds_pipe_ext.planner`); it is accepted
wherever a schedule is named and resolved to a registered one by :func:`ds_pipe_ext.config.resolve_schedule`.
A *source* (:func:`register_schedule_source`) names schedules that are not classes in the code: ``csv:PATH``, a
schedule read from a file, resolves here like any registered name, so nothing downstream needs to know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from deepspeed.runtime.pipe.schedule import PipeSchedule, TrainSchedule

__all__ = [
    "AUTO_SCHEDULE",
    "DEEPSPEED_BUILTIN",
    "DEFAULT_SCHEDULE",
    "ScheduleVariant",
    "available_schedules",
    "get_schedule",
    "register_schedule",
    "register_schedule_source",
    "schedule_name",
    "schedule_source",
    "schedule_variants",
]

#: The name of DeepSpeed's untouched engine and its ``TrainSchedule``.
DEEPSPEED_BUILTIN = "deepspeed"
#: What runs when nobody chose: 1F1B, DeepSpeed's own order.
DEFAULT_SCHEDULE = "1f1b"
#: Not a schedule: the name under which the planner chooses one.
AUTO_SCHEDULE = "auto"

ScheduleClass = TypeVar("ScheduleClass", bound=type)

_REGISTRY: dict[str, type[PipeSchedule]] = {DEEPSPEED_BUILTIN: TrainSchedule}
_SOURCES: dict[str, Callable[[str], type[PipeSchedule]]] = {}


def register_schedule(name: str) -> Callable[[ScheduleClass], ScheduleClass]:
    """Class decorator that makes a ``PipeSchedule`` subclass selectable by ``name`` (case-insensitive)."""
    key = name.lower()
    if key == DEEPSPEED_BUILTIN:
        raise ValueError(f"{name!r} is reserved for DeepSpeed's built-in TrainSchedule; pick another name")
    if key == AUTO_SCHEDULE:
        raise ValueError(f"{name!r} is reserved for the planner's choice of schedule; pick another name")
    if ":" in key:
        raise ValueError(f"schedule names contain no ':' (PREFIX:ARG names a schedule source), got {name!r}")

    def register(cls: ScheduleClass) -> ScheduleClass:
        if not (isinstance(cls, type) and issubclass(cls, PipeSchedule)):
            raise TypeError(f"@register_schedule({name!r}) needs a PipeSchedule subclass, got {cls!r}")
        if _REGISTRY.get(key, cls) is not cls:
            raise ValueError(f"schedule {name!r} is already registered to {_REGISTRY[key].__qualname__}")
        _REGISTRY[key] = cls
        return cls

    return register


def register_schedule_source(prefix: str, loader: Callable[[str], type[PipeSchedule]]) -> None:
    """Make ``PREFIX:ARG`` name the schedule class ``loader(ARG)`` returns, wherever a schedule is named.

    For schedules that live outside the code, such as ``csv:PATH`` (:mod:`.interchange`). The loader is called
    on every lookup, so it should cache; it raises a ValueError naming the fix for an ARG it cannot load.
    """
    key = prefix.lower()
    if not key or ":" in key or key in _REGISTRY or key == AUTO_SCHEDULE:
        raise ValueError(f"a schedule source prefix must be a new name without ':', got {prefix!r}")
    if _SOURCES.get(key, loader) is not loader:
        raise ValueError(f"schedule source {prefix!r} is already registered to {_SOURCES[key].__qualname__}")
    _SOURCES[key] = loader


def schedule_source(name: str) -> tuple[str, str] | None:
    """``(prefix, argument)`` when ``name`` is ``PREFIX:ARG`` of a registered source, else None."""
    prefix, colon, argument = name.partition(":")
    if not colon or prefix.lower() not in _SOURCES:
        return None
    if not argument:
        raise ValueError(f"schedule {name!r} names no {prefix.lower()} source: write {prefix.lower()}:PATH")
    return prefix.lower(), argument


def schedule_name(name: str) -> str:
    """``name`` as registered (lower case; ``"auto"`` included; a source's prefix lower case and its argument as
    given), or a ValueError that lists the registered names."""
    source = schedule_source(name)
    if source is not None:
        return ":".join(source)
    key = name.lower()
    if key not in _REGISTRY and key != AUTO_SCHEDULE:
        raise ValueError(
            f"unknown schedule {name!r}; registered: {', '.join(available_schedules())}, or 'auto' for the "
            f"planner's choice{''.join(f', or {prefix}:PATH' for prefix in sorted(_SOURCES))} (add one with "
            "@ds_pipe_ext.register_schedule)"
        )
    return key


def get_schedule(name: str) -> type[PipeSchedule]:
    """The schedule class registered under ``name`` (case-insensitive), or loaded by its source."""
    source = schedule_source(name)
    if source is not None:
        return _SOURCES[source[0]](source[1])
    key = schedule_name(name)
    if key == AUTO_SCHEDULE:
        raise ValueError(
            "schedule 'auto' is chosen by the planner together with the partition: use partition_method='auto' "
            "(or name a registered schedule)"
        )
    return _REGISTRY[key]


#: One way to run a schedule: its knobs (empty for a schedule without any) and the class that runs with them.
ScheduleVariant = tuple[Mapping[str, Any], type[PipeSchedule]]


def schedule_variants(name: str, stages: int, micro_batches: int) -> list[ScheduleVariant]:
    """The versions of schedule ``name`` a planner should try for ``stages`` and ``micro_batches``.

    A schedule with knobs (say, virtual stages per rank) declares them with a classmethod
    ``variants(stages, micro_batches)`` returning ``(knobs, class)`` pairs, each class a subclass that runs with
    those knobs; a schedule without one is tried once, as it is. So a new schedule joins every plan search by
    registering, and one with knobs by saying which values are worth trying.
    """
    schedule = get_schedule(name)
    declared: Callable[[int, int], Iterable[ScheduleVariant]] | None = getattr(schedule, "variants", None)
    if declared is None:
        return [({}, schedule)]
    return [(dict(knobs), variant) for knobs, variant in declared(stages, micro_batches)]


def available_schedules() -> list[str]:
    """Every registered name, ``deepspeed`` included, sorted."""
    return sorted(_REGISTRY)
