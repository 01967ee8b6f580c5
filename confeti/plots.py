"""Every figure of the project. Each function returns a ``matplotlib.figure.Figure``.

Plot code never sets a backend and never calls ``plt.show()``; notebooks display the returned
figure and ``python -m confeti figures`` / ``make reproduce`` save them into ``figures/``.
One style for all: the Cityscapes palette for classes, ``STYLE`` for fonts.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from .labels import CLASSES, PALETTE, SHORT_NAMES, colorize

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "figure.dpi": 100}
DPI = 150  # PNGs in figures/ are written at this resolution
DOMAIN_COLORS = {"source": "#d95f02", "stylized": "#7570b3", "target": "#1b9e77"}
# one colour per method in every figure of the project (colour-blind-safe Tableau/Okabe-Ito mix)
METHOD_COLORS = {
    "source_only": "#7f7f7f",
    "oracle": "#000000",
    "fda": "#8c564b",
    "style": "#1f77b4",
    "contrast": "#2ca02c",
    "selftrain": "#ff7f0e",
    "selftrain+style": "#9467bd",
    "selftrain+contrast": "#bcbd22",
    "confeti": "#d62728",
}


_OTHER_COLORS = ("#17becf", "#e377c2", "#aec7e8", "#98df8a", "#c5b0d5", "#c49c94")


def method_key(name: str) -> str:
    """The ``METHOD_COLORS`` key of a display name: "source-only" -> "source_only", "CONFETI"
    -> "confeti" (lower case, dashes and spaces as underscores)."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def method_colors(names) -> dict[str, str]:
    """name -> colour: ``METHOD_COLORS`` for known methods, then a fixed list for the others
    (in order, so a figure never draws two runs in one colour)."""
    names = list(names)
    others = iter(_OTHER_COLORS * (1 + len(names) // len(_OTHER_COLORS)))
    return {n: METHOD_COLORS.get(method_key(n)) or next(others) for n in names}


def class_color(k: int) -> tuple[float, float, float]:
    """Cityscapes palette colour of train id ``k`` as matplotlib floats."""
    return tuple(PALETTE[k] / 255.0)


def readable_color(color, contrast: float = 4.5) -> tuple[float, float, float]:
    """``color`` darkened, its hue kept, until its contrast ratio against white is at least
    ``contrast`` (WCAG: 4.5 for small text), for text in a class colour: the palette's yellow
    (traffic sign) and light green (terrain) are unreadable on white as they are."""
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(color), dtype=float)

    def luminance(c):  # WCAG relative luminance of an sRGB colour
        lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(lin @ [0.2126, 0.7152, 0.0722])

    while 1.05 / (luminance(rgb) + 0.05) < contrast:
        rgb = rgb * 0.95
    return tuple(float(v) for v in rgb)


# line style per train id for line plots in the class colours: a class whose palette colour is
# close to another's (the blues of the vehicles, the greys, the reds) gets a dash of its own:
# pole, rider, truck, train dashed; motorcycle, bicycle dotted
_DASHED = {5: "--", 12: "--", 14: "--", 16: "--", 17: ":", 18: ":"}
CLASS_LINESTYLES = tuple(_DASHED.get(k, "-") for k in range(len(CLASSES)))


def class_legend_handles(label_maps) -> list:
    """Palette patches, one per train id present in any of ``label_maps``, labelled with
    ``SHORT_NAMES``, then black "ignore" if a map has ignored pixels (255, drawn black by
    ``colorize``): the legend of a label-map figure."""
    from matplotlib.patches import Patch

    present = set()
    for m in label_maps:
        arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        present.update(int(v) for v in np.unique(arr) if 0 <= v < len(CLASSES) or v == 255)
    out = [Patch(fc=class_color(k), ec="black", lw=0.4, label=SHORT_NAMES[k]) for k in sorted(present - {255})]  # fmt: skip
    if 255 in present:
        out.append(Patch(fc="black", ec="black", lw=0.4, label="ignore"))
    return out


def add_class_legend(fig: Figure, label_maps, ncol: int | None = None, y: float = 0.0) -> None:
    """A compact Cityscapes-palette legend of the classes present, below the figure (its top at
    ``y`` in figure coordinates), read row by row in train-id order."""
    h = class_legend_handles(label_maps)
    if not h:
        return
    ncol = ncol or min(len(h), 10)
    rows = -(-len(h) // ncol)
    h = [h[r * ncol + c] for c in range(ncol) for r in range(rows) if r * ncol + c < len(h)]
    fig.legend(handles=h, loc="upper center", bbox_to_anchor=(0.5, y), ncol=ncol, fontsize=7, frameon=False, handlelength=1.2, columnspacing=1.0)  # fmt: skip


def to_image(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (3, H, W) tensor -> RGB float (H, W, 3) in [0, 1] for imshow."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    img = x.detach().float().cpu() * std + mean
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure(fig: Figure, path, dpi: int = DPI) -> None:
    """Write ``fig`` as a PNG at ``dpi`` (default ``DPI``) and close it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


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
        add_class_legend(fig, [*src_labels[:n], *tgt_labels[:n]])
    return fig


def plot_class_frequencies(freq_source, freq_target, names=("source", "target")) -> Figure:
    """Share of labelled pixels per class and domain (seaborn bars, log scale); each class name
    in black above a swatch of its Cityscapes palette colour."""
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
        # black class names; the class's palette colour as a swatch between the axis and its name
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=60, ha="right", rotation_mode="anchor")  # fmt: skip
        ax.tick_params(axis="x", pad=11)
        limits = ax.get_xlim(), ax.get_ylim()
        below = blended_transform_factory(ax.transData, ax.transAxes)  # x: class, y: axes fraction
        ax.scatter(range(len(CLASSES)), [-0.045] * len(CLASSES), s=32, marker="s", c=[class_color(k) for k in range(len(CLASSES))], edgecolors="black", linewidths=0.5, transform=below, clip_on=False)  # fmt: skip
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])
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
def plot_train_step(images: dict, index: int = 0, suptitle: str | None = None) -> Figure:
    """The official training debug figure (docs/method.md §8.2): a 2 x ⌈N/2⌉ grid, one panel
    per entry.

    ``images`` maps a title to a batch tensor, drawn by kind: (B, 3, H, W) float -> image
    (ImageNet-normalised, via ``to_image``); (B, H, W) integer -> label map (Cityscapes palette);
    (B, H, W) float -> mask / weight map in grey on [0, 1] with a colourbar. A 2-D tensor is taken
    as one map (an image must come batched); ``index`` picks the image of the batch. Typical
    order: source, stylized source, target, pseudo-label, ClassMix mask, mixed image, mixed
    label, weight map. Below: a palette legend of the classes in the label maps; ``suptitle``
    should say which state drew it (e.g. the iteration of the run).

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
        label_maps = [x[index] if x.dim() >= 3 else x for x in map(torch.as_tensor, images.values()) if not x.is_floating_point()]  # fmt: skip
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        add_class_legend(fig, label_maps)
    return fig


# ---- training, results and the ablation (notebooks 04 and 05; python -m confeti figures) -----
CURVE_LABELS = {  # y-axis label of each logged quantity (title = the metrics.jsonl key)
    "seg_src": "CE, source",
    "seg_mix": "weighted CE, mixed",
    "cam_src": "CAM loss",
    "pc_src": "contrast, source",
    "pc_mix": "contrast, mixed",
    "pc_tgt": "contrast, target",
    "reg_src": "regulariser",
    "reg_tgt": "regulariser",
    "psc": "consistency loss",
    "loss_G": "G loss (LSGAN + NCE)",
    "loss_D": "D loss (LSGAN)",
    "pseudo_q": "q: confident share",
}


def plot_training_curves(metrics: dict[str, list[dict]], keys=None) -> Figure:
    """Loss curves per run. ``metrics``: run name -> rows of metrics.jsonl.

    One colour per run in every panel (``METHOD_COLORS`` via ``method_colors``), one legend for
    the whole figure (runs without a given key simply have no line in that panel).
    """
    keys = keys or ["seg_src", "seg_mix", "pc_src", "pc_mix", "psc", "loss_G", "loss_D", "pseudo_q"]
    colors = method_colors(metrics)
    present = [k for k in keys if any(k in r for rows in metrics.values() for r in rows)]
    n = max(len(present), 1)
    cols = min(4, n)
    rows_n = (n + cols - 1) // cols
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
        for ax, k in zip(axes.flat, present):
            for name, rows in metrics.items():
                pts = [(r["iter"], r[k]) for r in rows if k in r and r.get("phase") != "eval"]
                if pts:
                    it, v = zip(*pts)
                    ax.plot(it, v, label=name, lw=1, color=colors[name])
            ax.set_title(k)
            ax.set_xlabel("iteration")
            ax.set_ylabel(CURVE_LABELS.get(k, k))
        for ax in list(axes.flat)[len(present) :]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=colors[n], lw=2, label=n) for n in metrics]
        fig.tight_layout(rect=(0, 0, 1, 0.93 if rows_n == 1 else 0.96))
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
    return fig


def plot_ablation(results: dict) -> Figure:
    """Bars of mIoU mean ± std per method with one black dot per seed (left; with two or three
    seeds the runs themselves say more than a std) and a per-class IoU heat-map (right)."""
    import seaborn as sns

    methods = list(results)
    means = [results[m]["miou_mean"] for m in methods]
    stds = [results[m]["miou_std"] for m in methods]
    grid = np.array(
        [
            [
                np.nan if results[m]["iou_mean"][c] is None else results[m]["iou_mean"][c]
                for c in CLASSES
            ]
            for m in methods
        ]
    )
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(
            1, 2, figsize=(15, 0.45 * len(methods) + 2.5), gridspec_kw={"width_ratios": [1, 3]}
        )
        colors = method_colors(methods)
        a.barh(methods, means, xerr=stds, color=[colors[m] for m in methods], capsize=3)
        for i, m in enumerate(methods):  # the runs: one dot per seed
            runs = [r["miou"] for r in results[m].get("runs", [])]
            a.plot(runs, [i] * len(runs), "o", color="black", markeredgecolor="white",
                   markersize=4.5, zorder=3)  # fmt: skip
        a.invert_yaxis()
        seeds = sorted({results[m]["seeds"] for m in methods})
        a.set_xlabel("mIoU (%): bar = mean ± std, ● = one seed\n"
                     f"(seeds per method: {' or '.join(map(str, seeds))})")  # fmt: skip
        right = [max([m + s] + [r["miou"] for r in results[k].get("runs", [])])
                 for k, m, s in zip(methods, means, stds)]  # fmt: skip
        for i, (m, x) in enumerate(zip(means, right)):
            a.text(x + 1.0, i, f"{m:.1f}", va="center", fontsize=8)
        a.set_xlim(0, 1.18 * max(right))  # room for the labels
        sns.heatmap(
            grid,
            ax=b,
            annot=True,
            fmt=".0f",
            cmap="viridis",
            vmin=0,
            vmax=100,
            xticklabels=SHORT_NAMES,
            yticklabels=methods,
            cbar=False,
            annot_kws={"fontsize": 7},
        )
        b.set_title("per-class IoU (%)")
        fig.tight_layout()
    return fig


def plot_paired_difference(diff: dict, a: str, b: str) -> Figure:
    """Per-class IoU of ``a`` minus ``b`` (``ablation.paired_difference``): a bar for the mean
    over seeds, one dot per seed, classes in the label order; the mIoU difference per seed in
    the title. Bars above zero: classes ``a`` does better on."""
    seeds = diff["seeds"]
    vals = np.array([[np.nan if v is None else v for v in diff["iou"][c]] for c in CLASSES])
    mean = np.nanmean(vals, axis=1)
    x = np.arange(len(CLASSES))
    colors = method_colors([a, b])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(11, 3.4))
        ax.bar(x, mean, color=[colors[a] if m >= 0 else colors[b] for m in mean], alpha=0.8)
        for j in range(len(seeds)):
            ax.plot(x, vals[:, j], "o", color="black", markeredgecolor="white", markersize=4.5,
                    zorder=3)  # fmt: skip
        n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        handles = [Patch(fc=colors[a], alpha=0.8, label=f"{a} better (mean over {n})"),
                   Patch(fc=colors[b], alpha=0.8, label=f"{b} better (mean over {n})"),
                   Line2D([], [], ls="", marker="o", color="black", markeredgecolor="white",
                          label="one seed")]  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, SHORT_NAMES, rotation=45, ha="right")
        ax.set_ylabel(f"IoU({a}) − IoU({b})\n(points)")
        per_seed = ", ".join(f"{d:+.1f}" for d in diff["miou"])
        ax.set_title(f"{a} − {b}, per class on city val (mIoU: {per_seed} on seeds "
                     f"{', '.join(map(str, seeds))})")  # fmt: skip
        ax.legend(handles=handles, fontsize=7, loc="lower left")
        fig.tight_layout()
    return fig


