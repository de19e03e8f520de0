"""The split backward, in one process: I + W give exactly one full backward's gradients (``torch.equal``) and
arithmetic, on a zoo of stages built from standard layers, with and without activation checkpointing."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ds_pipe_ext import compat
from ds_pipe_ext.engine.split_backward import backward_input, backward_weight, check_engine_can_split

WIDTH, HEADS, TOKENS, BATCH, VOCAB = 16, 2, 6, 2, 23


# The split on an AlexNet stage.


def stage_model() -> nn.Module:
    """Conv, in-place ReLU, pooling, a view and Linear layers: the kinds of node an AlexNet stage has."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(8 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def received_input(micro_batch: int = 0) -> torch.Tensor:
    """A received activation as DeepSpeed keeps it: a leaf that requires grad (the forward runs on a clone)."""
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(micro_batch)).requires_grad_()


def full_backward(model: nn.Module, inputs: list[torch.Tensor], output_grad: torch.Tensor) -> None:
    for x in inputs:
        model(x.clone()).backward(output_grad)


def grads(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.grad for x in inputs] + [p.grad for p in model.parameters()]


def assert_same_grads(model: nn.Module, inputs: list, reference: nn.Module, reference_inputs: list) -> None:
    for grad, expected in zip(grads(model, inputs), grads(reference, reference_inputs), strict=True):
        assert (grad is None and expected is None) or torch.equal(grad, expected)


def test_b_then_w_gives_exactly_the_gradients_and_flops_of_one_backward():
    model, reference = stage_model(), stage_model()
    x, x_reference, output_grad = received_input(), received_input(), torch.randn(4, 10)
    reference_output = reference(x_reference.clone())
    with FlopCounterMode(display=False) as full:
        reference_output.backward(output_grad)
    outputs = [model(x.clone())]

    with FlopCounterMode(display=False) as input_half:
        pending = backward_input(outputs, [output_grad], [x], model.parameters())
    assert x.grad is not None and all(p.grad is None for p in model.parameters())
    with FlopCounterMode(display=False) as weight_half:
        backward_weight(pending)

    assert_same_grads(model, [x], reference, [x_reference])
    assert 0 < input_half.get_total_flops() < full.get_total_flops()
    assert input_half.get_total_flops() + weight_half.get_total_flops() == full.get_total_flops()


def test_deferred_weight_passes_accumulate_like_successive_backwards():
    model, reference = stage_model(), stage_model()
    inputs, reference_inputs = [received_input(m) for m in range(3)], [received_input(m) for m in range(3)]
    output_grad = torch.randn(4, 10)
    full_backward(reference, reference_inputs, output_grad)

    pending = [backward_input([model(x.clone())], [output_grad], [x], model.parameters()) for x in inputs]
    for weight_pass in pending:  # every W after all three B passes: deferred, as in ZB-H1
        backward_weight(weight_pass)

    assert_same_grads(model, inputs, reference, reference_inputs)


class SharedWeightBlock(nn.Module):
    """Two inputs, two outputs, and one Linear used at two depths: weights whose gradients join the input path at
    more than one node."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.shared, self.other = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.shared(torch.tanh(self.other(a) + b))
        return self.shared(hidden), hidden * 2


def test_weights_joining_the_input_path_twice_get_the_full_backwards_gradients():
    model, reference = SharedWeightBlock(), SharedWeightBlock()
    inputs = [torch.randn(3, 6, requires_grad=True) for _ in range(2)]
    reference_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    output_grads = [torch.randn(3, 6), torch.randn(3, 6)]
    torch.autograd.backward(list(reference(*reference_inputs)), output_grads)

    backward_weight(backward_input(list(model(*inputs)), output_grads, inputs, model.parameters()))

    assert_same_grads(model, inputs, reference, reference_inputs)


def test_a_gradient_hook_on_the_output_applies_once():
    """DeepSpeed divides the last stage's output gradient by the accumulation steps in a tensor hook; W restarts at
    the node that produced the output, where that hook would fire a second time."""
    model, reference = stage_model(), stage_model()
    x, x_reference, output_grad = received_input(), received_input(), torch.randn(4, 10)
    reference_output = reference(x_reference.clone())
    reference_output.register_hook(lambda grad: grad / 4)
    reference_output.backward(output_grad)

    output = model(x.clone())
    output.register_hook(lambda grad: grad / 4)
    backward_weight(backward_input([output], [output_grad], [x], model.parameters()))

    assert_same_grads(model, [x], reference, [x_reference])


def test_outputs_and_gradients_must_pair_up():
    model = stage_model()
    with pytest.raises(ValueError, match="2 outputs but 1 output gradients"):
        backward_input([model(received_input()), torch.ones(1)], [torch.randn(4, 10)], [], model.parameters())


# The zoo: stages built from the layers people train, each split against a full backward.


class CausalSelfAttention(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=bias), nn.Linear(WIDTH, WIDTH, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, WIDTH))


class MultiheadSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` with a causal mask: one packed in-projection weight for q, k and v."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return self.attention(x, x, x, attn_mask=causal, need_weights=False)[0]


class GatedMLP(nn.Module):
    """LLaMA's MLP: SiLU-gated, bias-free."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH), nn.Dropout(0.1))


