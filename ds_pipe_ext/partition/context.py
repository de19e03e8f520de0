"""What a partition method may look at: the layers, the stage count, and what the user told the module."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..observe.simulation import simulate
from ..schedules import DEFAULT_SCHEDULE, Layout, get_schedule
from .costs import LayerCosts, LayerStats, count_layer_stats, shared_layer_costs
from .solver import StageCost

__all__ = ["PartitionContext", "SampleInput"]

SampleInput = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class PartitionContext:
    """Everything a partition method may use. ``layers`` and ``num_stages`` are always there; a method that needs
    more raises a ValueError naming the missing argument (see :meth:`require`).

    ``sample_input`` is the micro-batch the first stage receives (a tensor or tuple of tensors, or a function
    returning one); ``schedule`` the registered name the engine runs (``None``: the default, 1F1B);
    ``memory_budget`` is bytes per device; ``optimizer_state_bytes`` is per trainable parameter (Adam's two fp32
    moments: 8); ``seconds_per_byte`` is the link between stages (``None``: measured between the ranks, 0 in a
    single process); ``measure`` replaces :func:`ds_pipe_ext.partition.costs.measure_layer_costs`.
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
    repeats: int = 3
    virtual_stages: int = 1
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def schedule_name(self) -> str:
        """The schedule the partition plans for."""
        return (self.schedule or DEFAULT_SCHEDULE).lower()

    def simulated_schedule(self) -> type:
        """The schedule class the partition plans for, with this context's chunks per rank."""
        schedule = get_schedule(self.schedule_name)
        return schedule.with_chunks(self.virtual_stages) if self.virtual_stages > 1 else schedule

    @property
    def layout(self) -> Layout:
        """Which rank holds which stage."""
        return Layout(self.ranks, self.virtual_stages, getattr(self.simulated_schedule(), "placement", "loop"))

    @property
    def ranks(self) -> int:
        """Pipeline ranks: the stages over the chunks each holds."""
        return self.num_stages // self.virtual_stages

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
        if "sample" not in self._memo:
            sample = self.require("sample_input", "counting or measuring layer costs")
            self._memo["sample"] = sample() if callable(sample) else sample
        return self._memo["sample"]

    def stats(self) -> LayerStats:
        """Parameters, and FLOPs and activations if a sample input is given; no collectives, no compute."""
        if "stats" not in self._memo:
            sample = self.sample() if self.sample_input is not None else None
            self._memo["stats"] = count_layer_stats(self.layers, sample)
        return self._memo["stats"]

    def measured_costs(self) -> LayerCosts:
        """Measured seconds, equal on every rank. Collective: every rank must call it."""
        if "measured" not in self._memo:
            self._memo["measured"] = shared_layer_costs(self)
        return self._memo["measured"]

    def known_costs(self) -> LayerCosts | None:
        """The best costs available without a collective: measured if already measured, else counted FLOPs."""
        if "measured" in self._memo:
            return self._memo["measured"]
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

    def stage_memory(self) -> StageCost:
        """``bytes(stage, start, stop)``: parameters, gradients, optimizer state, and the activations the schedule
        keeps in flight on that stage (:meth:`in_flight` micro-batches of ``activation_bytes``)."""
        stats = self.stats()
        static = [
            p + g + self.optimizer_state_bytes * n for p, g, n in zip(stats.param_bytes, stats.grad_bytes, stats.params)
        ]
        prefix = [0]
        for value in static:
            prefix.append(prefix[-1] + value)
        in_flight = self.in_flight()
        return lambda stage, start, stop: (
            prefix[stop] - prefix[start] + in_flight[stage] * stats.activation_bytes(start, stop)
        )