def plot_results_table(results: dict) -> Figure:
    """The ablation table as an image (method, mIoU mean ± std, seeds, seconds per run)."""
    from .ablation import mean_std

    rows = [
        [
            m,
            mean_std(r),
            str(r["seeds"]),
            f"{r['seconds_mean']:.0f}",
        ]
        for m, r in results.items()
    ]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 0.8))
        ax.axis("off")
        tab = ax.table(
            cellText=rows,
            colLabels=["method", "mIoU (%)", "seeds", "s / run"],
            loc="center",
            cellLoc="center",
        )
        tab.scale(1, 1.3)
    return fig


def plot_qualitative(
    images, labels, predictions: dict[str, torch.Tensor], n: int = 4, suptitle: str | None = None
) -> Figure:
    """Rows of target image | one prediction per method | ground truth (Cityscapes colours),
    with a palette legend of the classes shown below."""
    cols = ["target image", *predictions, "ground truth"]
    n = min(n, len(images))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            n, len(cols), figsize=(2.4 * len(cols), 1.35 * n + 0.4), squeeze=False
        )
        for i in range(n):
            panels = [to_image(images[i])]
            panels += [colorize(p[i]) for p in predictions.values()]
            panels.append(colorize(labels[i]))
            for j, img in enumerate(panels):
                axes[i, j].imshow(img)
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
                if i == 0:
                    axes[i, j].set_title(cols[j])
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        shown = [*labels[:n], *(p[i] for p in predictions.values() for i in range(n))]
        add_class_legend(fig, shown)
    return fig


def plot_per_class_iou(rows: dict[str, dict[str, float | None]]) -> Figure:
    """Grouped bars of per-class IoU; ``rows``: name -> {class: IoU %} (ours or a peer's row)."""
    names = list(rows)
    colors = method_colors(names)
    x = np.arange(len(CLASSES))
    w = 0.8 / max(len(names), 1)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(12, 3.2))
        for i, name in enumerate(names):
            v = [np.nan if rows[name].get(c) is None else rows[name][c] for c in CLASSES]
            ax.bar(x + i * w - 0.4 + w / 2, v, width=w, label=name, color=colors[name])
        ax.set_xticks(x, SHORT_NAMES, rotation=45, ha="right")
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.legend(ncol=min(len(names), 4), fontsize=7)
        fig.tight_layout()
    return fig


TSNE_MARKERS = {"source": "o", "stylized": "^", "target": "x"}  # filled, filled, line-only


