"""What a partition method may look at: the layers, the stage count, and what the user told the module."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..observe.simulation import simulate
from ..schedules import AUTO_SCHEDULE, DEFAULT_SCHEDULE, Layout, get_schedule, schedule_name
from ..schedules.instructions import splits_backward
from .costs import LayerCosts, LayerStats, count_layer_stats, shared_layer_costs
from .solver import StageCost

__all__ = ["PartitionContext", "SampleInput"]

SampleInput = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class PartitionContext:
    """Everything a partition method may use. ``layers`` and ``num_stages`` are always there; a method that needs
    more raises a ValueError naming the missing argument (see :meth:`require`).

    ``sample_input`` is the micro-batch the first stage receives (a tensor or tuple of tensors, or a function
    returning one); ``schedule`` the registered name the engine runs (``None``: the default, 1F1B; ``"auto"``:
    the planner's choice); ``data_parallel_size`` the replicas of the pipeline, whose gradients are all-reduced
    every step; ``memory_budget`` is bytes per device; ``optimizer_state_bytes`` is per trainable parameter
    (Adam's two fp32 moments: 8); ``seconds_per_byte`` is the link between stages (``None``: measured between the
    ranks, 0 in a single process); ``repeats`` the measuring rounds; ``measure`` replaces
    :func:`ds_pipe_ext.partition.costs.measure_layer_costs`.
    """

    layers: Sequence[Any]
    num_stages: int  # stages in all: pipeline ranks x virtual stages
    sample_input: SampleInput | None = None
    micro_batches: int | None = None
    schedule: str | None = None
    memory_budget: float | None = None
    cache_path: str | os.PathLike | None = None
    measure: Callable[[PartitionContext], LayerCosts] | None = None
    device: str | torch.device = "cpu"
    optimizer_state_bytes: float = 8.0
    seconds_per_byte: float | None = None
    repeats: int = 5
    virtual_stages: int = 1
    data_parallel_size: int = 1
    #: What depends on the layers and the sample input alone (shared with every :meth:`variant`), and the rest.
    _shared: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def schedule_name(self) -> str:
        """The schedule the partition plans for."""
        return schedule_name(self.schedule or DEFAULT_SCHEDULE)  # csv:PATH keeps its path as written

    def simulated_schedule(self) -> type:
        """The schedule class the partition plans for, with this context's chunks per rank."""
        schedule = get_schedule(self.schedule_name)
        return schedule.with_chunks(self.virtual_stages) if self.virtual_stages > 1 else schedule

    @property
    def layout(self) -> Layout:
        """Which rank holds which stage."""
        if self.virtual_stages == 1:
            return Layout(self.ranks)
        return Layout(self.ranks, self.virtual_stages, getattr(self.simulated_schedule(), "placement", "loop"))

    @property
    def ranks(self) -> int:
        """Pipeline ranks: the stages over the chunks each holds."""
        return self.num_stages // self.virtual_stages

    @property
    def split_backward(self) -> bool:
        """Whether the schedule splits the backward into I and W passes (``"auto"`` may choose one that does), so
        that measuring should time both halves."""
        return self.schedule_name == AUTO_SCHEDULE or splits_backward(get_schedule(self.schedule_name))

    def variant(self, **changes: Any) -> PartitionContext:
        """A copy with another stage count (and chunks per rank), micro-batch count, schedule, data-parallel size or
        memory budget. What was counted or measured for these layers and this sample input does not depend on those,
        so the copy shares it instead of measuring again."""
        allowed = {"num_stages", "virtual_stages", "micro_batches", "schedule", "data_parallel_size", "memory_budget"}
        unknown = set(changes) - allowed
        if unknown:
            raise TypeError(f"variant() changes only the plan, not {', '.join(sorted(unknown))}")
        other = replace(self, **changes)
        other._shared = self._shared
        return other

    def choose_schedule(self, name: str, plan: Any = None) -> None:
        """Record the schedule an ``auto`` partition chose (and the plan it chose it with), for the module to run."""
        self._memo["chosen"] = (name, plan)

    @property
    def chosen_schedule(self) -> str | None:
        """The schedule an ``auto`` partition chose, if one did."""
        return self._memo.get("chosen", (None, None))[0]

    @property
    def chosen_plan(self) -> Any:
        """The plan an ``auto`` partition chose, if one did."""
        return self._memo.get("chosen", (None, None))[1]

    def require(self, name: str, needed_by: str) -> Any:
        """``self.<name>``, or a ValueError saying that ``needed_by`` needs it and what it is."""
        value = getattr(self, name)
        if value is None:
            hint = {
                "sample_input": "the micro-batch the first stage receives, e.g. sample_input=torch.zeros(8, 3, 224, "
                "224) or a function returning it",
                "micro_batches": "micro-batches per step, i.e. gradient accumulation steps",
            }.get(name, name)
            raise ValueError(f"{needed_by} needs {name}= ({hint})")
        return value

    def sample(self) -> Any:
        if "sample" not in self._shared:
            sample = self.require("sample_input", "counting or measuring layer costs")
            self._shared["sample"] = sample() if callable(sample) else sample
        return self._shared["sample"]

    def stats(self) -> LayerStats:
        """Parameters, and FLOPs and activations if a sample input is given; no collectives, no compute."""
        if "stats" not in self._shared:
            sample = self.sample() if self.sample_input is not None else None
            self._shared["stats"] = count_layer_stats(self.layers, sample)
        return self._shared["stats"]

    def measured_costs(self) -> LayerCosts:
        """Measured seconds, equal on every rank. Collective: every rank must call it."""
        if "measured" not in self._shared:
            self._shared["measured"] = shared_layer_costs(self)
        return self._shared["measured"]

    def known_costs(self) -> LayerCosts | None:
        """The best costs available without a collective: measured if already measured, else counted FLOPs."""
        if "measured" in self._shared:
            return self._shared["measured"]
        if self.sample_input is None:
            return None
        stats = self.stats()
        return LayerCosts.counted(stats.forward_flops, stats.backward_flops, unit="FLOP")

    def in_flight(self) -> list[int]:
        """Per (global) stage, the most micro-batches the schedule keeps forwarded but not yet backwarded (1F1B:
        min(K - s, M); GPipe: M), from the schedule simulator, so every registered schedule is covered."""
        if "in_flight" not in self._memo:
            micro_batches = self.micro_batches or self.ranks
            result = simulate(self.simulated_schedule(), self.ranks, micro_batches)
            self._memo["in_flight"] = result.peak_per_stage
        return self._memo["in_flight"]

    @property
    def depends_on_schedule(self) -> bool:
        """Whether the partition used the schedule's activations in flight (so another schedule needs another)."""
        return "in_flight" in self._memo

    def stage_memory(self, in_flight: Sequence[int] | None = None) -> StageCost:
        """``bytes(stage, start, stop)``: parameters, gradients, optimizer state, and the activations the schedule
        keeps in flight on that stage (``in_flight[stage]``, default :meth:`in_flight`, micro-batches of
        ``activation_bytes``)."""
        stats = self.stats()
        static = [
            p + g + self.optimizer_state_bytes * n for p, g, n in zip(stats.param_bytes, stats.grad_bytes, stats.params)
        ]
        prefix = [0]
        for value in static:
            prefix.append(prefix[-1] + value)
        in_flight = list(self.in_flight() if in_flight is None else in_flight)
        return lambda stage, start, stop: (
            prefix[stop] - prefix[start] + in_flight[stage] * stats.activation_bytes(start, stop)
        )
