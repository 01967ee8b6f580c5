"""``python -m confeti figures``: every paper-style figure from finished runs, into ``figures/``.

Reads ``RUNS/<method>/`` (checkpoint.pt, metrics.jsonl, eval.json) as written by ``make
reproduce`` and, when present, an ablation's ``results.json``. Nothing in ``figures/`` is edited by
hand, and nothing here is drawn from an untrained model: a run counts once it has its
``eval.json``. The plotting itself lives in ``plots.py``; this module loads runs and data and
saves PNGs. One file per figure:

- ``qualitative.png``, ``per_class_iou.png``, ``training_curves.png``: every finished run;
- ``stylization.png``: the generator of the CONFETI (else ``style``) run;
- ``train_step.png``: one more ``train_step`` of the finished CONFETI run, on the batch of the
  iteration after its last, drawn from its ``debug`` images;
- ``tsne.png``, ``centroid_distance.png``, ``alignment_scores.json``: source-only vs CONFETI in
  the backbone's feature space (both runs train it), and CONFETI's projection space with its
  prototypes;
- ``ablation.png``, ``ablation_table.png``: from the ablation's ``results.json``;
  ``ablation_difference.png``: CONFETI minus selftrain per class, seed by seed, from it;
  ``ablation_difference_style.png``: the same for selftrain+style (G without the contrast).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import plots
from .ablation import ABLATION_METHODS, paired_difference
from .datasets import CityscapesDataset, GTA5Dataset
from .embeddings import alignment, run_tsne, sample_embeddings

DISPLAY = {"source_only": "source-only", "confeti": "CONFETI"}  # names in titles and legends


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
    """{method: (state, cfg)} for every finished run (checkpoint.pt and eval.json) under ``runs``."""
    from .runner import load_for_eval

    out = {}
    for m in ABLATION_METHODS:  # the ablation's order: the oracle last
        ck = runs / m / "checkpoint.pt"
        if ck.exists() and (runs / m / "eval.json").exists():
            state, cfg = load_for_eval(ck, "cpu")
            out[m] = (state, cfg)
    return out


def read_metrics(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln] if f.exists() else []


def runs_caption(loaded: dict) -> str:
    """ "toy preset, 6,400 iterations, seed 0" when all runs share them, else the per-run list."""
    keys = {m: (c.preset, c.iters, c.seed) for m, (_, c) in loaded.items()}
    if len(set(keys.values())) == 1:
        preset, iters, seed = next(iter(keys.values()))
        return f"{preset} preset, {iters:,} iterations, seed {seed}"
    return ", ".join(f"{m}: {p} {i:,} it. seed {s}" for m, (p, i, s) in keys.items())


def tsne_note(k: int, chance: float) -> str:
    """The line under the t-SNE figure: what the centroid cosine, the margin and the k-NN
    mixing score measure (``embeddings.alignment``), with the fully mixed value ``chance``."""
    return (
        "centroid cosine: mean over classes of cos(c_source, c_target), class centroids of unit "
        "features (1 = same direction). margin: own-class cosine minus the largest cosine to "
        "another class's source centroid (> 0: nearer its own class).\n"
        f"k-NN mixing: share of source pixels among a target pixel's k = {k} nearest same-class "
        "neighbours (cosine), averaged per class; 0 = separate domains, "
        f"{chance:.2f} = fully mixed for these samples (n_s/(n_s+n_t-1), 0.5 for equal budgets)."
    )


def score_line(a: dict) -> str:
    """One panel's scores (an ``embeddings.alignment`` dict) in one line."""
    return (
        f"centroid cosine {a['mean_cosine']:.3f}, margin {a['mean_margin']:.3f}, "
        f"k-NN mixing {a['knn_mixing']:.3f} (fully mixed: {a['knn_mixing_chance']:.2f})"
    )


def tsne_figures(runs: dict, data: Path, per_class: int = 150, images: int = 24, seed: int = 0):
    """(t-SNE figure, centroid-distance figure, scores) for source-only vs CONFETI.

    Both runs in the backbone's feature space (the one space both trained), then CONFETI's
    projection space with its prototypes (source-only never trains its projection head).
    """
    src = GTA5Dataset(data / "gta5", resize=None, crop_size=None)
    tgt = CityscapesDataset(data / "cityscapes", split="val", resize=None, crop_size=None)
    todo = [(m, "backbone") for m in ("source_only", "confeti") if m in runs]
    if "confeti" in runs:
        todo.append(("confeti", "projection"))
    panels, scores, texts, dists, chance, k = {}, {}, {}, {}, [], 10
    for m, space in todo:
        state, cfg = runs[m]
        size = cfg.target_resize or cfg.source_resize

        def prep(xy, size=size):
            x, y = xy
            if size is not None:
                x = F.interpolate(x, size=size, mode="bilinear")
            return x, y

        doms = {
            "source": prep(_stack(src, images, seed)),
            "target": prep(_stack(tgt, images, seed)),
        }
        e = sample_embeddings(state, doms, per_class=per_class, seed=seed, space=space)
        xy, pxy = run_tsne(e, seed=seed)
        a = alignment(e, k=k)
        what = "projection space + prototypes" if space == "projection" else "backbone features"
        title = f"{DISPLAY.get(m, m)}: {what}"
        panels[title] = (xy, e.labels, e.domains, pxy)
        keep = ("mean_cosine", "mean_margin", "knn_mixing", "knn_mixing_chance")
        scores.setdefault(m, {})[space] = {key: a[key] for key in keep}
        texts[title] = score_line(a)
        chance.append(a["knn_mixing_chance"])
        if space == "backbone":
            dists[m] = a["per_class_distance"]
    if not panels:
        return None, None, {}
    note = tsne_note(k, float(np.nanmean(chance)))
    fig = plots.plot_tsne(panels, texts, note=note)
    fig.suptitle(f"Source and target pixels on city val ({runs_caption(runs)})", y=1.01)
    for m in scores:
        scores[m]["k"] = k
    bars = None
    if len(dists) == 2:
        bars = plots.plot_centroid_distance(
            dists["source_only"],
            dists["confeti"],
            ("source-only", "CONFETI"),
            title="source-target class-centroid distance, backbone features (lower = aligned)",
        )
    return fig, bars, scores