def _label_stars(ax, pxy, classes, gap: float = 0.038) -> None:
    """Short class names beside the prototype stars (right of the star; left of it near the
    right edge), in axes fractions. Names whose boxes would overlap are gathered into groups
    (a group only grows) and each group is spread apart vertically by ``_spread_apart``, at
    least ``gap`` apart, until no two names overlap; a moved name gets a leader line to its star."""
    classes = list(classes)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    at = {k: ((pxy[k][0] - x0) / (x1 - x0), (pxy[k][1] - y0) / (y1 - y0)) for k in classes}
    left = {k: at[k][0] > 0.86 for k in classes}  # name to the left of the star
    span = {}  # the x-range of each name: 7 pt text, about 0.0125 axes widths a character
    for k in classes:
        w, x = 0.0125 * len(SHORT_NAMES[k]) + 0.01, at[k][0]
        span[k] = (x - 0.025 - w, x - 0.025) if left[k] else (x + 0.025, x + 0.025 + w)
    want = {k: at[k][1] + 0.02 for k in classes}
    group = {k: k for k in classes}  # union-find: each name's group

    def root(k):
        while group[k] != k:
            k = group[k]
        return k

    pos = dict(want)
    for _ in range(len(classes)):
        members: dict[int, list[int]] = {}
        for k in classes:
            members.setdefault(root(k), []).append(k)
        for g in members.values():  # each group from its names' own heights, bottom-up
            g.sort(key=lambda k: want[k])
            pos.update(zip(g, _spread_apart([want[k] for k in g], gap, 0.02, 0.98)))
        clash = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1 :]
                 if root(a) != root(b) and abs(pos[a] - pos[b]) < gap
                 and span[a][0] < span[b][1] and span[b][0] < span[a][1]]  # fmt: skip
        if not clash:
            break
        for a, b in clash:
            group[root(a)] = root(b)
    for k in classes:
        fx = span[k][1] if left[k] else span[k][0]
        line = dict(arrowstyle="-", lw=0.5, color="#333333", shrinkA=0, shrinkB=6) if abs(pos[k] - want[k]) > 1e-6 else None  # fmt: skip
        ax.annotate(SHORT_NAMES[k], pxy[k], xytext=(fx, pos[k]), textcoords="axes fraction", fontsize=7, zorder=6, va="center", ha="right" if left[k] else "left", arrowprops=line, bbox=dict(fc="white", ec="none", alpha=0.75, pad=0.4))  # fmt: skip


def plot_tsne(
    panels: dict, score_text: dict[str, str] | None = None, note: str | None = None
) -> Figure:
    """t-SNE panels side by side. ``panels``: title -> (xy (N,2), labels (N,), domains (N,),
    protos_xy (C,2) or (0,2)). Colour = class (Cityscapes palette), marker = domain
    (``TSNE_MARKERS``: ● source, ▲ stylized, × target), ★ = prototype, labelled with its class.
    ``score_text``: title -> a line under that panel; ``note``: a line under the figure (what the
    scores mean). Each panel's marker legend lists only what that panel draws (its domains, ★ if
    it has prototypes); the class legend below lists the classes present in any panel.
    """
    classes = set()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False)
        for ax, (title, (xy, labels, domains, pxy)) in zip(axes[0], panels.items()):
            handles = []  # this panel's marker legend: only what this panel draws
            for dom, mk in TSNE_MARKERS.items():
                sel = domains == dom
                if not sel.any():
                    continue
                classes.update(np.unique(labels[sel]).tolist())
                ax.scatter(xy[sel, 0], xy[sel, 1], c=PALETTE[labels[sel]] / 255.0, s=14, marker=mk, alpha=0.6, linewidths=0.8 if mk == "x" else 0)  # fmt: skip
                handles.append(plt.Line2D([], [], ls="", marker=mk, ms=7, mew=1.5, color="#555555", label=dom))  # fmt: skip
            seen = [k for k in range(len(pxy)) if not np.isnan(pxy[k]).any()]
            for k in seen:
                ax.scatter(*pxy[k], marker="*", s=260, c=[class_color(k)], edgecolors="black", linewidths=1.2, zorder=5)  # fmt: skip
            if seen:
                handles.append(plt.Line2D([], [], ls="", marker="*", ms=13, color="#bbbbbb", markeredgecolor="black", label="prototype"))  # fmt: skip
            _label_stars(ax, pxy, seen)
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
            if score_text and title in score_text:
                ax.set_xlabel(score_text[title], fontsize=8)
            ax.legend(handles=handles, loc="best", fontsize=7.5, framealpha=0.9, title="marker", title_fontsize=7.5)  # fmt: skip
        fig.tight_layout()
        add_class_legend(fig, [np.array(sorted(classes))])
        if note:  # under the class legend
            fig.text(0.5, -0.07, note, ha="center", va="top", fontsize=8)
    return fig


def plot_centroid_distance(
    before: list, after: list, names=("before", "after"), title: str | None = None
) -> Figure:
    """Per-class source-target centroid distance before/after adaptation (lower = aligned).

    ``names`` are method names when they are methods ("source-only", "CONFETI"): their bars take
    ``METHOD_COLORS``; ``title`` should say in which feature space the centroids live.
    """
    x = np.arange(len(CLASSES))
    colors = method_colors(names)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(11, 3))
        ax.bar(x - 0.2, before, width=0.4, label=names[0], color=colors[names[0]])
        ax.bar(x + 0.2, after, width=0.4, label=names[1], color=colors[names[1]])
        ax.set_xticks(x, SHORT_NAMES, rotation=45, ha="right")
        ax.set_ylabel("‖c_source − c_target‖")
        if np.isnan(np.asarray(before, dtype=float)).any() or np.isnan(np.asarray(after, dtype=float)).any():  # fmt: skip
            ax.set_xlabel("no bar: the class is absent from one domain's sample")
        if title:
            ax.set_title(title)
        ax.legend()
        fig.tight_layout()
    return fig


# ---- notebook 03: feature alignment (prototypes and pixel-to-prototype contrast) ----------
def plot_contrast_toy_2d(
    proto_angles=(90.0, 210.0, 330.0), classes=(0, 11, 13), tau: float = 0.1
) -> Figure:
    """The pixel-to-prototype contrast for 2-D unit embeddings v~ = (cos θ, sin θ), 3 prototypes.

    Left: the prototypes P_k on the unit circle, the circle coloured by argmax_k v~ . P_k.
    Middle: L_k(θ) = -log softmax_j(v~ . P_j / τ)[k] for each label k (the loss landscape).
    Right: the soft assignment softmax_j(v~ . P_j / τ), stacked (τ sets how sharp it is).
    """
    theta = torch.linspace(0, 2 * np.pi, 361)
    v = torch.stack([theta.cos(), theta.sin()], 1)  # (N, 2) unit embeddings
    phi = torch.tensor(proto_angles, dtype=torch.float32) * np.pi / 180
    protos = torch.stack([phi.cos(), phi.sin()], 1)  # (K, 2) unit prototypes
    from .contrast import pixel_prototype_contrast  # the package's loss, not a re-derivation

    def loss(e, k):  # L_k(θ): one pixel, label k, CE only (weight 1, no regulariser)
        label = torch.full((1, 1, 1), k)
        out = pixel_prototype_contrast(e.view(1, 2, 1, 1), label, protos, tau=tau, weight=1.0, reg_weight=0.0)  # fmt: skip
        return out["ce"]

    losses = [torch.stack([loss(e, k) for k in range(len(protos))]) for e in v]
    log_p = -torch.stack(losses)  # (N, K) = log softmax_k(v~ . P_k / tau)
    deg, cols = theta.numpy() * 180 / np.pi, [class_color(k) for k in classes]
    names = [CLASSES[k] for k in classes]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, 3, figsize=(12, 3.4), gridspec_kw={"width_ratios": [1, 1.5, 1.5]}
        )
        ax = axes[0]
        owner = log_p.argmax(1).numpy()
        ax.scatter(v[:, 0], v[:, 1], c=[cols[o] for o in owner], s=4)
        for k in range(len(classes)):
            ax.annotate("", xy=protos[k].tolist(), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=cols[k], lw=2))  # fmt: skip
            ax.text(*(1.25 * protos[k]).tolist(), names[k], ha="center", va="center", color=cols[k])
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal", title="prototypes P_k, argmax")
        ax.axis("off")
        for k in range(len(classes)):
            axes[1].plot(deg, -log_p[:, k].numpy(), color=cols[k], label=f"label = {names[k]}")
            axes[2].fill_between(deg, log_p[:, :k].exp().sum(1).numpy(), log_p[:, : k + 1].exp().sum(1).numpy(), color=cols[k], alpha=0.8)  # fmt: skip
        for ax in axes[1:]:
            for a in proto_angles:
                ax.axvline(a % 360, color="grey", ls=":", lw=0.8)
            ax.set(xlim=(0, 360), xlabel="angle θ of the embedding (degrees)")
        axes[1].axhline(np.log(len(classes)), color="black", ls="--", lw=0.8)
        axes[1].text(2, np.log(len(classes)), " ln K (uniform)", va="bottom", fontsize=7)
        axes[1].set(
            ylabel="−log softmax(v·P/τ)[label]", title=f"contrast loss per label, τ = {tau:g}"
        )
        axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
        axes[2].set(ylim=(0, 1), ylabel="softmax(v·P/τ)", title="soft assignment to prototypes")
        fig.tight_layout()
    return fig


