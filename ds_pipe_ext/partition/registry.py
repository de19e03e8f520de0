"""Partition methods by name: the one place a ``partition_method`` string becomes a method.

A method is a function ``(ctx, arg) -> boundaries`` registered with :func:`register_partition_method`;
``"name:arg"`` passes ``arg``. Boundaries are ``[0, b1, ..., n]``: stage ``s`` runs layers ``b[s]`` to ``b[s+1]-1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..schedules import AUTO_SCHEDULE
from .context import PartitionContext
from .solver import check_boundaries, check_stage_count

__all__ = [
    "PartitionMethod",
    "PartitionSpec",
    "available_partition_methods",
    "get_partition_method",
    "register_partition_method",
]

PartitionFn = Callable[[PartitionContext, str | None], Sequence[int]]
CheckFn = Callable[[PartitionContext, str | None], None]


@dataclass(frozen=True)
class PartitionMethod:
    """A registered method: ``fn(ctx, arg)`` returns boundaries; ``check(ctx, arg)``, if given, rejects bad input
    cheaply and before any process group exists; ``prefix`` methods take ``name:arg``, the others no argument;
    ``chooses_schedule`` methods pick the schedule too (``schedule="auto"``) and record it in the context."""

    name: str
    fn: PartitionFn
    prefix: bool = False
    check: CheckFn | None = None
    chooses_schedule: bool = False


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``"name"`` or ``"name:arg"``, ready to check and run."""

    method: PartitionMethod
    arg: str | None = None

    def __str__(self) -> str:
        return self.method.name if self.arg is None else f"{self.method.name}:{self.arg}"

    def check(self, ctx: PartitionContext) -> None:
        """Everything that can be wrong with the spec, the stage count and the inputs, without measuring."""
        if ctx.virtual_stages > 1 and ctx.num_stages > len(ctx.layers):
            layers, ranks, chunks = len(ctx.layers), ctx.ranks, ctx.virtual_stages
            fix = (
                f"use virtual_stages={layers // ranks} or fewer"
                if layers // ranks > 1
                else f"use at most {layers // chunks} pipeline ranks with {chunks} virtual stages each"
                if layers >= chunks
                else "use a schedule without virtual stages"
            )
            raise ValueError(
                f"cannot cut {layers} layers into {ranks} rank{'s' * (ranks > 1)} x {chunks} virtual stages = "
                f"{ctx.num_stages} non-empty stages: {fix}"
            )
        check_stage_count(ctx.num_stages, len(ctx.layers))
        if ctx.schedule_name == AUTO_SCHEDULE and not self.method.chooses_schedule:
            choosers = [m.name for m in _METHODS.values() if m.chooses_schedule]
            raise ValueError(
                f"schedule 'auto' is chosen together with the partition, which {str(self)!r} does not do: use "
                f"partition_method={(choosers or ['auto'])[0]!r}, or name a schedule"
            )
        if self.method.check is not None:
            self.method.check(ctx, self.arg)

    def __call__(self, ctx: PartitionContext) -> list[int]:
        self.check(ctx)
        boundaries = [int(b) for b in self.method.fn(ctx, self.arg)]
        check_boundaries(boundaries, len(ctx.layers), ctx.num_stages, source=f"partition method {str(self)!r}")
        return boundaries


_METHODS: dict[str, PartitionMethod] = {}


def register_partition_method(
    name: str, *, prefix: bool = False, check: CheckFn | None = None, chooses_schedule: bool = False
) -> Callable[[PartitionFn], PartitionFn]:
    """Decorator: make ``fn(ctx, arg) -> boundaries`` selectable as ``name`` (case-insensitive), or as
    ``name:arg`` with ``prefix=True``. ``check(ctx, arg)`` runs first, on every rank, before process groups exist.
    ``chooses_schedule``: the method also picks the schedule when it is ``"auto"`` (``ctx.choose_schedule``)."""
    key = name.lower()
    if not key or ":" in key:
        raise ValueError(f"partition method names must be non-empty and contain no ':', got {name!r}")

    def register(fn: PartitionFn) -> PartitionFn:
        if key in _METHODS and _METHODS[key].fn is not fn:
            raise ValueError(f"partition method {key!r} is already registered to {_METHODS[key].fn.__qualname__}")
        _METHODS[key] = PartitionMethod(key, fn, prefix, check, chooses_schedule)
        return fn

    return register


def available_partition_methods() -> list[str]:
    """Registered names, in registration order (DeepSpeed's first)."""
    return list(_METHODS)


def get_partition_method(spec: str) -> PartitionSpec:
    """Parse ``"name"`` or ``"name:arg"``; a ValueError lists the registered methods for an unknown name."""
    if not isinstance(spec, str):
        raise ValueError(f"partition method must be a string such as 'parameters', got {spec!r}")
    name, colon, arg = spec.partition(":")
    method = _METHODS.get(name.strip().lower())
    if method is None:
        choices = ", ".join(f"{m.name}:ARG" if m.prefix else m.name for m in _METHODS.values())
        raise ValueError(
            f"unknown partition method {spec!r}; registered: {choices} "
            "(add one with @ds_pipe_ext.register_partition_method)"
        )
    if method.prefix and not arg:
        raise ValueError(f"partition method {method.name!r} needs an argument: {method.name}:ARG")
    if not method.prefix and colon:
        raise ValueError(f"partition method {method.name!r} takes no argument, got {spec!r}")
    return PartitionSpec(method, arg if colon else None)
