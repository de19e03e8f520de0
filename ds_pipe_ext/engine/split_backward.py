"""A backward pass in two halves: I, the gradient of the stage input, and W, the gradients of the weights.

The previous stage waits for I; nobody waits for W, so a schedule can run W later, in what would be a bubble
(Qi et al., Zero Bubble Pipeline Parallelism, arXiv 2401.10241). Both halves walk the autograd graph the forward
pass saved, and together they do the arithmetic of one backward, no more: during I each autograd node where a
weight's gradient leaves the path from the stage input to its outputs (a *join*: say a Linear's ``AddmmBackward``)
computes only its input-side gradient, and a pre-hook keeps the gradient that flowed into it; W restarts from
those joins towards the weights only. ``torch.distributed.pipelining._backward`` does the same with private
functions; this module uses public autograd (``GradientEdge``, node pre-hooks, ``backward(inputs=...)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ..schedules.instructions import SPLIT_BACKWARD_BACKENDS

__all__ = [
    "PendingWeightGrads",
    "backward_input",
    "backward_weight",
    "check_engine_can_split",
]


@dataclass
class _WeightGroup:
    """Weights whose gradients leave the input path at the same joins, with what flowed into each join in I."""

    weights: list[torch.Tensor]
    joins: list[Node]
    grads: list[tuple[torch.Tensor | None, ...]]


@dataclass
class PendingWeightGrads:
    """What :func:`backward_input` leaves for :func:`backward_weight`; holding it keeps the graph alive."""

    groups: list[_WeightGroup]

    def nbytes(self) -> int:
        """Bytes of the gradients held for W (each storage once): what deferring W costs besides the activations."""
        storages = {
            grad.untyped_storage().data_ptr(): grad.untyped_storage().nbytes()
            for group in self.groups
            for grads in group.grads
            for grad in grads
            if grad is not None
        }
        return sum(storages.values())


def backward_input(
    outputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    weights: Iterable[torch.Tensor],
) -> PendingWeightGrads:
    """Accumulate into each input's ``.grad`` what ``torch.autograd.backward(outputs, output_grads)`` would, without
    computing any weight gradient, and return what :func:`backward_weight` needs to compute those later.

    ``inputs`` are leaves the outputs were computed from; at least one must require grad. Every weight whose
    gradient reaches the outputs must reach them through an input's path (true of any stage that transforms its
    input); a weight the outputs do not depend on gets no gradient, as in a full backward.
    """
    inputs = [tensor for tensor in inputs if tensor.requires_grad]
    if not inputs:
        raise ValueError("backward_input needs an input that requires grad; without one, run a full backward")
    roots = [_node(tensor) for tensor in outputs]
    consumers = _consumers(roots)
    on_input_path = _reachable([_node(tensor) for tensor in inputs], consumers)
    groups = _weight_groups(weights, consumers, on_input_path, set(roots))

    captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}
    handles = [
        join.register_prehook(lambda grads, join=join: captured.__setitem__(join, grads))
        for group in groups
        for join in group.joins
    ]
    try:
        torch.autograd.backward(list(outputs), list(output_grads), retain_graph=True, inputs=inputs)
    finally:
        for handle in handles:
            handle.remove()
    for group in groups:
        group.joins = [join for join in group.joins if join in captured]  # no gradient reached the others
        group.grads = [captured[join] for join in group.joins]
    return PendingWeightGrads(groups)


def backward_weight(pending: PendingWeightGrads) -> None:
    """Accumulate the weight gradients :func:`backward_input` left pending into ``.grad``, and free the graph.

    Each join sees again exactly the gradient it saw in I: a node pre-hook sets it, after any tensor hook on the
    join's output (DeepSpeed's gradient-accumulation scaling on a stage output) has run a second time.
    """
    for group in pending.groups:
        edges, grads = [], []
        for join, join_grads in zip(group.joins, group.grads):
            for index, grad in enumerate(join_grads):
                if grad is not None:
                    edges.append(GradientEdge(join, index))
                    grads.append(grad)
        if not edges:
            continue
        handles = [
            join.register_prehook(lambda _, saved=join_grads: saved)
            for join, join_grads in zip(group.joins, group.grads)
        ]
        try:
            torch.autograd.backward(edges, grads, inputs=group.weights)
        finally:
            for handle in handles:
                handle.remove()
    pending.groups.clear()


def check_engine_can_split(engine: Any, backend: str | None = None) -> None:
    """Raise unless ``engine`` (a ``PipelineEngine``) trains in a way the split backward reproduces exactly.

    The split replaces DeepSpeed's fp32 backward of ZeRO stage 0; mixed precision and ZeRO add their own steps
    around that backward (loss scaling, low-precision gradient copies, gradient hooks), which the halves skip, and
    DeepSpeed's activation checkpointing refuses ``backward(inputs=...)``. The split schedules also need sends that
    hold up nothing: partitioned or dynamically shaped activations go through DeepSpeed's blocking send, and on
    nccl a send waits on the stream it shares with the receives from the same neighbour, so ZB-H1's order would
    deadlock there. ``backend``: the process group's (default: torch.distributed's, once initialized).
    """
    if backend is None and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
    unsupported = [
        name
        for name, enabled in (
            ("fp16", engine.fp16_enabled()),
            ("bf16", engine.bfloat16_enabled()),
            (f"ZeRO stage {engine.zero_optimization_stage()}", engine.zero_optimization_stage() > 0),
            ("activation checkpointing", getattr(engine.module, "activation_checkpoint_interval", 0) > 0),
            ("partitioned pipeline activations", engine.is_pipe_partitioned or engine.is_grad_partitioned),
            ("dynamic activation shapes", engine.dynamic_shape),
            (f"the {backend} backend", backend not in (None, *SPLIT_BACKWARD_BACKENDS)),
        )
        if enabled
    ]
    if unsupported:
        raise ValueError(
            "split-backward schedules (zb-h1, 1f1b-split) run fp32 with ZeRO stage 0 only, on the gloo backend, "
            "without activation checkpointing, on activations of fixed shape that are not partitioned; this run has "
            f"{', '.join(unsupported)}: change that, or use schedule '1f1b'"
        )


def _node(tensor: torch.Tensor) -> Node:
    """The autograd node a tensor's gradient flows into: its ``grad_fn``, or a leaf's gradient accumulator."""
    return get_gradient_edge(tensor).node


def _consumers(roots: list[Node]) -> dict[Node, list[Node]]:
    """For every node the roots depend on, the nodes that pass a gradient to it (the graph's reverse edges)."""
    consumers: dict[Node, list[Node]] = defaultdict(list)
    seen, stack = set(roots), list(roots)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers[child].append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return consumers


def _reachable(
    starts: list[Node], consumers: dict[Node, list[Node]], stop: AbstractSet[Node] = frozenset()
) -> set[Node]:
    """Nodes reachable from ``starts`` towards the outputs, not going past any node in ``stop``."""
    seen, stack = set(starts), list(starts)
    while stack:
        for consumer in consumers.get(stack.pop(), ()):
            if consumer not in seen:
                seen.add(consumer)
                if consumer not in stop:
                    stack.append(consumer)
    return seen


def _weight_groups(
    weights: Iterable[torch.Tensor], consumers: dict[Node, list[Node]], on_input_path: set[Node], roots: set[Node]
) -> list[_WeightGroup]:
    """Group the weights the outputs depend on by the input-path nodes their gradients join (a shared join
    means one W call, so that no join's gradient is pushed to the weights twice)."""
    groups: list[_WeightGroup] = []
    for weight in weights:
        if not weight.requires_grad:
            continue
        accumulator = _node(weight)
        if accumulator not in consumers:
            continue  # unused by the outputs
        reached = _reachable([accumulator], consumers, stop=on_input_path)
        if (reached & roots) - on_input_path:
            raise ValueError(
                f"a weight of shape {tuple(weight.shape)} reaches an output that does not depend on the stage "
                "input, so I cannot leave its gradient to W; run a full backward (schedule 1f1b) for this model"
            )
        joins = reached & on_input_path
        overlapping = [group for group in groups if joins.intersection(group.joins)]
        merged = _WeightGroup([weight], list(joins), [])
        for group in overlapping:
            merged.weights += group.weights
            merged.joins += [join for join in group.joins if join not in merged.joins]
            groups.remove(group)
        groups.append(merged)
    return groups
