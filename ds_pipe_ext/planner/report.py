"""A plan search as text: the ranked plans side by side, what did not fit, and how to run each listed plan."""

from __future__ import annotations

import json
from collections.abc import Callable

from ..partition.report import format_cost
from .search import Plan, PlanSearch, byte_size

__all__ = ["format_plans"]


def format_plans(search: PlanSearch, top: int = 10, command: Callable[[Plan], str | None] = lambda plan: None) -> str:
    """The ``top`` fastest plans that fit (0: all), one row each (predicted step, samples/s, bubble, memory per
    rank of each stage, spread), which of them the measurement cannot tell apart, the lightest plan over budget,
    and for each listed plan its DeepSpeed config keys and ``command(plan)`` (or the module arguments)."""
    listed = search.plans if top <= 0 else search.plans[:top]
    rows = [("#", "stages x replicas", "micro-batches", "schedule", "boundaries", "step", "samples/s", "bubble")]
    rows[0] += ("spread", "memory per rank, by stage")
    for index, plan in enumerate(listed, 1):
        knobs = "".join(f" {key}={value}" for key, value in plan.knobs.items())
        knobs += f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else ""
        rate = plan.samples_per_second
        rows.append(
            (
                str(index),
                f"{plan.stages} x {plan.data_parallel}",
                f"{plan.micro_batches} x {plan.micro_batch_size}",
                plan.schedule + knobs,
                ",".join(map(str, plan.boundaries)),
                format_cost(plan.step_time, plan.cost_unit),
                "-" if rate is None else f"{rate:.1f}",
                f"{100 * plan.bubble:.1f}%",
                "-" if plan.spread is None else f"{100 * plan.spread:.1f}%",
                ", ".join(byte_size(nbytes) for nbytes in plan.stage_memory),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(search.plans) > len(listed):
        lines.append(f"... and {len(search.plans) - len(listed)} slower plans that fit")
    near = search.near_best()
    if len(near) > 1:
        lines.append(
            f"plans 1-{len(near)} are within the measurement's spread of the best: a toss-up on this measurement"
        )
    if search.over_budget:
        lightest = search.over_budget[0]
        lines.append(
            f"over the budget of {byte_size(search.budget or 0)} per rank: {len(search.over_budget)} more "
            f"combinations; the lightest needs {byte_size(lightest.peak_memory)} ({lightest.describe()})"
        )
    for index, plan in enumerate(listed, 1):
        lines.append(f"#{index}: DeepSpeed config keys {json.dumps(plan.ds_config())}")
        launch = command(plan)
        lines.append(f"    {launch}" if launch else f"    ds_pipe_ext.PipelineModule(..., **{plan.module_kwargs()})")
    return "\n".join(lines)
