"""Every figure of the project. Each function returns a ``matplotlib.figure.Figure``.

Plot code never sets a backend and never calls ``plt.show()``; notebooks display the returned
figure and ``python -m confeti figures`` / ``make reproduce`` save them into ``figures/``.
One style for all: the Cityscapes palette for classes, ``STYLE`` for fonts.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .labels import CLASSES, IGNORE_INDEX, PALETTE, colorize

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "figure.dpi": 100}
DPI = 150  # PNGs in figures/ are written at this resolution
DOMAIN_COLORS = {"source": "#d95f02", "stylized": "#7570b3", "target": "#1b9e77"}


def class_color(k: int) -> tuple[float, float, float]:
    """Cityscapes palette colour of train id ``k`` as matplotlib floats."""
    return tuple(PALETTE[k] / 255.0)


def to_image(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) tensor -> RGB float (H, W, 3) in [0, 1] for imshow."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    img = x.detach().float().cpu() * std + mean
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` as a PNG at ``DPI`` and close it."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


_ = (CLASSES, IGNORE_INDEX, colorize)  # used by the figure functions below

# ---- figures are added below, grouped by notebook ------------------------------------------