def train_step_figure(run: Path, data: Path):
    """The debug images of one more ``train_step`` of a finished CONFETI run.

    Loads the run's final state (student, teacher, prototypes, G, optimizers), draws the batch
    the loop would draw next (batch t is a function of (seed, t) only) and steps once with
    ``debug={}``; the state is thrown away afterwards.
    """
    from .runner import BatchStream, _mix_seed, build_data, load_for_eval, phases, to_device
    from .train import train_step

    state, cfg = load_for_eval(run / "checkpoint.pt", "cpu")
    _, p_start, p_stop = phases(cfg, state.method)[-1]  # a finished run ends at p_stop
    d = build_data(cfg, data, state.method, data_check=False, progress=False)
    batch = next(iter(BatchStream(d, cfg, p_stop, p_stop + 1, 0, False)))
    torch.manual_seed(_mix_seed(cfg.seed, 0, p_stop, 7))
    dbg: dict = {}
    logs = train_step(state, to_device(batch, torch.device("cpu"), cfg.channels_last), p_stop - p_start, debug=dbg)  # fmt: skip
    q = float(logs.get("pseudo_q", float("nan")))  # share of confident target pixels
    panels = {
        "source x_s": dbg["x_s"],
        "stylized x_s2t = G(x_s)": dbg["x_s2t"],
        "target x_t": dbg["x_t"],
        "pseudo-label ŷ_t": dbg["y_t_hat"],
        "ClassMix mask M": dbg["mask"].float(),
        "mixed image x_m": dbg["x_m"],
        "mixed label y_m": dbg["y_m"],
        "weight map w_m": dbg["w_m"].float(),
    }
    caption = runs_caption({"confeti": (state, cfg)})
    title = (
        f"CONFETI, finished run ({caption}): one more train_step on the next batch, "
        f"t = {p_stop - p_start:,} (iteration {p_stop + 1:,} counting {p_start} CUT pre-training "
        f"steps); share of confident target pixels q = {q:.2f}"
    )
    return plots.plot_train_step(panels, suptitle=title)


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
        caption = runs_caption(loaded)
        val = CityscapesDataset(data / "cityscapes", split="val", resize=None, crop_size=None)
        x, y = _stack(val, 4, seed=1)
        preds = {m: predict(s, c, x, y.shape[-2:]) for m, (s, c) in loaded.items()}
        save(plots.plot_qualitative(x, y, preds, suptitle=f"city val ({caption})"), "qualitative.png")  # fmt: skip
        ious = {m: json.loads((runs / m / "eval.json").read_text())["iou"] for m in loaded}
        fig = plots.plot_per_class_iou(ious)
        fig.axes[0].set_title(f"per-class IoU on city val ({caption})")
        save(fig, "per_class_iou.png")
        fig = plots.plot_training_curves({m: read_metrics(runs / m) for m in loaded})
        fig.suptitle(caption, y=0.995, x=0.01, ha="left", fontsize=9)
        save(fig, "training_curves.png")
        styled = loaded.get("confeti") or loaded.get("style")
        if styled is not None and styled[0].style is not None:
            src = GTA5Dataset(data / "gta5", resize=None, crop_size=None)
            xs, _ = _stack(src, 4, seed=2)
            with torch.no_grad():
                xs2t = styled[0].style.translate(xs)
            fig = plots.plot_stylization_grid(xs, xs2t, x, n=3)
            who = "CONFETI" if "confeti" in loaded else "style"
            fig.suptitle(f"the generator G of the {who} run ({caption})", y=1.02)
            save(fig, "stylization.png")
        fig, bars, scores = tsne_figures(loaded, data)
        save(fig, "tsne.png")
        save(bars, "centroid_distance.png")
        if scores:
            (out / "alignment_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        if "confeti" in loaded:
            save(train_step_figure(runs / "confeti", data), "train_step.png")
    ablation = Path(ablation) if ablation else runs.parent / "ablation" / "results.json"
    if ablation.exists():
        res = json.loads(ablation.read_text())["methods"]
        save(plots.plot_ablation(res), "ablation.png")
        save(plots.plot_results_table(res), "ablation_table.png")
        if "confeti" in res and "selftrain" in res:  # CONFETI against its self-training base
            diff = paired_difference(res, "confeti", "selftrain")
            save(plots.plot_paired_difference(diff, "confeti", "selftrain"), "ablation_difference.png")  # fmt: skip
        if "selftrain+style" in res and "selftrain" in res:  # what G alone costs self-training
            diff = paired_difference(res, "selftrain+style", "selftrain")
            save(plots.plot_paired_difference(diff, "selftrain+style", "selftrain"), "ablation_difference_style.png")  # fmt: skip
    return written