def plot_prototype_similarity(sim_maps, image, classes=None) -> Figure:
    """The image and, per class, the cosine similarity map v~ . P_k of its pixel embeddings.

    sim_maps: (K, h, w) tensor/array (e.g. ``prototypes.similarity(emb, protos)[0, classes]``);
    image: ImageNet-normalised (3, H, W) tensor or uint8 (H, W, 3); classes: K train ids (titles).
    """
    sims = np.asarray(sim_maps.detach().float().cpu() if isinstance(sim_maps, torch.Tensor) else sim_maps)  # fmt: skip
    classes = list(range(len(sims))) if classes is None else list(classes)
    img = _as_rgb(image)
    extent = (0, img.shape[1], img.shape[0], 0)  # stretch the (h, w) map over the image
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            1, len(sims) + 1, figsize=(2.6 * (len(sims) + 1), 1.9), squeeze=False
        )
        axes[0, 0].imshow(img)
        axes[0, 0].set_title("image")
        for i, (k, sim) in enumerate(zip(classes, sims), start=1):
            axes[0, i].imshow(img, alpha=0.35)
            im = axes[0, i].imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, extent=extent, alpha=0.85)
            axes[0, i].set_title(f"cos(v, P[{CLASSES[k]}])")
        for ax in axes[0]:
            ax.axis("off")
        fig.colorbar(im, ax=axes[0, 1:].tolist(), fraction=0.02, pad=0.01)
    return fig


def _spread_apart(ys, gap: float, lo: float = -np.inf, hi: float = np.inf) -> list[float]:
    """Heights for labels at the ascending heights ``ys``: each at least ``gap`` above the one
    below and as near its own height as that allows, all within [lo, hi]."""
    placed: list[float] = []
    for y in ys:  # bottom-up: at least one gap above the label below
        placed.append(max(y, placed[-1] + gap) if placed else max(y, lo))
    for i in reversed(range(len(placed))):  # top-down: stay below hi
        placed[i] = min(placed[i], hi if i == len(placed) - 1 else placed[i + 1] - gap)
    return placed


def _label_line_ends(ax) -> None:
    """Each line's label just right of the axes, at the height of its last finite point, in its
    colour darkened to be readable on white (``readable_color``); labels are moved apart
    vertically (within the y-range) so none overlap. The leader line from a label to its line's
    end is drawn in the line's own colour and line style, so lines that share a colour are told
    apart by the dash beside their label."""
    ends = []
    for ln in ax.lines:
        x, y = (np.asarray(v, dtype=float) for v in ln.get_data())
        ok = np.flatnonzero(np.isfinite(y))
        if len(ok):
            ends.append((y[ok[-1]], x[ok[-1]], ln))
    if not ends:
        return
    ends.sort(key=lambda e: e[0])
    lo, hi = ax.get_ylim()
    gap = (hi - lo) * min(0.05, 1.0 / (len(ends) + 1))
    placed = _spread_apart([y for y, _, _ in ends], gap, lo + gap / 2, hi - gap / 2)
    for (y, x, ln), yl in zip(ends, placed):
        leader = dict(arrowstyle="-", lw=max(0.9, 0.6 * ln.get_linewidth()), ls=ln.get_linestyle(), color=ln.get_color(), shrinkA=1, shrinkB=1)  # fmt: skip
        ax.annotate(ln.get_label(), (x, y), xytext=(1.09, yl), textcoords=("axes fraction", "data"), fontsize=6.5, color=readable_color(ln.get_color()), va="center", ha="left", annotation_clip=False, arrowprops=leader)  # fmt: skip


def plot_prototype_alignment(history: dict[str, list]) -> Figure:
    """Per-class alignment margin over training: the cosine between the target and the source
    centroid of the class minus the largest cosine between that target centroid and the source
    centroid of another class (``embeddings.alignment``'s ``per_class_margin``). > 0: the class's
    target pixels sit nearer their own source class than any other; the raw own-class cosine can
    fall while this rises, as training spreads all classes apart.

    history: {"iter": [t0, t1, ...], "<class name>": [margin at t0, ...], ...}; None/NaN where a
    class was absent. Each class in its Cityscapes palette colour (as in every figure) and its
    ``CLASS_LINESTYLES`` dash (near-identical palette colours get different dashes), labelled at
    its end with a leader in the same colour and dash (no legend); thick black: the mean.
    """
    xs = history.get("iter", history.get("iteration"))
    curves = {k: np.array([np.nan if c is None else c for c in v], dtype=float) for k, v in history.items() if k not in ("iter", "iteration")}  # fmt: skip
    others = iter(_OTHER_COLORS * (1 + len(curves) // len(_OTHER_COLORS)))  # non-class curves
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        for i, (name, ys) in enumerate(curves.items()):
            k = CLASSES.index(name) if name in CLASSES else i
            x = np.arange(len(ys)) if xs is None else np.asarray(xs)
            short = SHORT_NAMES[k] if name in CLASSES else name
            color, ls = (class_color(k), CLASS_LINESTYLES[k]) if name in CLASSES else (next(others), "-")  # fmt: skip
            ax.plot(x, ys, color=color, ls=ls, lw=1.3, label=short, marker="o" if len(ys) < 20 else None, ms=3)  # fmt: skip
        if curves:
            arr = np.stack(list(curves.values()))  # (classes, times), NaN where absent
            n = np.isfinite(arr).sum(0)
            mean = np.where(n > 0, np.nansum(arr, 0) / np.maximum(n, 1), np.nan)
            x = np.arange(len(mean)) if xs is None else np.asarray(xs)
            ax.plot(x, mean, color="black", lw=2.5, label="mean")
        lo, hi = ax.get_ylim()
        if lo < 0:  # shade where the target centroid is nearer another source class
            ax.axhspan(lo, 0, color="#eeeeee", zorder=0)
        ax.set_ylim(lo, hi)
        _label_line_ends(ax)
        ax.set(
            xlabel="iteration",
            ylabel="margin: cos(own) − max cos(other)",
            title="per-class alignment margin (target centroid vs source centroids)",
        )
        fig.tight_layout()
    return fig


# ---- notebook 02: pixel alignment (CUT) ------------------------------------------------------
def plot_style_losses(
    rows: list[dict], keys=("loss_D", "loss_G_gan", "loss_nce"), window: int = 10
) -> Figure:
    """CUT losses per step (faint) and their moving average over ``window`` steps (solid).

    ``rows``: one dict per step (``StyleTransfer.pretrain_step`` output, optional "iter"). The
    dashed line on the LSGAN panels is 0.25, their value when D outputs 0.5 everywhere.
    """
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 2.6), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r.get("iter", i + 1), r[k]) for i, r in enumerate(rows) if k in r]
            if not pts:
                ax.set_axis_off()
                continue
            it, v = map(np.asarray, zip(*pts))
            w = max(1, min(window, len(v)))
            smooth = np.convolve(v, np.ones(w) / w, mode="valid")  # mean of the last w steps
            ax.plot(it, v, color="#999999", lw=0.6, alpha=0.7)
            ax.plot(it[w - 1 :], smooth, color="#4c72b0", lw=1.6, label=f"mean of {w}")
            if k in ("loss_D", "loss_G_gan"):
                ax.axhline(0.25, color="black", ls="--", lw=0.8)
            ax.set(title=k, xlabel="step")
        axes[0, 0].legend(frameon=False)
        fig.tight_layout()
    return fig


