"""A small GPT as a DeepSpeed pipeline layer list: tied embedding and output head, pre-LayerNorm blocks.

``gpt_layers(config)`` is what a ``PipelineModule`` takes: the token embedding, learned positions, ``config.layers``
transformer blocks, a final LayerNorm, and the output head. The embedding and the head are one
``TiedLayerSpec("embed", ...)``: on one stage they share a module, across stages DeepSpeed keeps a copy on each and
all-reduces the copies' gradients (``ReduceTiedGrads``), so a pipeline trains the same weights as one process.

:class:`GPT` is the same network without a pipeline (the examples' ``-p 0`` baseline), initialised exactly as a
``PipelineModule(..., seed_layers=True, base_seed=...)`` initialises the layer list on any stage layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.utils import set_random_seed
from torch import nn

#: The key the embedding and the output head share.
TIED_KEY = "embed"


@dataclass(frozen=True)
class GPTConfig:
    """The network's sizes. The defaults (0.8 M parameters) are sized for CPUs: the example trains 40 steps on 2 CPU
    ranks in about a minute."""

    vocab_size: int = 64
    seq_len: int = 64
    width: int = 128
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "width", "heads", "layers", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT {name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(
                f"GPT width {self.width} is not divisible by {self.heads} heads: each head takes width / heads "
                "channels; choose a width that is a multiple of the number of heads"
            )

    @property
    def num_layers(self) -> int:
        """Entries of the layer list: embedding, positions, the blocks, final LayerNorm, head."""
        return self.layers + 4


class TokenEmbedding(nn.Embedding):
    """Token embedding initialised as GPT-2's, N(0, 0.02): the same matrix is the output head, whose logits would
    start with a standard deviation of sqrt(width) under ``nn.Embedding``'s N(0, 1)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


def output_logits(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output head: logits against the token embedding's own matrix (the tied weight)."""
    return F.linear(hidden, embedding.weight)


class LearnedPositions(nn.Module):
    """Adds a learned vector per position, GPT-2's absolute position embedding."""

    def __init__(self, seq_len: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(seq_len, width))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.size(1)]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, seq, width))


class TransformerBlock(nn.Module):
    """A pre-LayerNorm block: ``x + attention(ln(x))``, then ``x + mlp(ln(x))``, as GPT-2's."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, depth: int = 1):
        super().__init__()
        self.ln_attention = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width, bias=False),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width, bias=False),
        )
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 * depth), so that the stream's
        # variance does not grow with the number of blocks.
        with torch.no_grad():
            for projection in (self.attention.proj, self.mlp[2]):
                projection.weight.mul_(1 / math.sqrt(2 * depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_attention(x))
        return x + self.mlp(self.ln_mlp(x))


def gpt_layers(config: GPTConfig) -> list[LayerSpec]:
    """The GPT as a ``PipelineModule`` layer list (specs: each stage builds only its own layers)."""
    return [
        TiedLayerSpec(TIED_KEY, TokenEmbedding, config.vocab_size, config.width),
        LayerSpec(LearnedPositions, config.seq_len, config.width),
        *(
            LayerSpec(TransformerBlock, config.width, config.heads, config.mlp_ratio, config.layers)
            for _ in range(config.layers)
        ),
        LayerSpec(nn.LayerNorm, config.width),
        TiedLayerSpec(TIED_KEY, TokenEmbedding, config.vocab_size, config.width, forward_fn=output_logits),
    ]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every position's prediction of the token after it (``targets`` are the inputs
    shifted by one). In fp32 whatever the model's dtype: a bf16 or fp16 log-softmax over the vocabulary loses
    the small probabilities the loss is made of."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def sample_batch(config: GPTConfig, micro_batch: int) -> torch.Tensor:
    """A micro-batch of the shape the first stage receives (token ids), for shape-based partition methods."""
    return torch.zeros(micro_batch, config.seq_len, dtype=torch.long)


class GPT(nn.Module):
    """:func:`gpt_layers` as one module, without a pipeline: the examples' ``-p 0`` baseline.

    Each layer is built after seeding with ``base_seed + its index``, the tied module once at its first index, as
    DeepSpeed's ``PipelineModule(seed_layers=True, base_seed=base_seed)`` builds them, so both start from the same
    weights. The state dict names a parameter ``layers.<index>.<name>``, as the pipeline's checkpoint files
    ``layer_<index>-model_states.pt`` do.
    """

    def __init__(self, config: GPTConfig, base_seed: int = 1234):
        super().__init__()
        self.layers = nn.ModuleDict()
        self._forward_fns: list[Callable[[Any], Any]] = []
        tied: dict[str, nn.Module] = {}
        for index, spec in enumerate(gpt_layers(config)):
            set_random_seed(base_seed + index)
            if isinstance(spec, TiedLayerSpec) and spec.key in tied:
                module = tied[spec.key]
            else:
                module = self.layers[str(index)] = spec.build()
                if isinstance(spec, TiedLayerSpec):
                    tied[spec.key] = module
            forward_fn = getattr(spec, "forward_fn", None)
            self._forward_fns.append(module if forward_fn is None else partial(forward_fn, module))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for forward_fn in self._forward_fns:
            x = forward_fn(x)
        return x