class Block(nn.Module):
    """A pre-norm transformer block with residual adds: GPT's (LayerNorm, GELU MLP, dropout) or LLaMA's (RMSNorm,
    gated SiLU MLP)."""

    def __init__(self, attention: Callable[[], nn.Module] = CausalSelfAttention, llama: bool = False) -> None:
        super().__init__()
        norm = nn.RMSNorm if llama else nn.LayerNorm
        self.norm1, self.attention, self.norm2 = norm(WIDTH), attention(), norm(WIDTH)
        self.mlp = GatedMLP() if llama else gelu_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FirstStage(nn.Module):
    """Token and position embeddings, then a block: the stage input is token ids, which require no grad."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions, self.block = nn.Embedding(VOCAB, WIDTH), nn.Embedding(TOKENS, WIDTH), Block()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.tokens(ids) + self.positions(torch.arange(ids.shape[1])))


class LastStage(nn.Module):
    """A block, the final norm and the head tied to the first stage's embedding (TiedLayerSpec's copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.norm, self.embedding = Block(), nn.LayerNorm(WIDTH), nn.Embedding(VOCAB, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.block(x)), self.embedding.weight)


class WholeGPT(nn.Module):
    """Embedding, a block and the head tied to the embedding, in one stage fed token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.norm = FirstStage(), nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.first(ids)), self.first.tokens.weight)


class TiedOnTheInputPath(nn.Module):
    """A received activation plus an embedding of token ids, a block, and the head tied to that embedding: one weight
    whose gradient joins the input path at two depths."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.block, self.norm = nn.Embedding(VOCAB, WIDTH), Block(), nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.block(x + self.embedding(ids))), self.embedding.weight)


class TupleStage(nn.Module):
    """Tuples between stages: a hidden state, an integer mask and a second activation in; a hidden state, the mask,
    a tensor that requires no grad and a second output out."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.mix = Block(), nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.block(x) * mask.unsqueeze(-1)
        return hidden, mask, hidden.detach().sum(-1), self.mix(extra) + hidden


class ParallelUses(nn.Module):
    """One Linear applied to three branches that do not lie on each other's path: three joins, one W call."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.other = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x) + self.shared(torch.tanh(self.other(x))) + self.shared(x.sin())


class RepeatedBlock(nn.Module):
    """ALBERT's sharing: one block applied three times."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(self.block(x)))


class OutputOfWeightsAlone(nn.Module):
    """An output computed from a weight alone, next to one computed from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.offset = nn.Linear(WIDTH, WIDTH), nn.Parameter(torch.randn(WIDTH))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x) + self.offset, self.offset.exp()


def hidden(micro_batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(micro_batch)
    return torch.randn(BATCH, TOKENS, WIDTH, generator=generator).requires_grad_()


def token_ids(micro_batch: int) -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(100 + micro_batch))