def plot_class_colour_shift(stats_source, stats_stylized, stats_target) -> Figure:
    """Mean colour per class of source, stylized source and target (swatch rows, white: absent)
    and, below, each class's RGB distance to the target before and after stylization.

    Shape: stats_* (19, 3) RGB in [0, 1], NaN where absent.
    """
    stats = [np.asarray(s, dtype=float) for s in (stats_source, stats_stylized, stats_target)]
    grid = np.where(np.isnan(np.stack(stats)), 1.0, np.clip(np.stack(stats), 0, 1))  # (3, 19, 3)
    d_src = np.linalg.norm(stats[0] - stats[2], axis=1)  # (19,), NaN where a class is absent
    d_sty = np.linalg.norm(stats[1] - stats[2], axis=1)
    x = np.arange(len(CLASSES))
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})  # fmt: skip
        a.imshow(grid, aspect="equal", interpolation="nearest")
        a.set_yticks([0, 1, 2], ["source", "stylized", "target"])
        for tick, name in zip(a.get_yticklabels(), DOMAIN_COLORS):
            tick.set_color(DOMAIN_COLORS[name])
        a.set_title("mean colour per class")
        b.bar(x - 0.2, d_src, width=0.4, color=DOMAIN_COLORS["source"], label="source → target")
        b.bar(x + 0.2, d_sty, width=0.4, color=DOMAIN_COLORS["stylized"], label="stylized → target")  # fmt: skip
        with np.errstate(all="ignore"):
            b.set_title(f"RGB distance to the target colour (mean: {np.nanmean(d_src):.3f} → {np.nanmean(d_sty):.3f})")  # fmt: skip
        b.set_xticks(x, CLASSES, rotation=60, ha="right")
        b.set_ylabel("‖mean colour − target's‖")
        b.legend(frameon=False)
        fig.tight_layout()
    return fig


# ---- the method diagram (README, docs/method.md) ----------------------------------------------
DIAGRAM_DPI = 110  # figures/method.png: readable at GitHub's ~900 px page width

_DIAGRAM_FILL = {
    "source": "#fbe3cf",
    "stylized": "#e3e1f2",
    "target": "#d5efe6",
    "net": "#dbe8f6",
    "frozen": "#eeeeee",
    "memory": "#fff2bf",
    "loss": "#fde0e0",
}
_GRAD_G = "#c0392b"  # gradient that reaches the generator


def _box(ax, x, y, w, h, text, kind, size=9.0, bold=False):
    """A rounded box centred at (x, y); returns its (left, right, bottom, top)."""
    from matplotlib.patches import FancyBboxPatch

    edge = {"loss": "#b03a2e", "memory": "#b7950b", "frozen": "#777777"}.get(kind, "#34495e")
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
            fc=_DIAGRAM_FILL[kind], ec=edge, lw=1.1, ls="--" if kind == "frozen" else "-",
        )
    )  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight="bold" if bold else None)
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def _arrow(ax, points, style="data", label=None, at=0.5, offset=(0.0, 0.16), size=8.5):
    """An arrow along ``points`` (the last segment carries the head), with an optional label.

    style: "data" (solid, gradient flows), "sg" (dashed grey: stop-gradient / no grad),
    "grad" (solid red: a loss whose gradient reaches G), "ema" (dotted: EMA of the weights).
    ``at`` picks the point of the polyline (0..1 of its segments) where the label sits.
    """
    color, ls, lw = {
        "data": ("#2c3e50", "-", 1.2),
        "sg": ("#7f8c8d", (0, (4, 3)), 1.2),
        "grad": (_GRAD_G, "-", 1.6),
        "ema": ("#2c3e50", (0, (1, 2)), 1.4),
    }[style]
    pts = np.asarray(points, dtype=float)
    if len(pts) > 2:
        ax.plot(pts[:-1, 0], pts[:-1, 1], color=color, ls=ls, lw=lw, solid_capstyle="butt")
    ax.annotate(
        "", xy=pts[-1], xytext=pts[-2],
        arrowprops=dict(arrowstyle="-|>", color=color, lw=lw, ls=ls, mutation_scale=11,
                        shrinkA=0, shrinkB=0),
    )  # fmt: skip
    if label:
        seg = min(int(at * (len(pts) - 1)), len(pts) - 2)
        frac = at * (len(pts) - 1) - seg
        p = pts[seg] + (pts[seg + 1] - pts[seg]) * frac + np.asarray(offset)
        ax.text(*p, label, ha="center", va="center", fontsize=size, color=color,
                bbox=dict(fc="white", ec="none", pad=0.4, alpha=0.9))  # fmt: skip


