"""A GPT-style language model trained with pipeline parallelism, with partition method and schedule as flags.

    deepspeed examples/gpt/train.py --deepspeed_config examples/gpt/ds_config_cpu.json -p 2 --steps 40

trains ``ds_pipe_ext.models.gpt`` (tied embedding and head, pre-LayerNorm blocks, causal attention) on built-in
token sequences from a random Markov chain (``data.py``), in 2 pipeline stages; ``-p 0`` is the non-pipeline
data-parallel baseline. The flags, checks, checkpoints and log every example shares are in ``examples/common.py``;
this file adds the model and the data.
"""

from __future__ import annotations

import argparse
import os
import sys

from ds_pipe_ext.models.gpt import GPT, GPTConfig, gpt_layers, next_token_loss, sample_batch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/
from common import Example, RunPlan, argument_parser, run  # noqa: E402
from gpt.data import build_trainset  # noqa: E402

DEFAULTS = GPTConfig()


def get_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("GPT")
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS.vocab_size, help="tokens in the vocabulary")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="tokens per sequence")
    parser.add_argument("--width", type=int, default=DEFAULTS.width, help="model width (embedding size)")
    parser.add_argument("--heads", type=int, default=DEFAULTS.heads, help="attention heads per block")
    parser.add_argument("--layers", type=int, default=DEFAULTS.layers, help="transformer blocks")
    return parser.parse_args(argv)


def build_example(args: argparse.Namespace) -> Example:
    """The GPT as a layer list, its token data and next-token loss; checks the model's sizes."""
    config = GPTConfig(
        vocab_size=args.vocab_size, seq_len=args.seq_len, width=args.width, heads=args.heads, layers=args.layers
    )
    return Example(
        layers=lambda: gpt_layers(config),
        model=lambda: GPT(config, base_seed=args.seed),
        sample_input=lambda micro_batch: sample_batch(config, micro_batch),
        loss_fn=next_token_loss,
        trainset=lambda: build_trainset(config.vocab_size, config.seq_len, args.seed),
        settings={
            "model": "gpt",
            "dataset": "markov",
            "vocab_size": config.vocab_size,
            "seq_len": config.seq_len,
            "width": config.width,
            "heads": config.heads,
            "layers": config.layers,
            "seed": args.seed,
        },
        # Each layer seeded by its index, so every stage layout starts from the weights GPT(config) starts from.
        pipeline_options={"seed_layers": True, "base_seed": args.seed},
    )


def main(argv=None) -> None:
    args = get_args(argv)
    run(args, RunPlan(args, build_example(args)))  # the plan raises on every rank, before any collective


if __name__ == "__main__":
    main()
