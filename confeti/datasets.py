"""Dataset readers (GTA5, Cityscapes, SYNTHIA), joint transforms and rare-class sampling.

Taught in notebooks/01_data.ipynb.
"""

from __future__ import annotations

import torch

# ImageNet statistics on the [0, 1] RGB scale; every image tensor in confeti is normalised so.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> ImageNet-normalised. Shape: (..., 3, H, W) -> same."""
    mean = img.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = img.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised -> RGB in [0, 1] (not clamped). Shape: (..., 3, H, W) -> same."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean
