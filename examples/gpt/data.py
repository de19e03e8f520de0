"""Training data for the GPT example: token sequences from a fixed random sparse Markov chain, built in.

Each token is followed by one of ``successors`` tokens (its own, chosen at random when the chain is made) with
fixed random probabilities. Guessing costs ln(vocab_size) nats per token (4.16 for 64 tokens); a model that has
learned the chain gets down to :meth:`MarkovTokens.best_loss` (0.84 with the example's defaults), and a small GPT
gets most of the way within a few dozen steps. Sample ``i`` is a pure function of (seed, i): every rank and every
run sees the same sequences, and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# The two random streams of a seed: the chain, drawn once, and the samples, one stream per index.
_CHAIN, _SAMPLE = 0, 1


class MarkovTokens(Dataset):
    """``size`` sequences of ``seq_len + 1`` tokens, each sample ``(tokens[:-1], tokens[1:])``: the inputs and
    the next-token targets."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 1138, size: int = 100_000, successors: int = 3):
        if not 1 <= successors <= vocab_size:
            raise ValueError(f"successors must be between 1 and the vocabulary size {vocab_size}, got {successors}")
        if seq_len < 1 or size < 1:
            raise ValueError(f"seq_len and size must be at least 1, got seq_len {seq_len} and size {size}")
        self.seed = seed
        self.size = size
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        chain = np.random.default_rng((seed, _CHAIN))
        self.next_tokens = np.stack([chain.choice(vocab_size, successors, replace=False) for _ in range(vocab_size)])
        probabilities = chain.dirichlet(np.ones(successors), size=vocab_size)
        self.cumulative = np.cumsum(probabilities, axis=1)
        self.cumulative[:, -1] = 1.0  # so that a uniform draw below 1 always finds a successor

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} is out of range for {self.size} samples")
        rng = np.random.default_rng((self.seed, _SAMPLE, index))
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        tokens[0] = rng.integers(self.vocab_size)
        for position, draw in enumerate(rng.random(self.seq_len), start=1):
            previous = tokens[position - 1]
            tokens[position] = self.next_tokens[previous, np.searchsorted(self.cumulative[previous], draw, "right")]
        sequence = torch.from_numpy(tokens)
        return sequence[:-1], sequence[1:]

    def best_loss(self) -> float:
        """The lowest mean next-token loss any model can reach on these sequences, in nats: at each position the
        entropy of the chain's next step, weighted by how likely each token is there (the first is uniform)."""
        probabilities = np.diff(self.cumulative, axis=1, prepend=0.0)
        transition = np.zeros((self.vocab_size, self.vocab_size))
        np.put_along_axis(transition, self.next_tokens, probabilities, axis=1)
        next_step_entropy = -np.sum(probabilities * np.log(np.maximum(probabilities, 1e-300)), axis=1)
        position = np.full(self.vocab_size, 1 / self.vocab_size)
        total = 0.0
        for _ in range(self.seq_len):
            total += position @ next_step_entropy
            position = position @ transition
        return float(total / self.seq_len)


def build_trainset(vocab_size: int, seq_len: int, seed: int) -> tuple[MarkovTokens, str]:
    """The dataset the run trains on and a one-line description of it for the log."""
    data = MarkovTokens(vocab_size, seq_len, seed=seed)
    description = (
        f"markov (built-in: {len(data)} sequences of {seq_len} tokens from a random Markov chain over "
        f"{vocab_size} tokens, seed {seed}; best possible loss {data.best_loss():.3f})"
    )
    return data, description
