"""What each layer of a pipeline costs: counted from shapes (FLOPs, bytes) or measured (seconds), equal on all ranks.

Counting runs every layer once on the ``meta`` device: PyTorch's own ``FlopCounterMode`` counts the FLOPs and
``saved_tensors_hooks`` see what autograd keeps for the backward pass, without computing or allocating anything.

Measuring runs every layer on the device its stage will use, forward and backward on a real micro-batch, on all
ranks at once (so the ranks contend for cores and memory bandwidth as they will in training), in interleaved
rounds whose per-layer median is the cost; it adds the optimizer step and what sending the layer's output costs on
the measured link, and then averages the ranks' numbers so that every rank computes the same partition from the
same costs. A JSON cache keeps the result across restarts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, partial
from typing import Any, Protocol

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


class CostInputs(Protocol):
    """What measuring needs to know (a :class:`~ds_pipe_ext.partition.context.PartitionContext` has it all)."""

    layers: Sequence[Any]
    device: str | torch.device
    repeats: int
    seconds_per_byte: float | None
    cache_path: str | os.PathLike | None
    measure: Callable[[Any], LayerCosts] | None

    @property
    def split_backward(self) -> bool: ...

    def sample(self) -> Any: ...


#: Bump when what a measurement means changes, so that older cache entries are measured again.
_COSTS_VERSION = 2
#: Sizes (bytes) of the tensors the link is timed with: a small and a large one, for latency and bandwidth.
_LINK_PROBE_BYTES = (64 << 10, 4 << 20)


@dataclass(frozen=True)
class LinkCosts:
    """What moving tensors between ranks costs, as latency + bytes x seconds per byte: one transfer to a neighbouring
    stage (``send_``), and one all-reduce over ``allreduce_ranks`` ranks (``allreduce_``; 1: not measured)."""

    send_latency: float = 0.0
    send_per_byte: float = 0.0
    allreduce_latency: float = 0.0
    allreduce_per_byte: float = 0.0
    allreduce_ranks: int = 1

    def send(self, nbytes: float) -> float:
        """Seconds of one transfer of ``nbytes`` to a neighbouring stage (nothing sent: free)."""
        return self.send_latency + nbytes * self.send_per_byte if nbytes else 0.0

    def allreduce(self, nbytes: float, ranks: int) -> float:
        """Seconds of an all-reduce of ``nbytes`` over ``ranks`` data-parallel replicas. A ring all-reduce moves
        2(r-1)/r of the bytes through every rank, so the measured group's cost is scaled by that factor; without a
        measured all-reduce, the send link stands in, in 2(r-1) steps."""
        if ranks < 2 or not nbytes:
            return 0.0
        if self.allreduce_ranks < 2:
            return 2 * (ranks - 1) * self.send_latency + _ring_share(ranks) * nbytes * self.send_per_byte
        scale = _ring_share(ranks) / _ring_share(self.allreduce_ranks)
        return self.allreduce_latency + scale * nbytes * self.allreduce_per_byte


def _ring_share(ranks: int) -> float:
    return 2 * (ranks - 1) / ranks


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer cost, in ``unit`` (seconds when measured, FLOPs when counted).

    ``forward`` and ``backward`` are one micro-batch's passes; ``backward_input`` and ``backward_weight`` (measured
    when a schedule splits the backward) its two halves. ``step`` is the layer's optimizer step, which runs once per
    batch. ``cut[i]`` is one transfer of layer ``i``'s output (or of its gradient) to a neighbouring stage; it is
    paid only where a stage boundary falls after layer ``i``, by both stages, once forward and once backward.
    ``rounds`` keeps, per measuring round, every layer's forward + backward, for the spread of the measurement;
    ``link`` is what the transfers and the gradient all-reduce were costed with.
    """

    forward: list[float]
    backward: list[float]
    step: list[float]
    cut: list[float]
    unit: str
    backward_input: list[float] | None = None
    backward_weight: list[float] | None = None
    rounds: list[list[float]] | None = None
    link: LinkCosts = field(default_factory=LinkCosts)

    def per_micro_batch(self, micro_batches: int) -> list[float]:
        """Forward + backward + the optimizer step's share per layer: what a stage spends per micro-batch when a
        batch has ``micro_batches`` of them, cuts aside."""
        return [f + b + s / micro_batches for f, b, s in zip(self.forward, self.backward, self.step)]

    def stage_time(self, micro_batches: int) -> Callable[[int, int, int], float]:
        """``seconds(stage, start, stop)``: what a stage of layers ``start..stop-1`` costs per micro-batch, its
        layers plus two transfers at each end that is a cut (what the partition solvers balance). Prefix sums, so
        that a solver may call it for every candidate stage."""
        n, prefix = len(self.forward), list(itertools.accumulate(self.per_micro_batch(micro_batches), initial=0.0))

        def seconds(stage: int, start: int, stop: int) -> float:
            cuts = (self.cut[start - 1] if start > 0 else 0) + (self.cut[stop - 1] if stop < n else 0)
            return prefix[stop] - prefix[start] + 2 * cuts

        return seconds

    def spread(self, start: int, stop: int) -> float | None:
        """How much the stage's measured forward + backward varied between rounds: the interquartile range over the
        median (0.05: the middle half of the rounds lay within 5% of each other). ``None`` without rounds."""
        if not self.rounds or len(self.rounds) < 2:
            return None
        sums = [sum(times[start:stop]) for times in self.rounds]
        low, middle, high = statistics.quantiles(sums, n=4, method="inclusive")
        return (high - low) / middle if middle > 0 else 0.0

    @classmethod
    def counted(cls, forward: Sequence[float], backward: Sequence[float], unit: str) -> LayerCosts:
        zeros = [0.0] * len(forward)
        return cls(list(forward), list(backward), zeros, zeros, unit)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> LayerCosts:
        """The inverse of ``dataclasses.asdict``, as the cache stores it."""
        return cls(**{**entry, "link": LinkCosts(**entry.get("link", {}))})


