"""Training data for the AlexNet/CIFAR-10 example: the real CIFAR-10, or a built-in look-alike.

The built-in set lets the example run on a machine with no network and no dataset: 50,000 32x32 RGB images
in 10 classes, each image a class template (a fixed random low-frequency colour pattern) shifted, scaled in
contrast and covered in noise. It is a pure function of (seed, index), so every rank and every run sees the
same samples, and a network learns it within a few dozen steps.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from torch.utils.data import Dataset

CIFAR10_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cifar_transform(image_size: int = 224) -> transforms.Compose:
    """The original example's transform (Resize 256, CenterCrop 224), scaled to ``image_size``."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


class SyntheticCIFAR10(Dataset):
    """A deterministic, learnable stand-in for CIFAR-10: same length, image shape, classes and transform."""

    def __init__(self, seed: int = 1138, size: int = 50_000, transform=None, noise: float = 0.35):
        self.seed = seed
        self.size = size
        self.transform = transform
        self.noise = noise
        gen = torch.Generator().manual_seed(seed)
        low_res = torch.rand(NUM_CLASSES, 3, 4, 4, generator=gen)
        self.templates = F.interpolate(low_res, size=CIFAR10_SHAPE[1:], mode="bicubic", align_corners=False)
        self.templates = self.templates.clamp(0, 1).numpy()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, index))
        label = index % NUM_CLASSES
        dy, dx = rng.integers(-3, 4, size=2)
        image = np.roll(self.templates[label], shift=(int(dy), int(dx)), axis=(1, 2))
        image = 0.5 + rng.uniform(0.6, 1.0) * (image - 0.5) + rng.normal(0.0, self.noise, size=image.shape)
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        return self._transform(pixels), label

    def _transform(self, pixels: np.ndarray):
        from PIL import Image

        image = Image.fromarray(pixels)
        return self.transform(image) if self.transform else image


def cifar10_present(data_dir: str) -> bool:
    try:
        torchvision.datasets.CIFAR10(root=data_dir, train=True, download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        return False
    return True


def cifar10_trainset(data_dir: str, image_size: int, local_rank: int, barrier=None) -> Dataset:
    """The real CIFAR-10 training set from ``data_dir``, downloaded there by local rank 0 if missing.

    ``barrier`` synchronises the ranks of a node (the original's semaphore): the others wait while rank 0
    downloads. If the data is neither there nor downloadable, every rank raises the same error.
    """
    if not cifar10_present(data_dir) and local_rank <= 0:
        try:
            torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
            print(f"CIFAR-10 download into {data_dir} failed: {exc}", flush=True)
    if barrier is not None:
        barrier()
    if not cifar10_present(data_dir):
        raise FileNotFoundError(
            f"CIFAR-10 is not in --data-dir {data_dir} (expected {data_dir}/cifar-10-batches-py) and could not be "
            "downloaded. Put the extracted 'cifar-10-python.tar.gz' there, or run with --dataset synthetic "
            "to use the built-in data."
        )
    transform = cifar_transform(image_size)
    return torchvision.datasets.CIFAR10(root=data_dir, train=True, download=False, transform=transform)


def build_trainset(dataset: str, data_dir: str, image_size: int, seed: int, local_rank: int, barrier=None):
    """The dataset the run trains on and a one-line description of it for the log."""
    if dataset == "synthetic":
        data = SyntheticCIFAR10(seed=seed, transform=cifar_transform(image_size))
        return data, f"synthetic (built-in CIFAR-10 look-alike: {len(data)} images, 10 classes, seed {seed})"
    if dataset == "cifar10":
        data = cifar10_trainset(data_dir, image_size, local_rank, barrier)
        return data, f"cifar10 (real CIFAR-10 from {os.path.abspath(data_dir)}, {len(data)} images)"
    raise ValueError(f"unknown --dataset {dataset!r}; choose cifar10 or synthetic")
