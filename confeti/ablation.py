"""The ablation: every method x K seeds on one preset, as a table and a figure.

``python -m confeti ablation --preset toy --data DIR --seeds 3 --out DIR`` writes
``DIR/<method>/seed<k>/`` (one ordinary run each; finished runs are reused), ``results.json``,
``results.md`` (mIoU mean ± std and per-class IoU) and ``ablation.png``.
Taught in notebooks/04_joint_training.ipynb.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .config import METHODS, Config
from .labels import CLASSES

# every method of the CLI, the oracle (the upper bound) last
ABLATION_METHODS = tuple(m for m in METHODS if m != "oracle") + ("oracle",)


def run_dir(out: str | Path, method: str, seed: int) -> Path:
    return Path(out) / method.replace("+", "_") / f"seed{seed}"


def collect(out: str | Path, methods=ABLATION_METHODS, seeds: int = 3) -> dict:
    """Read every finished run's eval.json/summary.json into {method: {...}}."""
    res = {}
    for m in methods:
        runs = []
        for s in range(seeds):
            d = run_dir(out, m, s)
            if (d / "eval.json").exists():
                ev = json.loads((d / "eval.json").read_text())
                sm = (
                    json.loads((d / "summary.json").read_text())
                    if (d / "summary.json").exists()
                    else {}
                )
                runs.append(
                    {"seed": s, "miou": ev["miou"], "iou": ev["iou"], "seconds": sm.get("seconds")}
                )
        if not runs:
            continue
        mious = np.array([r["miou"] for r in runs])
        per_class = {
            c: float(np.nanmean([np.nan if r["iou"].get(c) is None else r["iou"][c] for r in runs]))
            for c in CLASSES
        }
        res[m] = {
            "miou_mean": round(float(mious.mean()), 2),
            "miou_std": round(float(mious.std(ddof=1)) if len(mious) > 1 else 0.0, 2),
            "seeds": len(runs),
            "runs": runs,
            "iou_mean": {c: (None if np.isnan(v) else round(v, 2)) for c, v in per_class.items()},
            "seconds_mean": round(float(np.mean([r["seconds"] or 0 for r in runs])), 1),
        }
    return res


def markdown_table(res: dict) -> str:
    """mIoU mean ± std per method, then per-class IoU means."""
    short = [c[:5] for c in CLASSES]
    lines = [
        "| method | mIoU (mean ± std) | seeds | s/run |",
        "|---|---|---|---|",
    ]
    for m, r in res.items():
        lines.append(
            f"| {m} | {r['miou_mean']:.1f} ± {r['miou_std']:.1f} | {r['seeds']} | "
            f"{r['seconds_mean']:.0f} |"
        )
    lines += ["", "| method | " + " | ".join(short) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for m, r in res.items():
        vals = ["–" if r["iou_mean"][c] is None else f"{r['iou_mean'][c]:.0f}" for c in CLASSES]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(
    cfg: Config, data, out, seeds: int = 3, methods=None, device=None, progress: bool = True
) -> dict:
    """Train (or reuse) every method x seed, then write results.json, results.md, ablation.png."""
    from .plots import plot_ablation, save_figure
    from .runner import train

    methods = list(methods or ABLATION_METHODS)
    out = Path(out)
    t0 = time.time()
    for m in methods:
        for s in range(seeds):
            d = run_dir(out, m, s)
            if (d / "eval.json").exists():
                continue
            if progress:
                print(f"[ablation] {m} seed {s} -> {d}", flush=True)
            c = dataclasses.replace(cfg, seed=s)
            train(
                c, m, data, d, resume=(d / "config.json").exists(), device=device, progress=progress
            )
    res = collect(out, methods, seeds)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": cfg.preset,
        "iters": cfg.iters,
        "seeds": seeds,
        "wall_seconds_this_call": round(time.time() - t0, 1),
        "methods": res,
    }
    (out / "results.json").write_text(json.dumps(meta, indent=2))
    (out / "results.md").write_text(markdown_table(res))
    save_figure(plot_ablation(res), out / "ablation.png")
    if progress:
        print(markdown_table(res))
    return res