@dataclass(frozen=True)
class LayerStats:
    """Shape-derived facts per layer, from one pass on the meta device.

    Parameters are always known; FLOPs and activations only when a sample input was given (else ``None``).
    Activations are tracked as tensors so that a tensor two layers keep (a ReLU's output that the next layer also
    saves, an in-place op, a view) is counted once: ``saved[i]`` are the tensors layer ``i`` keeps for backward,
    ``boundary[j]`` the tensors entering layer ``j`` (``boundary[n]`` is the model's output), and
    ``tensor_bytes[t]`` the size of tensor ``t``.
    """

    params: list[int]  # trainable parameters
    param_bytes: list[int]  # all parameters and buffers
    grad_bytes: list[int]  # gradients of the trainable parameters
    forward_flops: list[int] | None = None
    backward_flops: list[int] | None = None
    saved: list[frozenset[int]] | None = None
    boundary: list[frozenset[int]] | None = None
    tensor_bytes: list[int] | None = None

    def activation_bytes(self, start: int, stop: int) -> int:
        """Bytes a stage of layers ``start..stop-1`` keeps per micro-batch in flight: what its layers save for
        backward, plus its input and output (the engine's pipe buffers), each tensor once."""
        return self._activation_table[start][stop]

    @cached_property
    def _activation_table(self) -> list[list[int]]:
        n = len(self.params)
        table = [[0] * (n + 1) for _ in range(n + 1)]
        for start in range(n):
            kept = set(self.boundary[start])
            kept_bytes = sum(self.tensor_bytes[t] for t in kept)
            for stop in range(start + 1, n + 1):
                for t in self.saved[stop - 1] - kept:
                    kept.add(t)
                    kept_bytes += self.tensor_bytes[t]
                table[start][stop] = kept_bytes + sum(self.tensor_bytes[t] for t in self.boundary[stop] - kept)
        return table


