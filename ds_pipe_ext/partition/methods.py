"""The partition methods: DeepSpeed's, with DeepSpeed's exact results, and the ones ds_pipe_ext adds.

DeepSpeed's ``PipelineModule`` knows ``uniform``, ``parameters`` and ``type:REGEX``. The methods added here
(``manual:``, weighted ``type:``, ``flops``, ``memory``, ``profile``) all cut with the exact min-max solver
(:mod:`.solver`). A new method is one function and ``@register_partition_method("name")``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec
from torch import nn

from .context import PartitionContext
from .registry import register_partition_method
from .solver import balance, check_boundaries, fastest_split_within, min_max_split

__all__ = ["fastest_measured_split", "layer_type_name"]


def layer_type_name(layer: Any) -> str | None:
    """The name ``type:`` matches, as DeepSpeed's ``_find_layer_type`` sees it (``None``: it skips the layer)."""
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


@register_partition_method("uniform")
def _uniform(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    return ds_utils.partition_uniform(num_items=len(ctx.layers), num_parts=ctx.num_stages)


@register_partition_method("parameters")
def _parameters(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    # DeepSpeed's _count_layer_params, including its real builds of LayerSpecs (and the random numbers they draw,
    # so that the model built afterwards gets the same weights as under DeepSpeed's own PipelineModule).
    counts = []
    for layer in ctx.layers:
        module = layer.build() if isinstance(layer, LayerSpec) else layer
        trainable = module.parameters() if isinstance(module, nn.Module) else ()
        counts.append(sum(p.numel() for p in trainable if p.requires_grad))
    return ds_utils.partition_balanced(weights=counts, num_parts=ctx.num_stages)


def _type_terms(arg: str) -> list[tuple[re.Pattern, float]] | None:
    """``conv:3|linear:1`` as (regex, weight) pairs; ``None`` for DeepSpeed's plain ``type:REGEX``.

    The argument is weighted when any ``|``-separated term ends in ``:<number>``; terms without one weigh 1. So
    ``type:conv|linear`` stays DeepSpeed's regex alternation with DeepSpeed's result.
    """
    terms = []
    weighted = False
    for term in arg.split("|"):
        pattern, colon, weight = term.rpartition(":")
        try:
            value = float(weight) if colon else None
        except ValueError:
            value = None
        if value is None:
            pattern, value = term, 1.0
        else:
            weighted = True
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"type: weight {weight!r} of {pattern!r} must be a finite number >= 0")
        try:
            terms.append((re.compile(pattern, re.IGNORECASE), value))
        except re.error as error:
            raise ValueError(f"type: {pattern!r} is not a valid regular expression ({error})") from None
    return terms if weighted else None


def _type_weights(ctx: PartitionContext, arg: str) -> tuple[list[float], bool]:
    """Per-layer weights of ``type:arg`` and whether the argument was weighted."""
    names = [layer_type_name(layer) for layer in ctx.layers]
    terms = _type_terms(arg)
    weighted = terms is not None
    if not weighted:
        # DeepSpeed lower-cases the method and keeps what follows the first ':' up to the next one.
        terms = [(re.compile(arg.lower().split(":")[0], re.IGNORECASE), 1.0)]
    known = sorted({name for name in names if name})
    for pattern, _ in terms:
        if not any(name and pattern.search(name) for name in names):
            raise ValueError(
                f"type: {pattern.pattern!r} matches no layer; the layer types are: {', '.join(known) or 'none'}"
            )
    weights = [sum(w for pattern, w in terms if name and pattern.search(name)) for name in names]
    return weights, weighted


def _check_type(ctx: PartitionContext, arg: str | None) -> None:
    _type_weights(ctx, arg)


@register_partition_method("type", prefix=True, check=_check_type)
def _type(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """DeepSpeed's ``type:REGEX`` (layers whose type matches weigh 1, others 0, cut by DeepSpeed's solver), or
    weighted types ``type:conv:3|linear:1`` (a layer weighs the sum of the weights it matches, cut by
    :func:`balance`)."""
    weights, weighted = _type_weights(ctx, arg)
    if weighted:
        return balance(weights, ctx.num_stages)
    return ds_utils.partition_balanced(weights=[int(w > 0) for w in weights], num_parts=ctx.num_stages)


# ---- the new methods -------------------------------------------------------------------------------------------------


def _manual_boundaries(ctx: PartitionContext, arg: str | None) -> list[int]:
    try:
        boundaries = [int(item) for item in arg.split(",")]
    except ValueError:
        raise ValueError(f"manual:{arg} must be comma-separated integers, e.g. manual:0,9,{len(ctx.layers)}") from None
    check_boundaries(boundaries, len(ctx.layers), ctx.num_stages, source=f"manual:{arg}")
    return boundaries


register_partition_method("manual", prefix=True, check=_manual_boundaries)(_manual_boundaries)


def _check_flops(ctx: PartitionContext, arg: str | None) -> None:
    ctx.require("sample_input", "partition method 'flops'")


@register_partition_method("flops", check=_check_flops)
def _flops(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Forward + backward FLOPs per layer on the sample input's shapes (PyTorch's FlopCounterMode)."""
    stats = ctx.stats()
    return balance([f + b for f, b in zip(stats.forward_flops, stats.backward_flops)], ctx.num_stages)


def _check_memory(ctx: PartitionContext, arg: str | None) -> None:
    _check_profile(ctx, arg, "memory")
    if ctx.memory_budget is not None and not ctx.memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes per device, got {ctx.memory_budget!r}")


@register_partition_method("memory", check=_check_memory)
def _memory(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Without a budget: the split whose fullest device needs least memory. With ``memory_budget``: the split
    balanced by FLOPs among those that fit, or a ValueError naming the smallest budget that fits."""
    n, k = len(ctx.layers), ctx.num_stages
    memory = ctx.stage_memory()
    smallest, lightest = min_max_split(n, k, memory)
    budget = ctx.memory_budget
    if budget is None:
        return lightest
    if smallest > budget:
        raise ValueError(
            f"no split into {k} stages fits memory_budget={budget:.0f} bytes ({budget / 2**20:.1f} MiB) per device: "
            f"the smallest budget that fits is {smallest:.0f} bytes ({smallest / 2**20:.1f} MiB), with boundaries "
            f"{lightest}; raise the budget, add stages, or use fewer micro-batches in flight"
        )
    stats = ctx.stats()
    flops = [0]
    for f, b in zip(stats.forward_flops, stats.backward_flops):
        flops.append(flops[-1] + f + b)
    return fastest_split_within(n, k, lambda stage, start, stop: flops[stop] - flops[start], memory, budget)


def _check_profile(ctx: PartitionContext, arg: str | None, method: str = "profile") -> None:
    ctx.require("sample_input", f"partition method {method!r}")
    if ctx.require("micro_batches", f"partition method {method!r}") < 1:
        raise ValueError(f"micro_batches must be at least 1, got {ctx.micro_batches}")


@register_partition_method("profile", check=_check_profile)
def _profile(ctx: PartitionContext, arg: str | None) -> Sequence[int]:
    """Measured seconds per layer (forward, backward, optimizer share), shared by all ranks, cut by :func:`balance`
    with each cut charged its measured transfer twice (the activation forward, its gradient backward)."""
    return fastest_measured_split(ctx)


def fastest_measured_split(ctx: PartitionContext) -> list[int]:
    """The split whose slowest stage is fastest under measured costs (:meth:`LayerCosts.stage_time`). Collective."""
    costs = ctx.measured_costs()
    weights = costs.per_micro_batch(ctx.require("micro_batches", "partition method 'profile'"))
    return balance(weights, ctx.num_stages, cut_costs=[2 * c for c in costs.cut])