@dataclass
class Stage:
    """A stage model (built the same way every call), the inputs it receives for a micro-batch, and the weights
    whose gradients I computes itself (joining the input path at two depths)."""

    build: Callable[[], nn.Module]
    receive: Callable[[int], tuple[torch.Tensor, ...]]
    weights_in_i: tuple[str, ...] = ()

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build()

    def inputs(self, micro_batch: int) -> list[torch.Tensor]:
        return list(self.receive(micro_batch))


def sequential(*layers: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*(layer() for layer in layers))


linear = functools.partial(nn.Linear, WIDTH, WIDTH)
linear_nobias = functools.partial(nn.Linear, WIDTH, WIDTH, bias=False)
layernorm = functools.partial(nn.LayerNorm, WIDTH)
rmsnorm = functools.partial(nn.RMSNorm, WIDTH)
one_hidden = lambda m: (hidden(m),)

ZOO = {
    "linear_nobias-layernorm": Stage(sequential(linear_nobias, layernorm), one_hidden),
    "linear-linear": Stage(sequential(linear, linear), one_hidden),
    "linear_nobias-linear_nobias": Stage(sequential(linear_nobias, linear_nobias), one_hidden),
    "layernorm-linear": Stage(sequential(layernorm, linear), one_hidden),
    "layernorm-linear_nobias-layernorm-linear": Stage(
        sequential(layernorm, linear_nobias, layernorm, linear), one_hidden
    ),
    "rmsnorm-linear_nobias": Stage(sequential(rmsnorm, linear_nobias), one_hidden),
    "linear-rmsnorm-linear": Stage(sequential(linear, rmsnorm, linear), one_hidden),
    "linear-gelu-linear": Stage(sequential(linear, nn.GELU, linear), one_hidden),
    "linear_nobias-silu-linear_nobias": Stage(sequential(linear_nobias, nn.SiLU, linear_nobias), one_hidden),
    "attention_block": Stage(Block, one_hidden),
    "attention_with_biases_block": Stage(lambda: Block(functools.partial(CausalSelfAttention, bias=True)), one_hidden),
    "multihead_attention_block": Stage(lambda: Block(MultiheadSelfAttention), one_hidden),
    "llama_block": Stage(lambda: Block(llama=True), one_hidden),
    "two_blocks": Stage(sequential(Block, lambda: Block(llama=True)), one_hidden),
    "first_stage_token_ids": Stage(FirstStage, lambda m: (token_ids(m),)),
    "last_stage_tied_head": Stage(LastStage, one_hidden),
    "whole_gpt_tied_in_one_stage": Stage(WholeGPT, lambda m: (token_ids(m),)),
    "tied_twice_on_the_input_path": Stage(
        TiedOnTheInputPath, lambda m: (hidden(m), token_ids(m)), weights_in_i=("embedding.weight",)
    ),
    "tuples_in_and_out": Stage(TupleStage, lambda m: (hidden(m), token_ids(m) % 2, hidden(10 + m))),
    "one_linear_on_parallel_branches": Stage(ParallelUses, one_hidden),
    "one_block_applied_three_times": Stage(
        RepeatedBlock, one_hidden, weights_in_i=tuple(f"block.{name}" for name, _ in Block().named_parameters())
    ),
    "output_of_weights_alone": Stage(OutputOfWeightsAlone, one_hidden),
}


def forward(model: nn.Module, inputs: list[torch.Tensor], seed: int = 0) -> tuple[list, list]:
    """Run the stage on clones of its inputs, as DeepSpeed does, and make the gradients the next stage would send:
    one for every floating-point output, as DeepSpeed sends them."""
    torch.manual_seed(1000 + seed)  # the same dropout masks in both models
    outputs = model(*(tensor.clone() for tensor in inputs))
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    generator = torch.Generator().manual_seed(seed)
    output_grads = [
        torch.randn(output.shape, generator=generator) if output.is_floating_point() else None for output in outputs
    ]
    return outputs, output_grads


def full_backwards(model: nn.Module, inputs: list[list[torch.Tensor]], counter: Any = None) -> None:
    """DeepSpeed's backward for each micro-batch in turn (outputs that require no grad left out), the backwards
    optionally inside a counter."""
    forwards = [forward(model, stage_inputs, micro_batch) for micro_batch, stage_inputs in enumerate(inputs)]
    with counter or contextlib.nullcontext():
        for outputs, output_grads in forwards:
            differentiable = [(out, grad) for out, grad in zip(outputs, output_grads) if out.requires_grad]
            torch.autograd.backward([out for out, _ in differentiable], [grad for _, grad in differentiable])