def count_layer_stats(layers: Sequence[Any], sample: Any = None) -> LayerStats:
    """Parameters of every layer and, given the first stage's input ``sample``, per-layer FLOPs (forward, and
    backward to the layer's input and parameters) and the tensors each layer keeps for backward.

    Runs on meta tensors: the user's modules are not touched, and the global random state is left as it was.
    """
    params, param_bytes, grad_bytes = [], [], []
    forward_flops, backward_flops, saved, boundary = [], [], [], []
    keys: dict[int, int] = {}
    tensor_bytes: list[int] = []
    alive: list[torch.Tensor] = []  # keeps counted tensors alive, so that their ids stay unique

    def key_of(tensor: torch.Tensor) -> int:
        storage = tensor._base if tensor._base is not None else tensor
        if id(storage) not in keys:
            keys[id(storage)] = len(tensor_bytes)
            tensor_bytes.append(storage.numel() * storage.element_size())
            alive.append(storage)
        return keys[id(storage)]

    x = None if sample is None else _map_tensors(sample, lambda t: t.detach().to("meta"))
    if x is not None:
        boundary.append(frozenset(key_of(t) for t in _tensors(x)))
    with _rng_preserved(torch.device("cpu")):
        for layer in layers:
            fn, tensors = _on_meta(layer)
            trainable = [t for t in tensors if t.requires_grad]
            params.append(sum(t.numel() for t in trainable))
            param_bytes.append(sum(t.numel() * t.element_size() for t in tensors))
            grad_bytes.append(sum(t.numel() * t.element_size() for t in trainable))
            if x is None:
                continue
            out, forward, backward, kept = _count_on_meta(fn, x, tensors)
            forward_flops.append(forward)
            backward_flops.append(backward)
            saved.append(frozenset(key_of(t) for t in kept))
            boundary.append(frozenset(key_of(t) for t in _tensors(out)))
            x = out
    if x is None:
        return LayerStats(params, param_bytes, grad_bytes)
    return LayerStats(params, param_bytes, grad_bytes, forward_flops, backward_flops, saved, boundary, tensor_bytes)


def _count_on_meta(
    fn: Callable[[Any], Any], x: Any, tensors: list[torch.Tensor]
) -> tuple[Any, int, int, list[torch.Tensor]]:
    """One layer on meta tensors: its output, forward and backward FLOPs, and the activations it saves for backward
    (tensors autograd keeps, less the layer's own parameters and buffers and views of them)."""
    kept: list[torch.Tensor] = []
    with (
        FlopCounterMode(display=False) as forward,
        torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t),
    ):
        out = fn(x)
    inputs = [t for t in _tensors(x) if t.requires_grad] + [t for t in tensors if t.requires_grad]
    outputs = [t for t in _tensors(out) if t.requires_grad]
    with FlopCounterMode(display=False) as backward:
        if inputs and outputs:
            grads = [torch.ones_like(t) for t in outputs]
            torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
    own = {id(t) for t in tensors}
    activations = [t for t in kept if id(t) not in own and (t._base is None or id(t._base) not in own)]
    return out, forward.get_total_flops(), backward.get_total_flops(), activations


def measure_layer_costs(ctx: CostInputs) -> LayerCosts:
    """Seconds of every layer on ``ctx.device``, as this rank sees them (no averaging across ranks).

    After a warm-up pass, ``ctx.repeats`` rounds each time every layer once: its forward, its backward (and, when
    ``ctx.split_backward``, the input and weight halves) and a ``torch.optim.Adam`` step, on a copy (the user's
    modules keep their weights), with gradients accumulating as under gradient accumulation. Rounds alternate
    between forward and reverse layer order, a disturbance (another process, a clock change) so lands on one round
    of many layers rather than on every timing of one layer, and the per-layer median over rounds discards it: the
    layers' relative costs, which decide the cut, stay put from run to run. Ranks take turns in opposite orders and
    start each turn together: while one times a front layer another times a back one, as pipeline stages run
    different layers at once (timing the same layer on every rank would make memory-bound layers contend with
    themselves). ``cut`` is the layer's output sent over the link (``ctx.seconds_per_byte``, else measured between
    the ranks, :func:`measure_link`; free in a single process).
    """
    device = torch.device(ctx.device)
    link = LinkCosts(send_per_byte=ctx.seconds_per_byte) if ctx.seconds_per_byte is not None else measure_link(device)
    repeats = max(1, ctx.repeats)
    rank = dist.get_rank() if _distributed() else 0
    with _rng_preserved(device):
        probes = _layer_probes(ctx.layers, ctx.sample(), device)
        timings: list[list[dict[str, float]]] = [[{} for _ in probes] for _ in range(repeats)]
        for round_index in range(repeats):
            forward_order = (round_index + rank) % 2 == 0
            for index in range(len(probes)) if forward_order else reversed(range(len(probes))):
                if _distributed():
                    dist.barrier()
                timings[round_index][index] = probes[index].time(ctx.split_backward)

    def median(kind: str) -> list[float]:
        return [statistics.median(rounds[index][kind] for rounds in timings) for index in range(len(probes))]

    return LayerCosts(
        forward=median("forward"),
        backward=median("backward"),
        step=median("step"),
        cut=[link.send(probe.output_bytes) for probe in probes],
        unit="s",
        backward_input=median("backward_input") if ctx.split_backward else None,
        backward_weight=median("backward_weight") if ctx.split_backward else None,
        rounds=[[layer["forward"] + layer["backward"] for layer in rounds] for rounds in timings],
        link=link,
    )