def method_diagram() -> Figure:
    """CONFETI in one picture: data flow, networks, losses, and where gradients stop.

    Left to right: the two domains; the CUT generator G (with D and F) and the EMA teacher;
    ClassMix; the student segmentor (one network, three inputs); the losses; the prototypes.
    Solid arrows carry gradient, dashed ones are stop-gradients or no-grad passes, red ones are
    the losses whose gradient reaches G (docs/method.md §9 has the full routing table).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(11, 6.3))
        ax.set(xlim=(0, 16), ylim=(0, 9), aspect="auto")
        ax.axis("off")
        # ---- nodes: (left, right, bottom, top) of each box --------------------------------
        src = _box(ax, 1.05, 7.2, 1.7, 0.9, "source\n$x_s,\\ y_s$", "source", 10.5, True)
        tgt = _box(ax, 1.05, 3.1, 1.7, 0.9, "target\n$x_t$", "target", 10.5, True)
        g = _box(ax, 3.55, 7.2, 2.0, 0.9, "G\nCUT generator", "net", 9.5, True)
        df = _box(ax, 3.55, 8.45, 2.0, 0.75, "D: PatchGAN\nF: patch MLP", "net", 8.6)
        cut = _box(ax, 6.35, 8.45, 2.6, 0.62, "PatchNCE + LSGAN", "loss", 9.0)
        s2t = _box(ax, 6.2, 7.2, 1.7, 0.8, "$\\tilde x_s = G(x_s)$", "stylized", 10.5)
        psc = _box(ax, 6.2, 5.85, 2.9, 1.0, "PSC: $\\tilde x_s$ and $x_s$ must keep\ntheir "
                   "similarity to $P$\n(frozen student judges)", "loss", 8.6)  # fmt: skip
        mixb = _box(ax, 6.2, 4.25, 2.6, 0.95, "ClassMix + jitter/blur\n$x_m,\\ y_m,\\ w_m$", "net", 9.0)  # fmt: skip
        teach = _box(ax, 3.55, 3.1, 2.1, 0.9, "EMA teacher $\\phi$", "frozen", 9.5, True)
        stud = _box(ax, 9.25, 4.4, 1.8, 6.6, "student $\\theta$\n\nDeepLabV2\n+ CAM head\n"
                    "+ projection\n\n(one network,\nthree inputs)", "net", 9.0, True)  # fmt: skip
        l_fd = _box(ax, 11.95, 8.25, 2.9, 0.9, "feature distance on thing\nclasses vs. the frozen\n"
                    "ImageNet net on raw $x_s$", "loss", 8.0)  # fmt: skip
        l_src = _box(ax, 11.95, 6.85, 2.9, 1.0, "CE on stylized source\n+ CAM\n"
                     "+ contrast + regulariser", "loss", 8.6)  # fmt: skip
        l_mix = _box(ax, 11.95, 4.6, 2.9, 1.3, "mixed CE weighted by $q$\n(pasted source pixels: 1)\n"
                     "+ CAM\n+ contrast + regulariser", "loss", 8.6)  # fmt: skip
        l_tgt = _box(ax, 11.95, 2.35, 2.9, 0.8, "target contrast\n+ regulariser, $\\times\\, q$", "loss", 8.6)  # fmt: skip
        proto = _box(ax, 15.05, 4.6, 1.8, 5.0, "prototypes $P$\n\nCAM-weighted\ntop-k class\n"
                     "centroids,\nEMA", "memory", 9.0)  # fmt: skip
        # ---- source lane: G, its CUT losses, the consistency ------------------------------
        _arrow(ax, [(src[1], 7.2), (g[0], 7.2)], "data")
        _arrow(ax, [(g[1], 7.2), (s2t[0], 7.2)], "grad")
        _arrow(ax, [(3.55, g[3]), (3.55, df[2])], "data")
        _arrow(ax, [(df[1], 8.45), (cut[0], 8.45)], "data")
        _arrow(ax, [(cut[0] + 0.25, cut[2]), (g[1] - 0.1, g[3])], "grad", "updates G, D, F",
               at=0.5, offset=(0.95, -0.02))  # fmt: skip
        _arrow(ax, [(s2t[1], 7.2), (stud[0], 7.2)], "sg", "sg", at=0.5)
        _arrow(ax, [(6.2, s2t[2]), (6.2, psc[3])], "grad")
        _arrow(ax, [(src[1], 6.95), (1.95, 5.85), (psc[0], 5.85)], "sg", "raw $x_s$ (sg)", at=0.72)
        _arrow(ax, [(psc[0], 6.15), (4.3, 6.15), (4.3, g[2])], "grad", "to G", at=0.75,
               offset=(-0.32, 0.0))  # fmt: skip
        _arrow(ax, [(7.9, 7.2), (7.9, 5.1), (6.95, 5.1), (6.95, mixb[3])], "sg", "sg", at=0.2,
               offset=(0.22, 0.0))  # fmt: skip
        # ---- target lane, teacher, ClassMix ------------------------------------------------
        _arrow(ax, [(tgt[1], 3.1), (teach[0], 3.1)], "data")
        _arrow(ax, [(1.05, tgt[2]), (1.05, 1.4), (stud[0], 1.4)], "data", "$x_t$", at=0.8)
        _arrow(ax, [(teach[1], 3.3), (5.6, 3.3), (5.6, mixb[2])], "sg", "$\\hat y_t,\\ q$", at=0.35)
        _arrow(ax, [(1.05, tgt[3]), (1.05, 4.25), (mixb[0], 4.25)], "data", "$x_t$", at=0.7)
        _arrow(ax, [(mixb[1], 4.25), (stud[0], 4.25)], "data", "$x_m$", at=0.5)
        _arrow(ax, [(7.05, mixb[2]), (7.05, 2.85), (teach[1], 2.85)], "sg", "$x_m$ (no grad)", at=0.62)  # fmt: skip
        _arrow(ax, [(stud[0], 2.2), (4.2, 2.2), (4.2, teach[2])], "ema", "EMA of weights", at=0.3)
        _arrow(ax, [(3.55, teach[2]), (3.55, 0.45), (proto[0] + 0.8, 0.45), (proto[0] + 0.8, proto[2])],
               "sg", "teacher embeddings + CAM of $x_m$ update $P$ (no grad)", at=0.5)  # fmt: skip
        _arrow(ax, [(2.9, teach[2]), (2.9, 0.85), (11.95, 0.85), (11.95, l_tgt[2])], "sg",
               "pseudo-labels $\\hat y_t$ and $q$", at=0.42)  # fmt: skip
        # ---- student -> losses, prototypes -> losses ------------------------------------------
        _arrow(ax, [(stud[1], 7.3), (10.3, 7.3), (10.3, 8.25), (l_fd[0], 8.25)], "data")
        for y, box in ((6.85, l_src), (4.6, l_mix), (2.35, l_tgt)):
            _arrow(ax, [(stud[1], y), (box[0], y)], "data")
            _arrow(ax, [(proto[0], y), (box[1], y)], "sg", "$P$ (sg)", at=0.5, offset=(0.0, 0.18))
        # ---- legend -----------------------------------------------------------------------
        handles = [
            Line2D([], [], color="#2c3e50", lw=1.2, label="forward, gradient flows"),
            Line2D([], [], color="#7f8c8d", lw=1.2, ls=(0, (4, 3)), label="stop-gradient (sg) / no grad"),
            Line2D([], [], color=_GRAD_G, lw=1.6, label="gradient reaches G"),
            Line2D([], [], color="#2c3e50", lw=1.4, ls=(0, (1, 2)), label="EMA of the weights"),
            Patch(fc=_DIAGRAM_FILL["loss"], ec="#b03a2e", label="loss"),
            Patch(fc=_DIAGRAM_FILL["frozen"], ec="#777777", ls="--", label="no gradient (EMA)"),
        ]  # fmt: skip
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, -0.03), ncol=6,
                  fontsize=8.5, frameon=False, handlelength=2.4)  # fmt: skip
        fig.tight_layout()
    return fig


# ---- run length ---------------------------------------------------------------------------------
def plot_convergence(table: dict[str, dict[int, float]], chosen: int | None = None) -> Figure:
    """mIoU against the run length, one line per method (``METHOD_COLORS``), log2 x-axis.

    ``table``: {method: {iterations: mIoU}}; ``chosen``: the run length the toy preset uses
    (a dashed vertical line).
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        ends: dict[int, list] = {}  # last point of each line, labelled with its value
        for m, row in table.items():
            xs = sorted(row)
            ax.plot(xs, [row[x] for x in xs], marker="o", color=METHOD_COLORS.get(m), label=m)
            ends.setdefault(xs[-1], []).append((row[xs[-1]], METHOD_COLORS.get(m)))
        values = [v for row in table.values() for v in row.values()]
        gap = 0.045 * (max(values) - min(values) or 1.0)  # labels at one x stay this far apart
        for x, pts in ends.items():
            pts = sorted(pts, key=lambda p: p[0])
            for (y, color), y_text in zip(pts, _spread_apart([y for y, _ in pts], gap)):
                ax.annotate(f"{y:.1f}", (x, y), xytext=(x * 1.06, y_text), textcoords="data",
                            va="center", fontsize=7, color=color)  # fmt: skip
        if chosen is not None:
            ax.axvline(chosen, color="grey", ls="--", lw=0.8, label=f"toy preset: {chosen}")
        ax.set_xscale("log", base=2)
        lengths = sorted({x for row in table.values() for x in row})
        ax.set_xticks(lengths, [f"{x:,}" for x in lengths])
        ax.set_xlim(lengths[0] / 1.2, lengths[-1] * 1.5)  # room for the end labels
        ax.minorticks_off()
        ax.set_xlabel("training iterations (each run its own schedule)")
        ax.set_ylabel("mIoU on city val (%)")
        ax.set_title("Convergence on ToyStreets (one seed per point)")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.08, 0.5), frameon=False)
        fig.tight_layout()
    return fig


