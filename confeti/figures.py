"""``python -m confeti figures``: every paper-style figure from finished runs, into ``figures/``.

Reads ``RUNS/<method>/`` (checkpoint.pt, metrics.jsonl, eval.json) as written by ``make
reproduce`` and, when present, an ablation's ``results.json``. Nothing in ``figures/`` is edited by
hand. The plotting itself lives in ``plots.py``; this module loads runs and data and saves PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import plots
from .datasets import CityscapesDataset, GTA5Dataset
from .embeddings import alignment, run_tsne, sample_embeddings

METHOD_ORDER = ("source_only", "style", "contrast", "selftrain", "confeti")


def _stack(ds, n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    idx = np.sort(g.choice(len(ds), size=min(n, len(ds)), replace=False))
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def predict(state, cfg, x: torch.Tensor, size) -> torch.Tensor:
    """Train-id predictions at ``size`` from whole-image inference at the training scale."""
    student = state.student.eval()
    if cfg.target_resize is not None:
        x = F.interpolate(x, size=cfg.target_resize, mode="bilinear")
    logits, _ = student(x)
    return F.interpolate(logits, size=size, mode="bilinear").argmax(1)


def load_runs(runs: Path) -> dict:
    from .runner import load_for_eval

    out = {}
    for m in METHOD_ORDER:
        ck = runs / m / "checkpoint.pt"
        if ck.exists() and (runs / m / "eval.json").exists():
            state, cfg = load_for_eval(ck, "cpu")
            out[m] = (state, cfg)
    return out


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln] if f.exists() else []


def tsne_figures(runs: dict, data: Path, per_class: int = 150, images: int = 24, seed: int = 0):
    """(t-SNE figure, centroid-distance figure, scores) for source-only vs CONFETI."""
    src = GTA5Dataset(data / "gta5", resize=None, crop_size=None)
    tgt = CityscapesDataset(data / "cityscapes", split="val", resize=None, crop_size=None)
    panels, scores, texts, dists = {}, {}, {}, {}
    for m in ("source_only", "confeti"):
        if m not in runs:
            continue
        state, cfg = runs[m]
        size = cfg.target_resize or cfg.source_resize

        def prep(xy, size=size):
            x, y = xy
            if size is not None:
                x = F.interpolate(x, size=size, mode="bilinear")
            return x, y

        e = sample_embeddings(
            state,
            {"source": prep(_stack(src, images, seed)), "target": prep(_stack(tgt, images, seed))},
            per_class=per_class,
            seed=seed,
        )
        xy, pxy = run_tsne(e, seed=seed)
        a = alignment(e)
        title = "before adaptation (source-only)" if m == "source_only" else "after (CONFETI)"
        panels[title] = (xy, e.labels, e.domains, pxy)
        scores[m] = {"mean_cosine": a["mean_cosine"], "knn_mixing": a["knn_mixing"]}
        texts[title] = (
            f"source-target centroid cosine {a['mean_cosine']:.3f}, "
            f"k-NN domain mixing {a['knn_mixing']:.3f}"
        )
        dists[m] = a["per_class_distance"]
    fig = plots.plot_tsne(panels, texts) if panels else None
    bars = None
    if len(dists) == 2:
        bars = plots.plot_centroid_distance(
            dists["source_only"], dists["confeti"], ("source-only", "CONFETI")
        )
    return fig, bars, scores


def write_figures(runs, data, out="figures", ablation=None) -> dict:
    """Write every figure that the finished runs allow; return {name: path}."""
    runs, data, out = Path(runs), Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}

    def save(fig, name):
        if fig is not None:
            plots.save_figure(fig, out / name)
            written[name] = str(out / name)

    plots.save_figure(plots.method_diagram(), out / "method.png", dpi=plots.DIAGRAM_DPI)
    written["method.png"] = str(out / "method.png")  # needs no run: the method itself
    loaded = load_runs(runs)
    if loaded:
        val = CityscapesDataset(data / "cityscapes", split="val", resize=None, crop_size=None)
        x, y = _stack(val, 4, seed=1)
        preds = {m: predict(s, c, x, y.shape[-2:]) for m, (s, c) in loaded.items()}
        save(plots.plot_qualitative(x, y, preds), "qualitative.png")
        ious = {m: json.loads((runs / m / "eval.json").read_text())["iou"] for m in loaded}
        save(plots.plot_per_class_iou(ious), "per_class_iou.png")
        save(
            plots.plot_training_curves({m: read_metrics(runs / m) for m in loaded}),
            "training_curves.png",
        )
        styled = loaded.get("confeti") or loaded.get("style")
        if styled is not None and styled[0].style is not None:
            src = GTA5Dataset(data / "gta5", resize=None, crop_size=None)
            xs, _ = _stack(src, 4, seed=2)
            with torch.no_grad():
                xs2t = styled[0].style.translate(xs)
            save(plots.plot_stylization_grid(xs, xs2t, x, n=3), "stylization.png")
        fig, bars, scores = tsne_figures(loaded, data)
        save(fig, "tsne.png")
        save(bars, "centroid_distance.png")
        if scores:
            (out / "alignment_scores.json").write_text(json.dumps(scores, indent=2))
    ablation = Path(ablation) if ablation else runs.parent / "ablation" / "results.json"
    if ablation.exists():
        res = json.loads(ablation.read_text())["methods"]
        save(plots.plot_ablation(res), "ablation.png")
        save(plots.plot_results_table(res), "ablation_table.png")
    return written
