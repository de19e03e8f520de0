"""The DeepSpeedExamples image models (torchvision's AlexNet and VGG19) as pipeline layer lists.

torchvision is imported only when a model is built: ``pip install 'ds_pipe_ext[examples]'`` brings it.
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("alexnet", "vgg19")

#: torchvision's AlexNet shrinks 224 px to 6 px before its adaptive pool; below 63 px a MaxPool gets an
#: empty input and fails deep inside the forward pass.
MIN_IMAGE_SIZE = {"alexnet": 63, "vgg19": 32}


def build_model(name: str, num_classes: int = 10, dropout: float = 0.5) -> nn.Module:
    """The torchvision network the DeepSpeedExamples pipeline run trains."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    try:
        from torchvision.models import AlexNet, vgg19
    except ImportError as error:
        raise ImportError(f"the {name} example model needs torchvision: pip install 'ds_pipe_ext[examples]'") from error

    if name == "alexnet":
        return AlexNet(num_classes=num_classes, dropout=dropout)
    return vgg19(num_classes=num_classes, dropout=dropout)


def join_layers(net: nn.Module) -> list[nn.Module]:
    """``[*features, avgpool, flatten, *classifier]``, the layer list of DeepSpeedExamples' ``join_layers``.

    The flatten step is ``nn.Flatten()`` rather than the original lambda, so the list pickles and partition
    methods can see it; it has no parameters and computes the same ``torch.flatten(x, 1)``.
    """
    return [*net.features, net.avgpool, nn.Flatten(1), *net.classifier]


def build_layers(name: str, num_classes: int = 10, dropout: float = 0.5) -> list[nn.Module]:
    """The example model as a pipeline layer list."""
    return join_layers(build_model(name, num_classes=num_classes, dropout=dropout))


def check_image_size(name: str, image_size: int) -> None:
    """Reject image sizes the model cannot run, before any rank starts work."""
    smallest = MIN_IMAGE_SIZE.get(name, 1)
    if image_size < smallest:
        raise ValueError(
            f"--image-size {image_size} is too small for {name}: its pooling layers need at least "
            f"{smallest} px (use --image-size {smallest} or more; 64 is quick on CPU, 224 is the original)"
        )


def sample_batch(image_size: int, micro_batch: int, channels: int = 3) -> torch.Tensor:
    """A micro-batch of the shape the first stage receives, for shape-based partition methods."""
    return torch.zeros(micro_batch, channels, image_size, image_size)


def labelled_batch(
    image_size: int, micro_batch: int, generator: torch.Generator | None = None, classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels of one micro-batch, for benchmarks that measure the pipeline, not the data."""
    images = torch.randn(micro_batch, 3, image_size, image_size, generator=generator)
    return images, torch.randint(0, classes, (micro_batch,), generator=generator)