def plot_gap_matrix(table: dict[str, dict[str, float]],
                    seeds: dict[str, dict[str, list[float]]] | None = None) -> Figure:  # fmt: skip
    """Which alignment closes which gap: ToyStreets variants (rows) x methods (columns), each cell
    the share of that variant's source-only -> oracle gap the method closes (colour, percent)
    with its mIoU. ``table``: {variant: {method: mIoU}} (experiments.gap_table, the mean over a
    cell's seeds); with ``seeds`` (experiments.gap_seeds) a cell of several runs says how many."""
    from .experiments import gap_closed

    closed = gap_closed(table)
    variants = [v for v in table if v in closed]
    methods = [m for m in METHOD_COLORS if any(m in table[v] for v in variants)]
    vals = np.full((len(variants), len(methods)), np.nan)
    for i, v in enumerate(variants):
        for j, m in enumerate(methods):
            vals[i, j] = closed[v].get(m, np.nan)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 1.8, 0.75 * len(variants) + 1.4))
        im = ax.imshow(vals, cmap="RdYlGn", vmin=-50, vmax=100, aspect="auto")
        counts = []  # runs per drawn cell, for the title
        for i, v in enumerate(variants):
            for j, m in enumerate(methods):
                if m in table[v]:
                    dark = vals[i, j] < -25  # the deep red end: black text would not read
                    n = len((seeds or {}).get(v, {}).get(m, []))
                    counts.append(n)
                    text = f"{vals[i, j]:.0f} %\n{table[v][m]:.1f}"
                    text += f"\n{n} seeds" if n > 1 else ""
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")  # fmt: skip
                else:  # a white cell is a run not finished yet, not a score
                    ax.text(j, i, "not run\nyet", ha="center", va="center", fontsize=8,
                            color="0.5")  # fmt: skip
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        names = {
            "appearance": "appearance only",
            "content": "content only",
            "both": "both (default)",
        }
        ax.set_yticks(range(len(variants)), [names.get(v, v) for v in variants])
        ax.set_ylabel("ToyStreets gap")
        ax.set_xlabel("method")
        note = ("" if all(n <= 1 for n in counts)  # one run per cell: nothing to say
                else "\n(mean over the seeds each cell names)" if all(n > 1 for n in counts)
                else "\n(mean over seeds where a cell says so; one seed elsewhere)")  # fmt: skip
        ax.set_title("gap closed (% of source-only -> oracle) and mIoU on city val" + note)
        fig.colorbar(im, ax=ax, label="gap closed (%)")
        fig.tight_layout()
    return fig


def plot_loss_ablation(rows: dict[str, dict], noise: float | None = None,
                       title: str | None = None) -> Figure:  # fmt: skip
    """CONFETI with one part removed at a time (``experiments.loss_table``), one seed: the mIoU
    difference to CONFETI per row (left; the grey band is ± 2 seed-to-seed standard deviations
    of a one-seed paired difference, ``experiments.paired_noise``: a bar inside it is not told
    apart from seed noise) and the per-class IoU difference (right; blue: the row does better
    than CONFETI, red: worse)."""
    import seaborn as sns

    names = [n for n in rows if n != "confeti"]
    labels = [f"{n}\n(− {rows[n]['removed']})" for n in names]
    deltas = np.array([rows[n]["delta"] for n in names])
    grid = np.array([[np.nan if rows[n]["iou_delta"][c] is None else rows[n]["iou_delta"][c]
                      for c in CLASSES] for n in names])  # fmt: skip
    colors = method_colors(names)
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(16, 0.62 * len(names) + 2.2),
                                   gridspec_kw={"width_ratios": [1.25, 3]})  # fmt: skip
        y = np.arange(len(names))
        if noise is not None:
            a.axvspan(-2 * noise, 2 * noise, color="0.88", zorder=0,
                      label=f"± 2 × {noise:.2f} (seed noise of a paired difference)")  # fmt: skip
            a.legend(fontsize=7, loc="lower left")
        a.barh(y, deltas, color=[colors[n] for n in names], zorder=2)
        a.axvline(0, color="black", lw=0.8)
        lim = max(3.0, 1.15 * float(np.abs(deltas).max()))
        a.set_xlim(-lim, lim)
        for i, n in enumerate(names):  # the value on the free side of zero: never off the axes
            d = deltas[i]
            a.text(-0.03 * lim if d >= 0 else 0.03 * lim, i, f"{d:+.2f} ({rows[n]['miou']:.1f})",
                   va="center", ha="right" if d >= 0 else "left", fontsize=8)  # fmt: skip
        a.set_yticks(y, labels, fontsize=8)
        a.invert_yaxis()
        ref = rows["confeti"]["miou"]
        a.set_xlabel(f"mIoU − CONFETI's {ref:.2f} (points; in brackets: the row's mIoU)")
        sns.heatmap(grid, ax=b, annot=True, fmt="+.0f", cmap="RdBu", center=0, vmin=-20,
                    vmax=20, xticklabels=SHORT_NAMES, yticklabels=False, cbar=False,
                    annot_kws={"fontsize": 7})  # fmt: skip
        b.set_title("per-class IoU − CONFETI's (points; blue: better than CONFETI)")
        if title:
            fig.suptitle(title, x=0.01, ha="left")
        fig.tight_layout()
    return fig


# ---- notebook 04: watching a run ----------------------------------------------------------------
def plot_run_curves(metrics: dict[str, list[dict]], pretrain_iters: int = 0, keys=None) -> Figure:
    """``plot_training_curves`` for reading or watching a run: the CUT pre-training (phase 0,
    iterations 0 to ``pretrain_iters``, where only G, D and F train) shaded on every panel, and
    the rows of the periodic evaluation (phase "eval" of metrics.jsonl) as a last panel, "val
    mIoU", when there are any.

    ``metrics``: run name -> rows of metrics.jsonl. The x-axis is the run's iteration counter,
    phase 0 included (a run without phase 0, such as source-only, starts training at 0).
    """
    default = ["seg_src", "seg_mix", "pc_src", "pc_mix", "psc", "loss_G", "loss_D", "pseudo_q"]
    keys = list(keys or default)
    runs = {}
    for name, rows in metrics.items():
        evals = [
            {"iter": r["iter"], "val mIoU": r["miou"]} for r in rows if r.get("phase") == "eval"
        ]
        runs[name] = [r for r in rows if r.get("phase") != "eval"] + evals
    if any("val mIoU" in r for rows in runs.values() for r in rows):
        keys.append("val mIoU")
    fig = plot_training_curves(runs, keys)
    panels = [ax for ax in fig.axes if ax.get_title()]
    spans = []
    for ax in panels:
        if ax.get_title() == "val mIoU":
            for line in ax.get_lines():
                line.set_marker("o")
        if pretrain_iters > 0:
            spans.append(ax.axvspan(0, pretrain_iters, color="0.88", zorder=0))
    if spans:  # the runs are in the figure's legend; the span gets one in the first panel
        panels[0].legend(handles=spans[:1], labels=["CUT pre-training"], fontsize=7)
    return fig