def shared_layer_costs(ctx: CostInputs) -> LayerCosts:
    """Measured layer costs that every rank agrees on, bit for bit: each rank measures (``ctx.measure``, default
    :func:`measure_layer_costs`), the ranks average, and rank 0's result is broadcast.

    With ``ctx.cache_path``, a cache entry for this layer list, sample shape, device type and world size is used
    instead of measuring, but only if every rank finds it (else all measure: no rank waits on another); rank 0
    writes the result. Collective: call it on every rank or on none.
    """
    device = torch.device(ctx.device)
    key = fingerprint(ctx)
    cached = _read_cache(ctx.cache_path, key, len(ctx.layers)) if ctx.cache_path else None
    hit_everywhere = _all_ranks(cached is not None, device)
    costs = cached if hit_everywhere else (ctx.measure or measure_layer_costs)(ctx)
    costs = _agree(costs, device, average=not hit_everywhere)
    if ctx.cache_path and (not _distributed() or dist.get_rank() == 0) and costs != cached:
        _write_cache(ctx.cache_path, key, costs)
    return costs


def fingerprint(ctx: CostInputs) -> str:
    """What measured costs depend on, hashed: the cache key."""
    world_size = dist.get_world_size() if _distributed() else 1
    description = {
        "version": _COSTS_VERSION,
        "layers": [_describe(layer) for layer in ctx.layers],
        "sample": [[list(t.shape), str(t.dtype)] for t in _tensors(ctx.sample())],
        "device": torch.device(ctx.device).type,
        "world_size": world_size,
        "split_backward": ctx.split_backward,
        "seconds_per_byte": ctx.seconds_per_byte,
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:20]


def _describe(layer: Any) -> str:
    if isinstance(layer, TiedLayerSpec):
        return f"tied[{layer.key}]:{layer!r}"
    if isinstance(layer, (LayerSpec, nn.Module)):
        return repr(layer)
    return getattr(layer, "__qualname__", type(layer).__qualname__)