def split_backwards(model: nn.Module, inputs: list[list[torch.Tensor]], counters: tuple = ()) -> set[str]:
    """I for every micro-batch, then every W (deferred, as ZB-H1 defers them), optionally each half inside its own
    counter; the names of the weights that had a gradient before W."""
    forwards = [forward(model, stage_inputs, micro_batch) for micro_batch, stage_inputs in enumerate(inputs)]
    input_counter, weight_counter = counters or (contextlib.nullcontext(), contextlib.nullcontext())
    with input_counter:
        pending = [
            backward_input(outputs, output_grads, stage_inputs, model.parameters())
            for (outputs, output_grads), stage_inputs in zip(forwards, inputs)
        ]
    got_grads_in_i = {name for name, weight in model.named_parameters() if weight.grad is not None}
    with weight_counter:
        for weight_pass in pending:
            backward_weight(weight_pass)
    return got_grads_in_i


@pytest.mark.parametrize("name", ["linear_nobias-layernorm", "multihead_attention_block"])
def test_weights_are_grouped_by_identity_not_by_tensor_equality(name):
    """Regression: weights were grouped with ``list.remove`` on a dataclass holding tensors, which compares tensors
    with ``==``. A bias-free Linear before a LayerNorm (groups of equal-shaped weights) raised "Boolean value of
    Tensor with more than one value is ambiguous"; ``nn.MultiheadAttention`` (its 48-row packed in-projection
    weight grouped before the 16-row out-projection) raised "The size of tensor a (48) must match the size of
    tensor b (16)"."""
    case = ZOO[name]
    model, reference = case.model(), case.model()
    inputs, reference_inputs = case.inputs(0), case.inputs(0)
    outputs, output_grads = forward(reference, reference_inputs)
    torch.autograd.backward(outputs, output_grads)
    outputs, output_grads = forward(model, inputs)
    backward_weight(backward_input(outputs, output_grads, inputs, model.parameters()))
    assert_same_grads(model, inputs, reference, reference_inputs)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_split_gives_a_full_backwards_gradients_and_flops_with_every_w_deferred(name):
    case = ZOO[name]
    reference, model = case.model(), case.model()
    reference_inputs, inputs = [case.inputs(m) for m in range(2)], [case.inputs(m) for m in range(2)]
    full_backwards(reference, reference_inputs)
    got_grads_in_i = split_backwards(model, inputs)

    assert got_grads_in_i == set(case.weights_in_i)
    assert_same_grads(model, sum(inputs, []), reference, sum(reference_inputs, []))
    assert all(weight.grad is not None for weight in model.parameters())

    # FLOPs on fresh copies: FlopCounterMode decomposes some backward kernels (SiLU's), changing their rounding.
    full = FlopCounterMode(display=False)
    full_backwards(case.model(), [case.inputs(m) for m in range(2)], full)
    counters = FlopCounterMode(display=False), FlopCounterMode(display=False)
    split_backwards(case.model(), [case.inputs(m) for m in range(2)], counters)
    input_flops, weight_flops = (counter.get_total_flops() for counter in counters)
    assert input_flops + weight_flops == full.get_total_flops()
    deferred = {name for name, _ in model.named_parameters()} - set(case.weights_in_i)
    assert (weight_flops > 0) == bool(deferred)


def test_a_stage_fed_token_ids_leaves_the_whole_backward_to_w():
    """The first stage: no input requires grad, so I has nothing to compute and W runs the full backward."""
    case = ZOO["first_stage_token_ids"]
    model = case.model()
    ids = case.inputs(0)
    outputs, output_grads = forward(model, ids)
    with FlopCounterMode(display=False) as input_half:
        pending = backward_input(outputs, output_grads, ids, model.parameters())
    assert input_half.get_total_flops() == 0 and all(weight.grad is None for weight in model.parameters())
    assert pending.nbytes() == output_grads[0].nbytes
    backward_weight(pending)
    assert all(weight.grad is not None for weight in model.parameters())


