"""DeepSpeedExamples' AlexNet/CIFAR-10 pipeline run, with partition method and schedule as flags.

    deepspeed examples/alexnet_cifar/train.py --deepspeed_config ds_config.json -p 2 --steps 200

runs the original (``-p 0``: the non-pipeline data-parallel baseline). It runs unchanged on GPUs (nccl) and
on CPUs (gloo). The flags, checks, checkpoints and log every example shares are in ``examples/common.py``;
this file adds the model and the data.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from deepspeed import comm as dist

from ds_pipe_ext.models.vision import MODELS, build_layers, build_model, check_image_size, sample_batch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # examples/
from alexnet_cifar.data import build_trainset, cifar10_present  # noqa: E402
from common import Example, RunPlan, argument_parser, run  # noqa: E402

DEFAULT_DATA_DIR = "/tmp/cifar10-data"


def get_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("CIFAR")
    parser.add_argument("--model", choices=MODELS, default="alexnet")
    parser.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"where CIFAR-10 is (default: {DEFAULT_DATA_DIR}, downloaded there if missing; a given directory "
        "must hold it)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="square input size (original: 224)")
    parser.add_argument("--dropout", type=float, default=0.5, help="classifier dropout (0 makes runs comparable)")
    return parser.parse_args(argv)


def build_example(args: argparse.Namespace) -> Example:
    """The torchvision model as a layer list, CIFAR-10 or its look-alike; checks the flags of both."""
    check_image_size(args.model, args.image_size)
    data_dir = checked_data_dir(args)
    return Example(
        layers=lambda: build_layers(args.model, dropout=args.dropout),
        model=lambda: build_model(args.model, dropout=args.dropout),
        sample_input=lambda micro_batch: sample_batch(args.image_size, micro_batch),
        loss_fn=torch.nn.CrossEntropyLoss(),
        trainset=lambda: build_trainset(
            args.dataset, data_dir, args.image_size, args.seed, args.local_rank, barrier=dist.barrier
        ),
        settings={
            "model": args.model,
            "dataset": args.dataset,
            "image_size": args.image_size,
            "seed": args.seed,
            "dropout": args.dropout,
        },
    )


def checked_data_dir(args: argparse.Namespace) -> str:
    if args.dataset == "cifar10" and args.data_dir is not None and not cifar10_present(args.data_dir):
        raise FileNotFoundError(
            f"--data-dir {args.data_dir} does not hold CIFAR-10 (expected {args.data_dir}/cifar-10-batches-py): "
            "extract cifar-10-python.tar.gz there, leave out --data-dir to download it into "
            f"{DEFAULT_DATA_DIR}, or use --dataset synthetic"
        )
    return args.data_dir or DEFAULT_DATA_DIR


def main(argv=None) -> None:
    args = get_args(argv)
    run(args, RunPlan(args, build_example(args)))  # the plan raises on every rank, before any collective


if __name__ == "__main__":
    main()
