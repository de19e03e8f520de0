"""A backward pass in two halves: I, the gradient of the stage input, and W, the gradients of the weights.

The previous stage waits for I; nobody waits for W, so a schedule can run W later, in what would be a bubble
(Qi et al., Zero Bubble Pipeline Parallelism, arXiv 2401.10241). Both halves walk the autograd graph the forward
pass saved, and together they do the arithmetic of one backward, no more: during I each autograd node where a
weight's gradient leaves the path from the stage input to its outputs (a *join*: say a Linear's ``AddmmBackward``)
computes only its input-side gradient, and a pre-hook keeps the gradient that flowed into it; W restarts from
those joins towards the weights only. ``torch.distributed.pipelining._backward`` does the same with private
functions; this module uses public autograd (``GradientEdge``, node pre-hooks, ``backward(inputs=...)``).

Two kinds of weight do not fit that picture, and both still get exactly a full backward's gradients:

- a weight whose gradient reaches an output without crossing the input path (a stage whose input is token ids,
  or an output computed from weights alone): W starts at that output, with its gradient, as the full backward
  would;
- a weight whose gradient joins the input path at two depths (a layer applied twice; an embedding tied to a head
  on the same input path): W cannot restart at the deeper join without autograd redoing the input-side work
  between the two joins (it runs every node on a path to a requested gradient), so I computes that weight's
  gradient itself.

Activation checkpointing: DeepSpeed's non-reentrant checkpoint recomputes a region at the first unpack of one of
its saved tensors and keeps the recomputed tensors while the graph holds them, so I's recomputation serves W; it
refuses to recompute inside a backward that names its inputs, so I unpacks one saved tensor per region before its
backward. PyTorch's non-reentrant checkpoint keeps recomputed tensors per backward call, so W recomputes each
region once more (one ``GraphExecGroup`` for all of W's calls). Reentrant checkpoints cannot be split: see
:func:`check_engine_can_split`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils.checkpoint import GraphExecGroup

from .. import compat

__all__ = [
    "PendingWeightGrads",
    "backward_input",
    "backward_weight",
    "check_engine_can_split",
]


@dataclass(eq=False)
class _WeightGroup:
    """Weights whose gradients meet before they reach the input path or an output: one W call, so that no gradient
    is pushed towards the weights twice. Compared by identity: its fields hold tensors."""

    weights: list[torch.Tensor]
    starts: set[Node]  # the joins, and the output nodes off the input path, their gradients reach
    joins: list[Node] = field(default_factory=list)
    join_grads: list[tuple[torch.Tensor | None, ...]] = field(default_factory=list)
    output_edges: list[GradientEdge] = field(default_factory=list)
    output_grads: list[torch.Tensor] = field(default_factory=list)


@dataclass
class PendingWeightGrads:
    """What :func:`backward_input` leaves for :func:`backward_weight`; holding it keeps the graph alive."""

    groups: list[_WeightGroup]

    def nbytes(self) -> int:
        """Bytes of the gradients held for W (each storage once): what deferring W costs besides the activations."""
        held = [grad for group in self.groups for grads in group.join_grads for grad in grads]
        held += [grad for group in self.groups for grad in group.output_grads]
        storages = {
            grad.untyped_storage().data_ptr(): grad.untyped_storage().nbytes() for grad in held if grad is not None
        }
        return sum(storages.values())


def backward_input(
    outputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    weights: Iterable[torch.Tensor],
) -> PendingWeightGrads:
    """Accumulate into each input's ``.grad`` what ``torch.autograd.backward(outputs, output_grads)`` would, and
    return what :func:`backward_weight` needs to accumulate the weights' gradients later.

    ``inputs`` are the leaves the stage received; those that do not require grad (token ids, masks) are skipped,
    and with none left I computes nothing and W the whole backward. Outputs that do not require grad are skipped
    with their gradients. Leaves in neither ``inputs`` nor ``weights`` get no gradient.
    """
    if len(outputs) != len(output_grads):
        raise ValueError(f"{len(outputs)} outputs but {len(output_grads)} output gradients")
    kept = [(output, grad) for output, grad in zip(outputs, output_grads) if output.requires_grad]
    outputs, output_grads = [output for output, _ in kept], [grad for _, grad in kept]
    inputs = [tensor for tensor in inputs if tensor.requires_grad]
    output_edges = [get_gradient_edge(output) for output in outputs]
    roots = [edge.node for edge in output_edges]
    consumers = _consumers(roots)
    on_input_path = _reachable([_node(tensor) for tensor in inputs], consumers)
    deferred: list[_WeightGroup] = []
    weights_in_i: list[torch.Tensor] = []
    for group in _weight_groups(weights, consumers, on_input_path, set(roots)):
        if _joins_nest(group, on_input_path):
            weights_in_i += group.weights
        else:
            deferred.append(group)
    for group in deferred:
        for edge, grad in zip(output_edges, output_grads):
            if edge.node in group.starts and edge.node not in on_input_path:
                group.output_edges.append(edge)
                group.output_grads.append(grad)
    _recompute_deepspeed_checkpoints([*roots, *consumers])

    captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}  # in the order I runs the joins
    handles = [
        join.register_prehook(lambda grads, join=join: captured.__setitem__(join, grads))
        for group in deferred
        for join in group.starts & on_input_path
    ]
    try:
        if outputs and (inputs or weights_in_i):
            torch.autograd.backward(outputs, output_grads, retain_graph=bool(deferred), inputs=inputs + weights_in_i)
    finally:
        for handle in handles:
            handle.remove()
    for group in deferred:
        group.joins = [join for join in captured if join in group.starts]  # no gradient reached the others
        group.join_grads = [captured[join] for join in group.joins]
    return PendingWeightGrads(deferred)


def backward_weight(pending: PendingWeightGrads) -> None:
    """Accumulate the weight gradients :func:`backward_input` left pending into ``.grad``, and free the graph.

    Each join sees again exactly the gradient it saw in I: a node pre-hook sets it, after any tensor hook on the
    join's output (DeepSpeed's gradient-accumulation scaling on a stage output) has run a second time. Outputs off
    the input path start with their own gradient, and their hooks run here for the first time.
    """
    with _one_recomputation():
        for group in pending.groups:
            edges, grads = list(group.output_edges), list(group.output_grads)
            for join, join_grads in zip(group.joins, group.join_grads):
                for index, grad in enumerate(join_grads):
                    if grad is not None:
                        edges.append(GradientEdge(join, index))
                        grads.append(grad)
            if not edges:
                continue
            handles = [
                join.register_prehook(lambda _, saved=join_grads: saved)
                for join, join_grads in zip(group.joins, group.join_grads)
            ]
            try:
                torch.autograd.backward(edges, grads, inputs=group.weights)
            finally:
                for handle in handles:
                    handle.remove()
    pending.groups.clear()


def check_engine_can_split(engine: Any) -> None:
    """Raise unless ``engine`` (a ``PipelineEngine``) trains in a way the split backward reproduces exactly.

    fp32, bf16 (DeepSpeed's BF16_Optimizer, or ZeRO's optimizer), fp16 (FP16_Optimizer, or ZeRO's with its loss
    scaler) and ZeRO stage 1 split: the engine runs around each half what DeepSpeed runs around a backward (the loss
    scaled as ``engine.backward`` scales it, the bf16 optimizer's clearing and accumulation of its gradients, ZeRO's
    gradient hooks and epilogue). That needs DeepSpeed 0.18.3 or later, whose backward is made of those pieces
    (:func:`ds_pipe_ext.compat.backward_in_pieces`); before, fp16, bf16 and ZeRO run one ``optimizer.backward(loss)``.
    Apex AMP scales inside its own context manager around the whole backward, and is refused.

    A reentrant activation checkpoint (DeepSpeed's default, ``deepspeed.checkpointing.checkpoint``) is one autograd
    node whose backward recomputes its layers and runs a full backward through them: it computes the weights'
    gradients inside I, and it refuses to run at all in a backward that names its inputs ("Checkpointing is not
    compatible with .grad()"); its non-reentrant counterpart (``"pipeline": {"use_reentrant": false}``) leaves
    the layers' nodes in the graph, and splits. (Whether the schedule's transfers can hang on the backend is the
    engine's transport check, not this one.)
    """
    module = engine.module
    if getattr(module, "activation_checkpoint_interval", 0) > 0 and not _splits_checkpoints(
        getattr(module, "activation_checkpoint_func", None)
    ):
        raise ValueError(
            "split-backward schedules (zb-h1, 1f1b-split, interleaved-zb, zb-v, dualpipev) cannot split a reentrant "
            'activation checkpoint; this run has one: set "pipeline": {"use_reentrant": false} to checkpoint with '
            "DeepSpeed's non-reentrant function, which splits, or use schedule '1f1b'"
        )
    stage = engine.zero_optimization_stage()
    if stage > 1:  # PipelineEngine refuses them itself
        raise ValueError(
            f"split-backward schedules run ZeRO stage 0 or 1; this run has ZeRO stage {stage}: use stage 1, or "
            "schedule '1f1b'"
        )
    amp = getattr(engine, "amp_enabled", None)
    if amp is not None and amp():
        raise ValueError(
            "split-backward schedules cannot split apex AMP's backward (it scales the loss in a context manager "
            'around the whole backward); this run has "amp": use "fp16" or "bf16", or schedule \'1f1b\''
        )
    mixed = [
        name
        for name, enabled in (
            ("fp16", engine.fp16_enabled()),
            ("bf16", engine.bfloat16_enabled()),
            (f"ZeRO stage {stage}", stage > 0),
        )
        if enabled
    ]
    if mixed and not compat.backward_in_pieces():
        raise ValueError(
            f"split-backward schedules run {' and '.join(mixed)} from DeepSpeed {compat.SPLIT_PRECISION_SINCE} on, "
            f"whose backward is made of pieces they can split; this is DeepSpeed {compat.installed_deepspeed()}: "
            f"pip install 'deepspeed>={compat.SPLIT_PRECISION_SINCE},<{compat.NEXT_MINOR[0]}.{compat.NEXT_MINOR[1]}', "
            "run fp32 with ZeRO stage 0, or use schedule '1f1b'"
        )


def _splits_checkpoints(checkpoint_func: Any) -> bool:
    """Whether a ``PipelineModule``'s checkpoint function leaves the checkpointed layers' nodes in the graph:
    DeepSpeed's ``non_reentrant_checkpoint``, or PyTorch's checkpoint bound to ``use_reentrant=False``."""
    if checkpoint_func is ds_checkpointing.non_reentrant_checkpoint:
        return True
    return (
        isinstance(checkpoint_func, functools.partial)
        and checkpoint_func.func is torch.utils.checkpoint.checkpoint
        and checkpoint_func.keywords.get("use_reentrant") is False
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
    """Group the weights the outputs depend on by the nodes where W starts for them: the input-path nodes their
    gradients join, and the output nodes off the input path they reach. Weights that share a start share a W call.
    Merged by the nodes' and groups' identities: never by comparing tensors, which compares their values."""
    group_of: dict[Node, _WeightGroup] = {}
    seen: set[int] = set()
    for weight in weights:
        if not weight.requires_grad or id(weight) in seen:
            continue
        seen.add(id(weight))
        accumulator = _node(weight)
        if accumulator not in consumers:
            continue  # unused by the outputs
        reached = _reachable([accumulator], consumers, stop=on_input_path)
        starts = (reached & on_input_path) | (reached & roots)
        merged = _WeightGroup([weight], starts)
        for group in {id(group_of[node]): group_of[node] for node in starts if node in group_of}.values():
            merged.weights += group.weights
            merged.starts |= group.starts
        for node in merged.starts:
            group_of[node] = merged
    return list({id(group): group for group in group_of.values()}.values())


def _joins_nest(group: _WeightGroup, on_input_path: set[Node]) -> bool:
    """Whether one of the group's joins lies on the input path below another. W restarting at the upper join would
    have autograd redo the input-side gradients down to the lower one: extra arithmetic, and an error where another
    group's W call has already freed those nodes' saved tensors."""
    joins = group.starts & on_input_path
    if len(joins) < 2:
        return False
    for join in joins:
        seen: set[Node] = set()
        stack = [child for child, _ in join.next_functions if child in on_input_path]
        while stack:
            node = stack.pop()
            if node in joins:
                return True
            if node not in seen:
                seen.add(node)
                stack += [child for child, _ in node.next_functions if child in on_input_path]
    return False


def _recompute_deepspeed_checkpoints(nodes: Iterable[Node]) -> None:
    """Have each region checkpointed by DeepSpeed's ``non_reentrant_checkpoint`` recompute now, outside any
    backward. It recomputes at the first unpack of one of its saved tensors and raises ("Checkpointing is not
    compatible with .grad()") when that happens in a backward that names its inputs, as I does; once recomputed,
    it hands out the kept tensors in any backward, I's and W's, until the graph lets go of them."""
    regions: dict[int, torch._C._autograd.SavedTensor] = {}  # one saved tensor per region: per unpack closure
    for node in nodes:
        for saved in _saved_tensors(node):
            if _is_deepspeed_unpack(saved.unpack_hook):
                regions.setdefault(id(saved.unpack_hook), saved)
    for saved in regions.values():
        saved.unpack()


def _is_deepspeed_unpack(hook: Any) -> bool:
    """Whether an unpack hook is the closure ``non_reentrant_checkpoint`` made for one checkpointed region."""
    qualname = getattr(hook, "__qualname__", "")
    return getattr(hook, "__module__", None) == ds_checkpointing.__name__ and qualname.startswith(
        "non_reentrant_checkpoint."
    )


def _saved_tensors(node: Node) -> Iterator[torch._C._autograd.SavedTensor]:
    """The tensors a node saved for its backward, still packed."""
    for name in _raw_saved_names(type(node)):
        value = getattr(node, name)
        for saved in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(saved, torch._C._autograd.SavedTensor):
                yield saved


@functools.cache
def _raw_saved_names(node_type: type) -> tuple[str, ...]:
    return tuple(name for name in dir(node_type) if name.startswith("_raw_saved_"))


@contextmanager
def _one_recomputation() -> Iterator[None]:
    """Have PyTorch's non-reentrant checkpoint recompute each region once for all of W's backward calls (which run
    disjoint parts of the graph) instead of once per call; a caller's own group is left in charge."""
    if GraphExecGroup._get_current_group() is not None:
        yield
        return
    with GraphExecGroup():
        yield