# Activation checkpointing: a checkpointed stage against the same stage without.


class CountingBlock(Block):
    """A block that takes and passes on token ids, as ``PipelineModule`` layers pass tuples, and counts its
    forwards: the first, and each recomputation."""

    def __init__(self, llama: bool = False) -> None:
        super().__init__(llama=llama)
        self.positions, self.forwards = nn.Embedding(VOCAB, WIDTH), 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.forwards += 1
        return super().forward(x + self.positions(ids)), ids


class CheckpointedStage(nn.Module):
    """Two blocks, each checkpointed as ``PipelineModule.forward`` does: ``checkpoint(layers, *inputs)``."""

    def __init__(self, checkpoint: Callable | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CountingBlock(), CountingBlock(llama=True)])
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, ids = self.checkpoint(block, x, ids) if self.checkpoint else block(x, ids)
        return x

    def forwards(self) -> int:
        return sum(block.forwards for block in self.blocks)


def needs_accelerator_streams() -> bool:
    """Whether DeepSpeed's checkpoint functions need accelerator streams the installed accelerator lacks (the CPU
    one before DeepSpeed 0.19.8)."""
    from deepspeed.accelerator import get_accelerator

    return "Stream(device" in inspect.getsource(ds_checkpointing) and get_accelerator().Stream is None


NO_STREAMS = "this DeepSpeed's activation checkpointing needs accelerator streams, which the CPU one lacks"