# ---- the course's extra figures (notebooks 02 and 03) ------------------------------------------
def plot_translation_grid(columns: dict, n: int = 3) -> Figure:
    """One column per entry (its key as title), one row per image: e.g. source | FDA | CUT | target.

    Shape: every value (B, 3, H, W) ImageNet-normalised; the first ``n`` images of each are shown.
    """
    n = min(n, *(len(x) for x in columns.values()))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 1.45 * n + 0.4), squeeze=False)  # fmt: skip
        for c, (title, x) in enumerate(columns.items()):
            axes[0, c].set_title(title)
            for r in range(n):
                axes[r, c].imshow(to_image(x[r]))
                axes[r, c].axis("off")
        fig.tight_layout()
    return fig


def plot_class_colour_compare(stats: dict, reference: str = "target") -> Figure:
    """Mean colour per class of several image sets (swatch rows, white: absent) and, below, the
    RGB distance of each set's class colour to the ``reference`` set's (one bar per set).

    stats: {name: (19, 3) RGB in [0, 1], NaN where absent}; ``reference``: one of its keys.
    """
    names = list(stats)
    arrs = np.stack([np.asarray(stats[k], dtype=float) for k in names])  # (S, 19, 3)
    grid = np.where(np.isnan(arrs), 1.0, np.clip(arrs, 0, 1))
    ref = np.asarray(stats[reference], dtype=float)
    others = [k for k in names if k != reference]
    x, width = np.arange(len(CLASSES)), 0.8 / max(1, len(others))
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(2, 1, figsize=(10, 3.2 + 0.35 * len(names)), sharex=True, gridspec_kw={"height_ratios": [0.35 * len(names), 1.3]})  # fmt: skip
        a.imshow(grid, aspect="equal", interpolation="nearest")
        a.set_yticks(range(len(names)), names)
        a.set_title("mean colour per class")
        for i, k in enumerate(others):
            d = np.linalg.norm(np.asarray(stats[k], dtype=float) - ref, axis=1)  # NaN: absent
            with np.errstate(all="ignore"):
                label = f"{k} → {reference} (mean {np.nanmean(d):.3f})"
            b.bar(x - 0.4 + width * (i + 0.5), d, width=width, color=plt.cm.tab10(i), label=label)
        b.set_xticks(x, CLASSES, rotation=60, ha="right")
        b.set_ylabel(f"‖mean colour − {reference}'s‖")
        b.set_title(f"RGB distance to the {reference} colour of each class")
        b.legend(frameon=False, fontsize=7)
        fig.tight_layout()
    return fig


def plot_cam_maps(cams, image, classes, labels=None, labels_name: str = "labels") -> Figure:
    """What the prototype update weighs pixels by: per class k the CAM weights w_k = ReLU(A_k),
    bilinearly upsampled to the label map as ``PrototypeMemory.class_sums`` does, all K maps on
    ONE colour scale (0 .. the largest weight drawn), so classes can be compared.

    Bottom row: w_k minus the mean of the K maps drawn (one symmetric scale): the part of the map
    that is particular to class k; a map shared by all classes is 0 there. With ``labels``
    (H, W) train ids (e.g. the pseudo-labels the update uses) each map outlines class k's region
    (cyan) and its title gives the mean weight inside and outside that region; the bottom-left
    panel shows the labels.

    cams: (K, h, w) tensor/array, the CAM A of the K classes before the ReLU; image:
    ImageNet-normalised (3, H, W) tensor or uint8 (H, W, 3); classes: the K train ids (titles).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    a = torch.as_tensor(np.asarray(cams.detach().float().cpu() if isinstance(cams, torch.Tensor) else cams, dtype=np.float32))  # fmt: skip
    img = _as_rgb(image)
    lab = None if labels is None else np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)  # fmt: skip
    size = lab.shape[-2:] if lab is not None else img.shape[:2]
    w = F.interpolate(F.relu(a)[None], size=tuple(size), mode="bilinear", align_corners=False)[0].numpy()  # fmt: skip
    dev = w - w.mean(0, keepdims=True)  # (K, H, W): w_k - mean_j w_j over the maps drawn
    top, span = max(float(w.max()), 1e-12), max(float(np.abs(dev).max()), 1e-12)
    norm, dnorm = Normalize(0.0, top), Normalize(-span, span)
    extent = (0, img.shape[1], img.shape[0], 0)  # every map stretched over the image
    ys = (np.arange(size[0]) + 0.5) * img.shape[0] / size[0]
    xs = (np.arange(size[1]) + 0.5) * img.shape[1] / size[1]
    k_n = len(w)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, k_n + 1, figsize=(2.6 * (k_n + 1), 3.9), squeeze=False)
        axes[0, 0].imshow(img)
        axes[0, 0].set_title("image")
        if lab is not None:
            axes[1, 0].imshow(colorize(lab), interpolation="nearest", extent=extent)
            axes[1, 0].set_title(labels_name)
        for j, k in enumerate(classes):
            up, down = axes[0, j + 1], axes[1, j + 1]
            up.imshow(w[j], cmap="magma", norm=norm, extent=extent, interpolation="nearest")
            down.imshow(dev[j], cmap="RdBu_r", norm=dnorm, extent=extent, interpolation="nearest")  # fmt: skip
            title = f"w {CLASSES[k]} (max {float(w[j].max()):.1f})"
            if lab is not None:
                own = lab == k
                if own.any():
                    for ax in (up, down):
                        ax.contour(xs, ys, own.astype(float), levels=[0.5], colors="#00e5ff", linewidths=0.9)  # fmt: skip
                inside = float(w[j][own].mean()) if own.any() else float("nan")
                outside = float(w[j][~own].mean()) if (~own).any() else float("nan")
                title += f"\nmean in {inside:.1f} | out {outside:.1f}"
            up.set_title(title, fontsize=8.5)
            down.set_title(f"w {CLASSES[k]} − mean of the {k_n}", fontsize=8.5)
        for ax in axes.flat:
            ax.axis("off")
        fig.colorbar(ScalarMappable(norm, "magma"), ax=axes[0, 1:].tolist(), fraction=0.02, pad=0.01, label="w = ReLU(A), one scale")  # fmt: skip
        fig.colorbar(ScalarMappable(dnorm, "RdBu_r"), ax=axes[1, 1:].tolist(), fraction=0.02, pad=0.01, label="w_k − mean_j w_j")  # fmt: skip
        fig.suptitle("CAM weights of the prototype update at label resolution, all classes on one colour scale" + (" (cyan: the class's region)" if lab is not None else ""), fontsize=9.5)  # fmt: skip
    return fig


def plot_topk_pixels(image, labels, picked, classes) -> Figure:
    """Per class k: its pixels tinted in the class colour and, as white dots, the pixels the
    prototype update keeps (its top-K by CAM weight); the title counts kept / class pixels.

    image: ImageNet-normalised (3, H, W) tensor or uint8 (H, W, 3); labels: (H, W) train ids at
    the image's resolution; picked: (K, H, W) bool, True where kept; classes: the K train ids.
    """
    img = _as_rgb(image)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    keep = np.asarray(picked.cpu() if isinstance(picked, torch.Tensor) else picked, dtype=bool)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(classes), figsize=(2.6 * len(classes), 1.9), squeeze=False)  # fmt: skip
        for ax, k, sel in zip(axes[0], classes, keep):
            own = lab == k
            tint = np.zeros((*own.shape, 4))
            tint[own] = (*class_color(k), 0.6)  # the class's pixels in its palette colour
            ax.imshow(img, alpha=0.5)
            ax.imshow(tint)
            ys, xs = np.nonzero(sel)
            ax.scatter(xs, ys, s=6, c="white", edgecolors="black", linewidths=0.5)
            ax.set_title(f"{CLASSES[k]}: {int(sel.sum())} of {int(own.sum())} px")
            ax.axis("off")
        fig.tight_layout()
    return fig
