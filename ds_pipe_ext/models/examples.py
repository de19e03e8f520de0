"""The reference models by name, as ``ds-pipe plan``, the planner's commands and the benchmarks use them.

Each entry says how to build the layer list, how to make a micro-batch of inputs and labels, which loss trains it,
and which example script runs it (with ``-p``, ``--partition`` and ``--schedule``). A new reference model is one
more entry in :data:`EXAMPLE_MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import vision

__all__ = ["EXAMPLE_MODELS", "ExampleModel", "example_model"]

#: (micro-batch size, size, generator) -> (inputs, labels); ``size`` is the image side or the sequence length.
BatchFn = Callable[[int, int, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ExampleModel:
    """A reference model: its layers, its data, its loss and the script that trains it.

    ``size`` is the one shape knob the model has (the image side, the sequence length), named on the script's
    command line by ``size_flag``; ``build_layers(size)`` gives the layer list (modules or DeepSpeed layer specs);
    ``check_size`` rejects sizes the model cannot run before any rank starts.
    """

    name: str
    build_layers: Callable[[int], list]
    make_batch: BatchFn
    loss_fn: Callable[[], Callable[..., torch.Tensor]]
    default_size: int
    size_flag: str
    check_size: Callable[[int], None] = lambda size: None
    script: str | None = None
    script_args: tuple[str, ...] = field(default_factory=tuple)

    def sample_input(self, micro_batch: int, size: int) -> torch.Tensor:
        """The micro-batch the first stage receives (zeros: only its shape matters), leaving the random state be."""
        with torch.random.fork_rng(devices=[]):
            return torch.zeros_like(self.make_batch(micro_batch, size, None)[0])

    def command(self, world_size: int, size: int, flags: list[str], config: str = "ds_config.json") -> str | None:
        """The launch of the example script with ``flags`` (``-p``, ``--partition``, ``--schedule``), or ``None``
        for a model without a script."""
        if self.script is None:
            return None
        words = ["deepspeed", "--num_gpus", str(world_size), self.script, "--deepspeed_config", config]
        return " ".join([*words, *self.script_args, self.size_flag, str(size), *flags])


def _vision(name: str) -> ExampleModel:
    return ExampleModel(
        name=name,
        build_layers=lambda size: vision.build_layers(name, dropout=0.0),
        make_batch=lambda micro_batch, size, generator: vision.labelled_batch(size, micro_batch, generator),
        loss_fn=nn.CrossEntropyLoss,
        default_size=224,
        size_flag="--image-size",
        check_size=lambda size: vision.check_image_size(name, size),
        script="examples/alexnet_cifar/train.py",
        script_args=("--model", name),
    )


def _gpt_module():  # imported when used: models.gpt imports DeepSpeed, which `ds-pipe --help` must not
    from . import gpt

    return gpt


def _gpt_batch(micro_batch: int, seq_len: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, _gpt_module().GPTConfig.vocab_size, (micro_batch, seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _gpt() -> ExampleModel:
    """The GPT example at its default width and depth; ``size`` is the sequence length."""
    return ExampleModel(
        name="gpt",
        build_layers=lambda seq_len: _gpt_module().gpt_layers(_gpt_module().GPTConfig(seq_len=seq_len)),
        make_batch=_gpt_batch,
        loss_fn=lambda: _gpt_module().next_token_loss,
        default_size=64,
        size_flag="--seq-len",
        script="examples/gpt/train.py",
    )


EXAMPLE_MODELS: dict[str, ExampleModel] = {**{name: _vision(name) for name in vision.MODELS}, "gpt": _gpt()}


def example_model(name: str) -> ExampleModel:
    """The reference model ``name``, or a ValueError listing them."""
    if name not in EXAMPLE_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(EXAMPLE_MODELS)}")
    return EXAMPLE_MODELS[name]