def _read_cache(path: str | os.PathLike, key: str, num_layers: int) -> LayerCosts | None:
    try:
        with open(path) as f:
            entry = json.load(f).get(key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as error:
        warnings.warn(f"ignoring unreadable profile cache {os.fspath(path)!r} ({error}); measuring again", stacklevel=2)
        return None
    if not entry:
        return None
    try:
        costs = LayerCosts.from_dict(entry)
    except TypeError:
        return None
    return costs if len(costs.forward) == num_layers else None


def _write_cache(path: str | os.PathLike, key: str, costs: LayerCosts) -> None:
    entries = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            entries = dict(json.load(f))
    entries[key] = asdict(costs)
    temporary = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(temporary, path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ranks(flag: bool, device: torch.device) -> bool:
    if not _distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _agree(costs: LayerCosts, device: torch.device, average: bool) -> LayerCosts:
    """The ranks' mean (or rank 0's values), identical on every rank whatever order the backend reduces in."""
    if not _distributed():
        return costs

    def agreed(values: Sequence[float] | None) -> list[float] | None:
        if values is None:
            return None
        vector = torch.tensor(list(values), dtype=torch.float64, device=device)
        if average:
            dist.all_reduce(vector)
            vector /= dist.get_world_size()
        dist.broadcast(vector, src=0)
        return vector.tolist()

    per_layer = [f.name for f in fields(costs) if f.name not in ("unit", "rounds", "link")]
    numbers = {name: agreed(getattr(costs, name)) for name in per_layer}
    link = agreed([getattr(costs.link, f.name) for f in fields(LinkCosts)])
    return LayerCosts(
        **numbers,
        unit=costs.unit,
        rounds=[agreed(times) for times in costs.rounds] if costs.rounds else None,
        link=LinkCosts(*link[:-1], allreduce_ranks=round(link[-1])),
    )


def measure_link(device: torch.device, repeats: int = 5) -> LinkCosts:
    """The link between the ranks, as every rank will use it, timed on all of them at once (collective).

    A transfer between pipeline neighbours is a ping-pong between ranks 2i and 2i+1 (every pair at once, as
    neighbours send at once in training), an all-reduce one over all ranks; each is the median of ``repeats``
    timings at a small and a large size, fitted with latency + bytes x seconds per byte, and averaged over the
    ranks that timed it. Free in a single process.
    """
    if not _distributed() or dist.get_world_size() < 2:
        return LinkCosts()
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = rank ^ 1
    sends, allreduces = [], []
    for nbytes in _LINK_PROBE_BYTES:
        probe = torch.zeros(nbytes // 4, device=device)
        times = [_time_collective(_ping_pong, probe, rank, peer, world, device) for _ in range(1 + max(3, repeats))]
        sends.append(statistics.median(times[1:]) / 2 if rank % 2 == 0 and peer < world else math.nan)
        times = [_time_collective(_all_reduce, probe, rank, peer, world, device) for _ in range(1 + max(3, repeats))]
        allreduces.append(statistics.median(times[1:]))
    send_latency, send_per_byte = _latency_and_per_byte(_mean_over_ranks(sends, device))
    allreduce_latency, allreduce_per_byte = _latency_and_per_byte(_mean_over_ranks(allreduces, device))
    return LinkCosts(send_latency, send_per_byte, allreduce_latency, allreduce_per_byte, allreduce_ranks=world)


def _time_collective(
    operation: Callable[[torch.Tensor, int, int, int], None],
    probe: torch.Tensor,
    rank: int,
    peer: int,
    world: int,
    device: torch.device,
) -> float:
    dist.barrier()
    start = time.perf_counter()
    operation(probe, rank, peer, world)
    _synchronize(device)
    return time.perf_counter() - start


def _ping_pong(probe: torch.Tensor, rank: int, peer: int, world: int) -> None:
    if peer >= world:  # the last of an odd number of ranks has no partner
        return
    if rank % 2 == 0:
        dist.send(probe, peer)
        dist.recv(probe, peer)
    else:
        dist.recv(probe, peer)
        dist.send(probe, peer)


def _all_reduce(probe: torch.Tensor, rank: int, peer: int, world: int) -> None:
    dist.all_reduce(probe)


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's mean over the ranks on which it is a number (not NaN)."""
    vector = torch.tensor([[0.0 if math.isnan(v) else v, float(not math.isnan(v))] for v in values], device=device)
    dist.all_reduce(vector)
    return [total / count if count else 0.0 for total, count in vector.tolist()]


def _latency_and_per_byte(seconds: list[float]) -> tuple[float, float]:
    """The line through the timings at the probe sizes, kept non-negative."""
    (small, large), (t_small, t_large) = _LINK_PROBE_BYTES, seconds
    per_byte = max(0.0, (t_large - t_small) / (large - small))
    return max(0.0, t_small - small * per_byte), per_byte


class _LayerProbe:
    """One layer built on the measuring device with its recorded input, ready to be timed again and again."""

    def __init__(self, fn: Callable[[Any], Any], parameters: list[torch.Tensor], x: Any, input_grad: bool, device):
        self.fn, self.parameters, self.device = fn, parameters, device
        self.input = _map_tensors(x, lambda t: t.detach().requires_grad_(input_grad and t.is_floating_point()))
        out = self._forward()
        self.output = _map_tensors(out, torch.Tensor.detach)
        self.output_bytes = sum(t.numel() * t.element_size() for t in _tensors(out))
        self.grads = [torch.ones_like(t) for t in _tensors(out) if t.requires_grad]
        self._backward(out)
        trainable = [p for p in parameters if p.grad is not None]
        self.optimizer = torch.optim.Adam(trainable) if trainable else None
        if self.optimizer is not None:
            self.optimizer.step()  # the first step creates the optimizer's state

    def time(self, split_backward: bool) -> dict[str, float]:
        """Seconds of one forward, backward and optimizer step (and of the two backward halves, when asked)."""
        times = {}
        start = self._now()
        out = self._forward()
        times["forward"] = self._now() - start
        start = self._now()
        self._backward(out)
        times["backward"] = self._now() - start
        if split_backward:
            out = self._forward()
            inputs = [t for t in _tensors(self.input) if t.requires_grad]
            weights = [p for p in self.parameters if p.requires_grad]
            times["backward_input"] = self._timed(lambda: self._backward(out, inputs, retain_graph=True), inputs)
            times["backward_weight"] = self._timed(lambda: self._backward(out, weights), weights)
        times["step"] = self._timed(self.optimizer.step, [self.optimizer]) if self.optimizer else 0.0
        return times

    def _timed(self, work: Callable[[], Any], needed: list[Any]) -> float:
        """Seconds ``work`` takes; 0 when there is nothing for it to do (``needed`` is empty)."""
        if not needed:
            return 0.0
        start = self._now()
        work()
        return self._now() - start

    def _forward(self) -> Any:
        return self.fn(_map_tensors(self.input, torch.Tensor.clone))  # in-place layers must not change the input

    def _backward(self, out: Any, inputs: list[torch.Tensor] | None = None, retain_graph: bool = False) -> None:
        outputs = [t for t in _tensors(out) if t.requires_grad]
        if outputs:
            torch.autograd.backward(outputs, self.grads, inputs=inputs, retain_graph=retain_graph)

    def _now(self) -> float:
        _synchronize(self.device)
        return time.perf_counter()


def _layer_probes(layers: Sequence[Any], sample: Any, device: torch.device) -> list[_LayerProbe]:
    """Every layer built on ``device``, each fed the output of the one before (the warm-up pass)."""
    x = _map_tensors(sample, lambda t: t.detach().to(device))
    tied: dict[str, nn.Module] = {}
    probes = []
    for index, layer in enumerate(layers):
        fn, parameters = _on_device(layer, device, tied)
        probes.append(_LayerProbe(fn, parameters, x, index > 0, device))
        x = probes[-1].output
    return probes


def _on_meta(layer: Any) -> tuple[Callable[[Any], Any], list[torch.Tensor]]:
    """``layer`` as a function of meta tensors, and the parameters and buffers it computes with.

    Each use of a tied layer gets a module of its own: were the module shared, the gradient of the tied weight
    would flow from its second use back through every layer to its first, and a tied output head's backward would
    count the whole network's.
    """
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            module = layer.build()
        return _forward_of(layer, module), [*module.parameters(), *module.buffers()]
    if isinstance(layer, nn.Module):
        state = {
            name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())
        }
        return (lambda x: functional_call(layer, state, (x,))), list(state.values())
    return layer, []


def _on_device(layer: Any, device: torch.device, tied: dict[str, nn.Module]) -> tuple[Callable, list[torch.Tensor]]:
    """``layer`` as a function on ``device``, built or copied so that the user's modules stay as they are."""
    if isinstance(layer, LayerSpec):
        with torch.device(device):
            module = _build(layer, tied)
        return _forward_of(layer, module), [p for p in module.parameters() if p.requires_grad]
    if isinstance(layer, nn.Module):
        module = copy.deepcopy(layer).to(device)
        return module, [p for p in module.parameters() if p.requires_grad]
    return layer, []


def _build(spec: LayerSpec, tied: dict[str, nn.Module]) -> nn.Module:
    if isinstance(spec, TiedLayerSpec):
        if spec.key not in tied:
            tied[spec.key] = spec.build()
        return tied[spec.key]
    return spec.build()


def _forward_of(spec: LayerSpec, module: nn.Module) -> Callable[[Any], Any]:
    forward_fn = getattr(spec, "forward_fn", None)
    return module if forward_fn is None else partial(forward_fn, module)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a layer's input or output: a tensor, or a (nested) tuple or list of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Building layers and running dropout draw random numbers; the model DeepSpeed builds next must not notice."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    device_type = device.type if devices else "cuda"
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        yield
