"""``make reproduce``: the whole toy pipeline in one command, reusing whatever is finished.

1. generate ToyStreets (skipped if ``DATA/toystreets.json`` exists);
2. train the toy runs the figures need (source-only, style, contrast, CONFETI; a finished run,
   one with ``eval.json``, is reused, an interrupted one is resumed);
3. execute notebooks 01-05 headless *in place* (``confeti.notebooks.execute``: the committed
   notebooks get the outputs of the full toy run, cleaned, with a record of the code and the
   inputs they were made from), with ``CONFETI_RUNS``/``CONFETI_DATA`` pointing at the runs
   above so they load them instead of training again, and ``CONFETI_FIGURES`` so they save
   their figures; a notebook that fails is left as it was and stops the pipeline;
4. write every paper-style figure into ``figures/`` (``confeti.figures``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import get_preset

FIGURE_RUNS = ("source_only", "style", "contrast", "confeti")
NOTEBOOKS = (
    "01_data",
    "02_pixel_alignment",
    "03_feature_alignment",
    "04_joint_training",
    "05_prototype_tsne",
)


def _step(i: int, n: int, text: str) -> float:
    print(f"[reproduce {i}/{n}] {text}", flush=True)
    return time.time()


def reproduce(
    data="data/toystreets", runs="runs", figures="figures", preset="toy", notebooks_dir="notebooks"
) -> None:
    from .figures import write_figures
    from .notebooks import execute
    from .runner import train
    from .toystreets import write_toystreets

    data, runs, figures = Path(data), Path(runs), Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    n = 4
    t0 = _step(1, n, f"ToyStreets benchmark -> {data}")
    if not (data / "toystreets.json").exists():
        write_toystreets(data)
    print(f"    done in {time.time() - t0:.0f}s", flush=True)

    cfg = get_preset(preset)
    for m in FIGURE_RUNS:
        out = runs / preset / m
        t0 = _step(2, n, f"train {m} ({preset} preset) -> {out}")
        if (out / "eval.json").exists():
            print("    finished run found, reused", flush=True)
            continue
        train(cfg, m, data, out, resume=(out / "config.json").exists())
        print(f"    done in {time.time() - t0:.0f}s", flush=True)

    env = dict(
        os.environ,
        CONFETI_RUNS=str((runs / preset).resolve()),
        CONFETI_DATA=str(data.resolve()),
        CONFETI_FIGURES=str(figures.resolve()),
    )
    env.pop("CONFETI_SMOKE", None)
    for name in NOTEBOOKS:
        nb = Path(notebooks_dir) / f"{name}.ipynb"
        if not nb.exists():
            print(f"    {nb} not found, skipped", flush=True)
            continue
        t0 = _step(3, n, f"execute {nb} in place")
        execute(nb, env=env, timeout=1800)
        print(f"    done in {time.time() - t0:.0f}s", flush=True)

    t0 = _step(4, n, f"figures -> {figures}/")
    write_figures(runs / preset, data, figures)
    print(f"    done in {time.time() - t0:.0f}s", flush=True)
    print(f"make reproduce finished in {(time.time() - t_all) / 60:.1f} min", flush=True)