CHECKPOINTS = {
    "torch_non_reentrant": (functools.partial(torch_checkpoint, use_reentrant=False), 1),
    "deepspeed_non_reentrant": (ds_checkpointing.non_reentrant_checkpoint, 0),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpointed_stage_splits_into_the_gradients_of_the_stage_without_checkpoints(name):
    """I recomputes each region once. DeepSpeed's non-reentrant checkpoint keeps what it recomputed while the graph
    holds it, so W recomputes nothing; PyTorch's keeps it per backward call, so W recomputes each region once."""
    checkpoint, w_recomputations = CHECKPOINTS[name]
    if name.startswith("deepspeed") and needs_accelerator_streams():
        pytest.skip(NO_STREAMS)
    torch.manual_seed(0)
    reference = CheckpointedStage(None)
    torch.manual_seed(0)
    model = CheckpointedStage(checkpoint)
    reference_inputs = [[hidden(m), token_ids(m)] for m in range(2)]
    inputs = [[hidden(m), token_ids(m)] for m in range(2)]
    full_backwards(reference, reference_inputs)

    pending = []
    for micro_batch, stage_inputs in enumerate(inputs):
        outputs, output_grads = forward(model, stage_inputs, micro_batch)
        pending.append(backward_input(outputs, output_grads, stage_inputs, model.parameters()))
    assert model.forwards() == 2 * 2 * 2  # two blocks, two micro-batches: forward and I's recomputation
    assert all(weight.grad is None for weight in model.parameters())
    for weight_pass in pending:
        backward_weight(weight_pass)

    assert model.forwards() == 2 * 2 * (2 + w_recomputations)
    assert_same_grads(model, sum(inputs, []), reference, sum(reference_inputs, []))


def test_deepspeeds_reentrant_checkpoint_cannot_split():
    """Why the engine refuses it: the checkpoint is one node whose backward runs a full backward of its layers, and
    it refuses a backward that names its inputs, as I does (its stage input must require grad, as here)."""
    if needs_accelerator_streams():
        pytest.skip(NO_STREAMS)
    model = CheckpointedStage(ds_checkpointing.checkpoint)
    x, ids = hidden(0), token_ids(0)
    out = model(x.clone(), ids)
    with pytest.raises(RuntimeError, match="Checkpointing is not compatible with .grad"):
        backward_input([out], [torch.ones_like(out)], [x, ids], model.parameters())


# What the engine runs the split with: every precision and ZeRO stage DeepSpeed's PipelineEngine trains with, from the
# release whose backward is made of pieces (DeepSpeed's own engine runs in tests/test_mixed_precision.py).


def engine_config(**overrides) -> SimpleNamespace:
    settings = {"fp16": False, "bf16": False, "zero": 0, "checkpoint": 0, "amp": None}
    settings["checkpoint_func"] = ds_checkpointing.checkpoint  # DeepSpeed's default: reentrant
    settings.update(overrides)
    engine = SimpleNamespace(
        fp16_enabled=lambda: settings["fp16"],
        bfloat16_enabled=lambda: settings["bf16"],
        zero_optimization_stage=lambda: settings["zero"],
        module=SimpleNamespace(
            activation_checkpoint_interval=settings["checkpoint"],
            activation_checkpoint_func=settings["checkpoint_func"],
        ),
    )
    if settings["amp"] is not None:  # DeepSpeed releases with apex AMP support
        engine.amp_enabled = lambda: settings["amp"]
    return engine


MIXED = {
    "bf16": {"bf16": True},
    "fp16": {"fp16": True},
    "fp32, ZeRO stage 1": {"zero": 1},
    "bf16, ZeRO stage 1": {"bf16": True, "zero": 1},
    "fp16, ZeRO stage 1": {"fp16": True, "zero": 1},
    "bf16, non-reentrant checkpoints": {"bf16": True, "checkpoint": 1},
}


@pytest.mark.parametrize("name", MIXED)
def test_mixed_precision_and_zero_stage_1_split_from_the_release_whose_backward_is_in_pieces(monkeypatch, name):
    settings = {"checkpoint_func": ds_checkpointing.non_reentrant_checkpoint, **MIXED[name]}
    monkeypatch.setattr(compat, "backward_in_pieces", lambda: True)
    check_engine_can_split(engine_config(**settings))
    check_engine_can_split(engine_config(amp=False, **settings))
    monkeypatch.setattr(compat, "backward_in_pieces", lambda: False)
    check_engine_can_split(engine_config(checkpoint_func=settings["checkpoint_func"]))  # fp32, ZeRO 0: every release
    wanted = " and ".join(part for part in ("fp16", "bf16", "ZeRO stage 1") if part in name)
    message = rf"run {wanted} from DeepSpeed 0\.18\.3 on, .*; this is DeepSpeed .*: "
    message += r"pip install 'deepspeed>=0\.18\.3,<0\.20', run fp32 with ZeRO stage 0, or use schedule '1f1b'"
    with pytest.raises(ValueError, match=message):
        check_engine_can_split(engine_config(**settings))


def test_the_installed_release_splits_mixed_precision_if_it_is_0_18_3_or_later():
    import deepspeed

    assert compat.SPLIT_PRECISION_SINCE == "0.18.3"
    assert compat.backward_in_pieces() is (compat.release(deepspeed.__version__) >= (0, 18, 3))


def test_what_deepspeeds_pipeline_cannot_run_or_the_split_cannot_reproduce_is_refused():
    with pytest.raises(ValueError, match=r"run ZeRO stage 0 or 1; this run has ZeRO stage 2: use stage 1, or .*1f1b"):
        check_engine_can_split(engine_config(zero=2))
    with pytest.raises(ValueError, match=r"cannot split apex AMP's backward .*this run has \"amp\": use \"fp16\""):
        check_engine_can_split(engine_config(amp=True))


def test_only_reentrant_activation_checkpointing_is_refused():
    message = r"cannot split a reentrant activation checkpoint; .* set \"pipeline\": {\"use_reentrant\": false}"
    with pytest.raises(ValueError, match=message):
        check_engine_can_split(engine_config(checkpoint=1))
    reentrant_torch = functools.partial(torch_checkpoint, use_reentrant=True)
    with pytest.raises(ValueError, match="cannot split a reentrant activation checkpoint"):
        check_engine_can_split(engine_config(checkpoint=1, checkpoint_func=reentrant_torch, bf16=True))
    non_reentrant_torch = functools.partial(torch_checkpoint, use_reentrant=False)
    for checkpoint_func in (ds_checkpointing.non_reentrant_checkpoint, non_reentrant_torch):
        check_engine_can_split(engine_config(checkpoint=1, checkpoint_func=checkpoint_func))
