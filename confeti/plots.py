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


# ---- notebook 01: data ----------------------------------------------------------------------
def _as_rgb(img) -> np.ndarray:
    """uint8 (H, W, 3) array or ImageNet-normalised (3, H, W) tensor -> RGB for imshow."""
    return to_image(img) if isinstance(img, torch.Tensor) else np.asarray(img)


def plot_domain_samples(src_imgs, src_labels, tgt_imgs, tgt_labels, n: int = 3) -> Figure:
    """Rows of (source image, its train-id label, target image, its label), colourised."""
    n = min(n, len(src_imgs), len(tgt_imgs))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, 4, figsize=(12, 1.6 * n + 0.4), squeeze=False)
        titles = ("source image", "source label", "target image", "target label")
        for r in range(n):
            cells = (_as_rgb(src_imgs[r]), colorize(src_labels[r]), _as_rgb(tgt_imgs[r]), colorize(tgt_labels[r]))  # fmt: skip
            for c, im in enumerate(cells):
                axes[r, c].imshow(im, interpolation="nearest")
                axes[r, c].set_axis_off()
                if r == 0:
                    axes[r, c].set_title(titles[c])
        fig.tight_layout()
    return fig


def plot_class_frequencies(freq_source, freq_target, names=("source", "target")) -> Figure:
    """Share of labelled pixels per class and domain (seaborn bars, log scale)."""
    import pandas as pd
    import seaborn as sns

    rows = [
        {"class": CLASSES[k], "domain": name, "share of pixels": float(f[k])}
        for name, f in zip(names, (freq_source, freq_target))
        for k in range(len(CLASSES))
    ]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(10, 3.2))
        palette = [DOMAIN_COLORS["source"], DOMAIN_COLORS["target"]]
        sns.barplot(pd.DataFrame(rows), x="class", y="share of pixels", hue="domain", palette=palette, ax=ax)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=60)
        for tick, k in zip(ax.get_xticklabels(), range(len(CLASSES))):
            tick.set_color(np.array(class_color(k)) * 0.8)
        fig.tight_layout()
    return fig


def plot_class_colour_stats(stats_source, stats_target, names=("source", "target")) -> Figure:
    """Mean colour of every class in each domain as swatches (white: class absent).

    Shape: stats_* (19, 3) RGB in [0, 1], NaN where absent.
    """
    grid = np.stack([np.asarray(stats_source), np.asarray(stats_target)])  # (2, 19, 3)
    grid = np.where(np.isnan(grid), 1.0, np.clip(grid, 0, 1))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(10, 1.9))
        ax.imshow(grid, aspect="equal", interpolation="nearest")
        ax.set_yticks([0, 1], [f"{names[0]}", f"{names[1]}"])
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=60, ha="right")
        dist = np.linalg.norm(np.asarray(stats_source) - np.asarray(stats_target), axis=1)
        for k, d in enumerate(dist):
            if np.isfinite(d):
                ax.text(k, -0.6, f"{d:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title("mean colour per class (numbers: RGB distance between the domains)", pad=14)
        fig.tight_layout()
    return fig


def plot_gap_knobs(images, titles, ncols: int = 4) -> Figure:
    """A grid of scenes rendered with different (appearance_gap, content_gap) settings."""
    nrows = int(np.ceil(len(images) / ncols))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 1.7 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, im, title in zip(axes.flat, images, titles):
            ax.imshow(_as_rgb(im), interpolation="nearest")
            ax.set_title(title)
        fig.tight_layout()
    return fig


def plot_stylization_grid(x_s, x_s2t, x_t, n: int = 4) -> Figure:
    """Columns source | stylized G(source) | target for the first ``n`` images.

    Shape: x_s, x_s2t, x_t (B, 3, H, W) ImageNet-normalised (x_t may be a different batch).
    """
    n = min(n, len(x_s), len(x_s2t), len(x_t))
    h, w = x_s.shape[-2:]
    cols = (("source", x_s), ("stylized", x_s2t), ("target", x_t))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, 3, figsize=(3 * 2.2 * w / h, 2.2 * n + 0.3), squeeze=False)
        for i in range(n):
            for j, (name, x) in enumerate(cols):
                ax = axes[i, j]
                ax.imshow(to_image(x[i]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(name, color=DOMAIN_COLORS[name])
        fig.tight_layout()
    return fig


def plot_colour_shift(x_s, x_s2t, x_t, bins: int = 32) -> Figure:
    """Per-channel histograms of pixel values (R, G, B) of source, stylized source and target:
    stylization should move the source curve onto the target one.

    Shape: x_s, x_s2t, x_t (B, 3, H, W) ImageNet-normalised.
    """
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), sharey=True)
        for c, (ax, channel) in enumerate(zip(axes, ("red", "green", "blue"))):
            for name, x in (("source", x_s), ("stylized", x_s2t), ("target", x_t)):
                mean = torch.tensor([0.485, 0.456, 0.406])[c]
                std = torch.tensor([0.229, 0.224, 0.225])[c]
                v = (x.detach().float().cpu()[:, c] * std + mean).clamp(0, 1).flatten().numpy()
                hist, edges = np.histogram(v, bins=bins, range=(0, 1), density=True)
                ax.plot((edges[:-1] + edges[1:]) / 2, hist, color=DOMAIN_COLORS[name], label=name)
                ax.axvline(v.mean(), color=DOMAIN_COLORS[name], lw=0.8, ls="--")
            ax.set_title(f"{channel} channel")
            ax.set_xlabel("value")
        axes[0].set_ylabel("density")
        axes[-1].legend(frameon=False)
        fig.tight_layout()
    return fig


# ---- notebook 04: joint training --------------------------------------------------------------
def plot_train_step(images: dict, index: int = 0) -> Figure:
    """The official training debug figure (spec §13) as a 2 x ⌈N/2⌉ grid, one panel per entry.

    ``images`` maps a title to a batch tensor, drawn by kind: (B, 3, H, W) float -> image
    (ImageNet-normalised, via ``to_image``); (B, H, W) integer -> label map (Cityscapes palette);
    (B, H, W) float -> mask / weight map in grey on [0, 1] with a colourbar. A 2-D tensor is taken
    as one map (an image must come batched); ``index`` picks the image of the batch. Typical
    order: source, stylized source, target, pseudo-label, ClassMix mask, mixed image, mixed
    label, weight map.

    Shape: entries (B, 3, H, W) or (B, H, W) or (H, W).
    """
    ncols = max(1, -(-len(images) // 2))
    first = next(iter(images.values()), torch.zeros(1, 1))
    h, w = first.shape[-2:]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, ncols, figsize=(ncols * 2.2 * w / h + 0.6, 4.8), squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, (title, x) in zip(axes.flat, images.items()):
            x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
            if x.dim() >= 3:  # a batch: pick one image / map
                x = x[index]
            if x.dim() == 3:  # (3, H, W) image
                ax.imshow(to_image(x), interpolation="nearest")
            elif not x.is_floating_point():  # (H, W) train ids
                ax.imshow(colorize(x), interpolation="nearest")
            else:  # (H, W) mask or weight map
                im = ax.imshow(x.float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(title)
        fig.tight_layout()
    return fig
