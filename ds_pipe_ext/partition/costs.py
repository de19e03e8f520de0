"""What each layer of a pipeline costs: counted from shapes (FLOPs, bytes) or measured (seconds), equal on all ranks.

Counting runs every layer once on the ``meta`` device: PyTorch's own ``FlopCounterMode`` counts the FLOPs and
``saved_tensors_hooks`` see what autograd keeps for the backward pass, without computing or allocating anything.

Measuring runs every layer on the device its stage will use, forward and backward on a real micro-batch, on all
ranks at once (so the ranks contend for cores and memory bandwidth as they will in training), adds the optimizer
step and the cost of sending the layer's output, and then averages the ranks' numbers so that every rank computes
the same partition from the same costs. A JSON cache keeps the result across restarts.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
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
    micro_batches: int | None
    repeats: int
    seconds_per_byte: float | None
    cache_path: str | os.PathLike | None
    measure: Callable[[Any], LayerCosts] | None

    def sample(self) -> Any: ...

    def require(self, name: str, needed_by: str) -> Any: ...


#: Bytes of the tensor a link measurement sends.
_PROBE_BYTES = 4 << 20


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer cost of one micro-batch, in ``unit`` (seconds when measured, FLOPs when counted).

    ``step`` is the layer's share of the optimizer step per micro-batch: the step runs once per ``M`` micro-batches,
    so its time is divided by ``M`` to add up with the per-micro-batch forward and backward. ``cut[i]`` is one
    transfer of layer ``i``'s output (or of its gradient) to a neighbouring stage; it is paid only where a stage
    boundary falls after layer ``i``, by both stages, once forward and once backward.
    """

    forward: list[float]
    backward: list[float]
    step: list[float]
    cut: list[float]
    unit: str

    def totals(self) -> list[float]:
        """Forward + backward + optimizer share per layer: what a stage spends per micro-batch, cuts aside."""
        return [f + b + s for f, b, s in zip(self.forward, self.backward, self.step)]

    @classmethod
    def counted(cls, forward: Sequence[float], backward: Sequence[float], unit: str) -> LayerCosts:
        zeros = [0.0] * len(forward)
        return cls(list(forward), list(backward), zeros, zeros, unit)


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
    """Seconds per micro-batch of every layer on ``ctx.device``, as this rank sees them (no averaging).

    Each layer runs forward and backward ``ctx.repeats`` times after one warm-up, on a copy (the user's modules
    keep their weights), with its gradients accumulating as under gradient accumulation; its optimizer step is a
    ``torch.optim.Adam`` step over its parameters; ``cut`` is its output's bytes times the link's seconds per byte
    (``ctx.seconds_per_byte``, or measured with a broadcast between the ranks; 0 in a single process). Ranks start
    each layer together, so they compete for the machine as they will in training.
    """
    device = torch.device(ctx.device)
    micro_batches = ctx.require("micro_batches", "partition method 'profile'")
    per_byte = ctx.seconds_per_byte if ctx.seconds_per_byte is not None else _link_seconds_per_byte(device)
    costs: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "cut": []}
    x = _map_tensors(ctx.sample(), lambda t: t.detach().to(device))
    tied: dict[str, nn.Module] = {}
    with _rng_preserved(device):
        for index, layer in enumerate(ctx.layers):
            fn, parameters = _on_device(layer, device, tied)
            if _distributed():
                dist.barrier()
            forward, backward, out = _time_forward_backward(fn, x, parameters, index > 0, ctx.repeats, device)
            costs["forward"].append(forward)
            costs["backward"].append(backward)
            costs["step"].append(_time_optimizer_step(parameters, ctx.repeats, device) / micro_batches)
            costs["cut"].append(sum(t.numel() * t.element_size() for t in _tensors(out)) * per_byte)
            x = _map_tensors(out, torch.Tensor.detach)
    return LayerCosts(**costs, unit="s")


def shared_layer_costs(ctx: CostInputs) -> LayerCosts:
    """Measured layer costs that every rank agrees on, bit for bit: each rank measures (``ctx.measure``, default
    :func:`measure_layer_costs`), the ranks average, and rank 0's result is broadcast.

    With ``ctx.cache_path``, a cache entry for this layer list, sample shape, device type, world size and number of
    micro-batches is used instead of measuring, but only if every rank finds it (else all measure: no rank waits
    on another); rank 0 writes the result. Collective: call it on every rank or on none.
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
        "layers": [_describe(layer) for layer in ctx.layers],
        "sample": [[list(t.shape), str(t.dtype)] for t in _tensors(ctx.sample())],
        "device": torch.device(ctx.device).type,
        "world_size": world_size,
        "micro_batches": ctx.micro_batches,
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
        costs = LayerCosts(**entry)
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
    fields = ("forward", "backward", "step", "cut")
    vector = torch.tensor([v for name in fields for v in getattr(costs, name)], dtype=torch.float64, device=device)
    if average:
        dist.all_reduce(vector)
        vector /= dist.get_world_size()
    dist.broadcast(vector, src=0)
    values = vector.tolist()
    n = len(costs.forward)
    return LayerCosts(*(values[i * n : (i + 1) * n] for i in range(len(fields))), unit=costs.unit)


def _link_seconds_per_byte(device: torch.device) -> float:
    """A broadcast from rank 0 timed on every rank; 0 when there is no other rank to send to."""
    if not _distributed() or dist.get_world_size() < 2:
        return 0.0
    probe = torch.zeros(_PROBE_BYTES // 4, device=device)
    dist.broadcast(probe, src=0)
    times = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        dist.broadcast(probe, src=0)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / _PROBE_BYTES


def _time_forward_backward(
    fn: Callable[[Any], Any],
    x: Any,
    parameters: list[torch.Tensor],
    input_grad: bool,
    repeats: int,
    device: torch.device,
) -> tuple[float, float, Any]:
    """Median forward and backward seconds over ``repeats`` runs after one warm-up, and the last output."""
    leaf = _map_tensors(x, lambda t: t.detach().requires_grad_(input_grad and t.is_floating_point()))
    forward_times, backward_times, grads = [], [], None
    for run in range(1 + repeats):
        for t in _tensors(leaf):
            t.grad = None
        inputs = _map_tensors(leaf, torch.Tensor.clone)  # in-place layers must not change the next run's input
        _synchronize(device)
        start = time.perf_counter()
        out = fn(inputs)
        _synchronize(device)
        middle = time.perf_counter()
        outputs = [t for t in _tensors(out) if t.requires_grad]
        if grads is None:
            grads = [torch.ones_like(t) for t in outputs]
        if outputs:
            torch.autograd.backward(outputs, grads)
        _synchronize(device)
        if run:
            forward_times.append(middle - start)
            backward_times.append(time.perf_counter() - middle)
    return statistics.median(forward_times), statistics.median(backward_times), out


def _time_optimizer_step(parameters: list[torch.Tensor], repeats: int, device: torch.device) -> float:
    """Median seconds of an Adam step over ``parameters`` (after a first step that creates its state)."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return 0.0
    optimizer = torch.optim.Adam(parameters)
    times = []
    for _ in range(1 + repeats):
        _synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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
