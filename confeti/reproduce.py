"""``make reproduce``: the whole toy pipeline in one command, reusing whatever is finished.

1. generate ToyStreets (skipped if ``DATA/toystreets.json`` exists; a folder of another
   ToyStreets version, or runs trained on another folder, are refused by name);
2. train the toy runs the figures need (source-only, style, contrast, CONFETI; a finished run,
   one with ``eval.json``, is reused, an interrupted one is resumed), as two processes of one
   thread each with the CUT pre-training shared (``experiments.run_jobs``);
3. execute notebooks 01-05 headless *in place* (``confeti.notebooks.execute``: the committed
   notebooks get the outputs of the full toy run, cleaned, with a record of the code and the
   inputs they were made from), with ``CONFETI_RUNS``/``CONFETI_DATA`` pointing at the runs
   above so they load them instead of training again, and ``CONFETI_FIGURES`` so they save
   their figures; a notebook that fails is left as it was and stops the pipeline;
4. write every paper-style figure into ``figures/`` (``confeti.figures``), the ablation's from
   the committed ``results/ablation_5seeds.json`` (else ``ablation_3seeds.json``, else
   ``ablation.json``).
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


def _refuse_other_configs(jobs, cfg) -> None:
    """A run folder trained with another config (an older preset, another length) is never
    reused or resumed silently: stop and name it, and the fields that differ."""
    import json

    from .runner import with_defaults

    want = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as in config.json
    for j in jobs:
        f = j.out / "config.json"
        if not f.exists():
            continue
        have = json.loads(f.read_text())
        have["config"] = with_defaults(have.get("config", {}))  # fields added since: defaults
        diff = sorted(k for k in want.keys() | have.get("config", {}).keys()
                      if want.get(k) != have.get("config", {}).get(k))  # fmt: skip
        if have.get("method") != j.method or diff:
            shown = ", ".join(f"{k}: {have.get('config', {}).get(k)!r} -> {want.get(k)!r}"
                              for k in diff[:5])  # fmt: skip
            raise SystemExit(f"reproduce: {j.out} holds a run of another config ({shown}); "
                             "move it away or pass --runs DIR to train the current preset")  # fmt: skip


def _check_benchmark(data: Path, runs: Path) -> None:
    """Never mix benchmarks silently: the data folder must be the ToyStreets version this code
    generates, and finished runs must have been trained on this very data folder (the
    SHA-256 of its ``toystreets.json``, recorded in ``RUNS/benchmark.json``)."""
    import hashlib
    import json

    from .toystreets import VERSION

    summary = data / "toystreets.json"
    have = json.loads(summary.read_text()).get("version", 1)
    if have != VERSION:
        raise SystemExit(f"reproduce: {summary} is ToyStreets version {have}, and this code "
                         f"generates version {VERSION} (the benchmark's defaults changed); "
                         f"delete {data} so that make reproduce regenerates it, or pass "
                         "DATA=DIR")  # fmt: skip
    digest = hashlib.sha256(summary.read_bytes()).hexdigest()
    stamp = runs / "benchmark.json"
    if stamp.exists():
        recorded = json.loads(stamp.read_text()).get("toystreets_sha256")
        if recorded != digest:
            raise SystemExit(f"reproduce: the runs in {runs} were trained on another ToyStreets "
                             f"than {data} ({stamp} records another toystreets.json); move "
                             "them away or pass RUNS=DIR")  # fmt: skip
        return
    finished = sorted(p.parent.name for p in runs.glob("*/eval.json"))
    if finished:
        raise SystemExit(f"reproduce: {runs} holds finished runs ({', '.join(finished)}) without "
                         f"a record of the ToyStreets they were trained on ({stamp}); move "
                         "them away or pass RUNS=DIR")  # fmt: skip
    runs.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"toystreets_sha256": digest, "data": str(data)}, indent=1))


def reproduce(
    data="data/toystreets", runs="runs", figures="figures", preset="toy", notebooks_dir="notebooks"
) -> None:
    from .experiments import Job, run_jobs
    from .figures import write_figures
    from .notebooks import execute
    from .toystreets import write_toystreets

    data, runs, figures = Path(data), Path(runs), Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    n = 4
    t0 = _step(1, n, f"ToyStreets benchmark -> {data}")
    if not (data / "toystreets.json").exists():
        write_toystreets(data)
    print(f"    done in {time.time() - t0:.0f}s", flush=True)

    # the runs as separate processes of one thread each, two at a time, the longest first, the
    # CUT pre-training (phase 0) trained once and shared by the runs with G (experiments.run_jobs)
    cfg = get_preset(preset)
    jobs = [Job(m, m, runs / preset / m, cfg.iters, cfg.seed, cut_cache=runs / preset / "cut_cache")
            for m in FIGURE_RUNS]  # fmt: skip
    _refuse_other_configs(jobs, cfg)
    _check_benchmark(data, runs / preset)
    todo = [j.name for j in jobs if not j.done()]
    t0 = _step(2, n, f"train {', '.join(FIGURE_RUNS)} ({preset} preset, {cfg.iters} iterations) "
               f"-> {runs / preset}/; finished runs reused: {len(jobs) - len(todo)}")  # fmt: skip
    if todo:
        print(f"    follow a run with: tail -f {runs / preset}/<method>/log.txt", flush=True)
        run_jobs(jobs, data, preset=preset, n_procs=min(2, os.cpu_count() or 1))
        failed = [j.name for j in jobs if not j.done()]
        if failed:
            raise SystemExit(f"reproduce: run(s) {failed} failed; see their log.txt, then rerun")
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
    # the ablation's figures from its committed table with the most seeds, else the seed-0 table
    # (results/ablation_5seeds.json, ablation_3seeds.json, ablation.json), when one exists
    committed = Path(__file__).resolve().parents[1] / "results"
    names = ("ablation_5seeds.json", "ablation_3seeds.json", "ablation.json")
    tables = [committed / n for n in names]
    table = next((t for t in tables if t.exists()), None)
    write_figures(runs / preset, data, figures, ablation=table)
    print(f"    done in {time.time() - t0:.0f}s", flush=True)
    print(f"make reproduce finished in {(time.time() - t_all) / 60:.1f} min", flush=True)
