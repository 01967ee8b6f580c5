"""Experiments made of many runs: a grid on a tuning split, and convergence over run lengths.

Every run is an ordinary ``train`` run in its own folder (resumable: an interrupted run continues
with ``--resume``, a finished one is reused), started as a separate process with one thread,
``jobs`` at a time, the longest first. Each experiment collects its runs into one small JSON under
``results/`` with the commit, the base config, the torch version and the machine, so the README's
tables and figures regenerate from it without retraining, and a new machine loses nothing.

- ``tune``: ``selftrain`` (a method-agnostic baseline, never a method we report) over a grid of
  the recipe values that are not the paper's, scored on a **tuning split**: a second ToyStreets
  city validation set generated with another ``--seed``, never reported. The reported validation
  set plays no part in the choice.
- ``convergence``: methods x run lengths; a length L is converged when every method's mIoU at 2L
  is within about a point of its value at L.
- ``losses``: CONFETI with one term of its objective switched off at a time (``LOSS_ABLATION``),
  to show which loss costs or buys what.
- ``gapmatrix``: ToyStreets variants (appearance gap only, content gap only, both) x methods at one
  run length: which alignment closes which gap. The same machinery with other variants
  (``--variant name:knob=value,...``) calibrates the benchmark's knobs.
- ``grid`` (no training): how much of each class survives the resize of its labels to the
  contrast's feature grid, against an ablation table's per-class paired differences.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, get_preset, scale_schedule

# relative cost of one iteration of each method: seconds of the toy runs at 12,800 iterations
# (one thread each, results/table_12800.json), source-only = 1; fda and selftrain+style (not
# measured whole) from source-only and style. The schedulers start the costliest runs first.
COST = {"confeti": 3.5, "selftrain+style": 2.6, "style": 2.3, "selftrain+contrast": 2.0,
        "selftrain": 1.3, "contrast": 1.1, "fda": 1.05, "source_only": 1.0, "oracle": 0.42}  # fmt: skip


@dataclass
class Job:
    """One training run (and optionally an evaluation on another data folder)."""

    name: str
    method: str
    out: Path
    iters: int
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    eval_data: Path | None = None  # also evaluate on this folder's cityscapes/val -> eval_tune.json
    cut_cache: Path | None = None  # phase 0 (CUT pre-training) shared between runs with G
    data: Path | None = None  # train on this folder instead of the experiment's --data
    variant: str | None = None  # the ToyStreets variant the run belongs to (gap matrix)

    def cost(self) -> float:
        return COST.get(self.method, 1.0) * self.iters

    def done(self) -> bool:
        if not (self.out / "eval.json").exists():
            return False
        return self.eval_data is None or (self.out / "eval_tune.json").exists()

    def commands(self, data: Path, preset: str) -> list[list[str]]:
        py = [sys.executable, "-m", "confeti"]
        train = py + ["train", "--preset", preset, "--method", self.method, "--data", str(data),
                      "--out", str(self.out), "--iters", str(self.iters), "--seed", str(self.seed)]  # fmt: skip
        for k, v in self.overrides.items():
            train += ["--set", f"{k}={v}"]
        if self.cut_cache is not None:
            train += ["--cut-cache", str(self.cut_cache)]
        if (self.out / "config.json").exists():
            train.append("--resume")
        cmds = [] if (self.out / "eval.json").exists() else [train]
        if self.eval_data is not None:
            cmds.append(py + ["eval", "--ckpt", str(self.out / "checkpoint.pt"), "--data",
                              str(self.eval_data), "--out", str(self.out / "eval_tune.json")])  # fmt: skip
        return cmds


def run_jobs(jobs: list[Job], data: Path, preset: str = "toy", n_procs: int = 2,
             progress: bool = True, recorded: dict | None = None, threads: int = 1) -> None:  # fmt: skip
    """Run the unfinished jobs, the most expensive first, ``n_procs`` processes of ``threads``
    threads each (one run alone on 2 cores: ``n_procs=1, threads=2``); a job with a row in
    ``recorded`` (``recorded_rows``) counts as finished."""
    recorded = recorded or {}
    todo = [j for j in jobs if not j.done() and _row_of(j, recorded) is None]
    todo = sorted(todo, key=lambda j: -j.cost())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def one(job: Job) -> str:
        job.out.mkdir(parents=True, exist_ok=True)
        with open(job.out / "log.txt", "a") as log:
            for cmd in job.commands(job.data or data, preset):
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=log).returncode
                if rc != 0:
                    return f"{job.name}: FAILED (exit {rc}), see {job.out / 'log.txt'}"
        return f"{job.name}: done"

    if progress:
        print(f"{len(todo)} of {len(jobs)} runs to do, {n_procs} at a time", flush=True)
    with ThreadPoolExecutor(n_procs) as pool:
        for msg in pool.map(one, todo):
            if progress:
                print(time.strftime("%H:%M:%S"), msg, flush=True)


def provenance(preset: str) -> dict:
    """Commit, torch version, machine: what a result file records about where it came from."""
    from .runner import code_commit

    return {"commit": code_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores {platform.processor()}",
            "date": time.strftime("%Y-%m-%d"), "preset": preset}  # fmt: skip


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def toystreets_id(data: Path) -> dict | None:
    """{version, seed} of a ToyStreets folder (None for other data): what a result depends on."""
    meta = _read(Path(data) / "toystreets.json")
    return None if meta is None else {"version": meta.get("version"), "seed": meta.get("seed")}


def recorded_rows(path: Path, preset: str, data: Path) -> dict[str, dict]:
    """The runs an existing results file holds, by job name, when it was made with this preset's
    recipe (the same ``base_config``) on the same data (``toystreets_id``); empty otherwise. A
    new machine, whose run folders are empty, keeps them instead of training them again."""
    old = _read(Path(path))
    if old is None or old.get("preset") != preset:
        return {}
    if old.get("toystreets") is None or old["toystreets"] != toystreets_id(data):
        return {}
    now = json.loads(json.dumps(get_preset(preset).to_dict()))  # tuples as the file's lists
    default = json.loads(json.dumps(Config().to_dict()))  # a field newer than the file: default
    was = old.get("base_config", {})
    if any(was.get(k, default.get(k)) != v for k, v in now.items()):
        return {}
    return {r["name"]: r for r in old.get("runs", [])}


def ablation_rows(path: Path, jobs: list[Job], data: Path) -> dict[str, dict]:
    """Rows for the jobs that are runs of a committed ablation table (``ablation.save_results``'
    file): the same method, length and seed, no overrides, trained on the ablation's data
    (``data`` itself, with the same ``toystreets_id``). The convergence check's runs at the
    preset's length and the gap matrix's "both" row are such runs: they are read, not retrained.
    """
    ab = _read(Path(path))
    if ab is None or ab.get("experiment") != "ablation":
        raise SystemExit(f"--ablation {path}: not an ablation table (results/ablation*.json)")
    same_data = ab.get("data") == Path(data).name and toystreets_id(data) == {
        "version": ab.get("toystreets_version"), "seed": ab.get("toystreets_seed")}  # fmt: skip
    runs = {(m, r["seed"]): r for m, v in ab["methods"].items() for r in v["runs"]}
    rows = {}
    for j in jobs:
        on_data = j.data is None or Path(j.data).resolve() == Path(data).resolve()
        r = runs.get((j.method, j.seed))
        if r is None or j.overrides or j.iters != ab["iters"] or not (same_data and on_data):
            continue
        rows[j.name] = {"name": j.name, "method": j.method, "iters": j.iters, "seed": j.seed,
                        "overrides": {}, "seconds": r.get("seconds"), "commit": ab.get("commit"),
                        "from": Path(path).name, "miou": r["miou"], "iou": r["iou"]}  # fmt: skip
        if j.variant is not None:
            rows[j.name]["variant"] = j.variant
    return rows


def _row_of(job: Job, recorded: dict[str, dict]) -> dict | None:
    """``job``'s row in ``recorded`` if it is the same run (method, length, seed, overrides)."""
    r = recorded.get(job.name)
    same = r is not None and (r["method"], r["iters"], r["seed"], r.get("overrides", {})) == (
        job.method, job.iters, job.seed, job.overrides)  # fmt: skip
    return r if same and r.get("variant") == job.variant else None


def collect(jobs: list[Job], preset: str, experiment: str, extra: dict | None = None,
            recorded: dict | None = None) -> dict:  # fmt: skip
    """The finished runs' numbers, as one JSON-able dict; a job not finished on disk but with a
    row in ``recorded`` keeps that row."""
    runs = []
    for j in jobs:
        ev, sm = _read(j.out / "eval.json"), _read(j.out / "summary.json")
        if ev is None:
            if (row := _row_of(j, recorded or {})) is not None:
                runs.append(row)
            continue
        row = {"name": j.name, "method": j.method, "iters": j.iters, "seed": j.seed,
               "overrides": j.overrides, "seconds": (sm or {}).get("seconds"),
               "commit": (sm or {}).get("commit")}  # fmt: skip
        if (sm or {}).get("seconds_complete") is False:  # resumed from an older checkpoint
            row["seconds_complete"] = False
        if j.variant is not None:
            row["variant"] = j.variant
        if j.eval_data is not None:  # tuning: the tuning split's score only, never the val's
            tune = _read(j.out / "eval_tune.json")
            if tune is None:
                continue
            row["miou_tune"] = tune["miou"]
        else:
            row["miou"], row["iou"] = ev["miou"], ev["iou"]
        runs.append(row)
    base = get_preset(preset).to_dict()
    return {"experiment": experiment, **provenance(preset), **(extra or {}), "base_config": base,
            "runs": runs}  # fmt: skip


def write_results(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, path)


# ---- the two experiments ---------------------------------------------------------------------
TUNE_GRID = {  # recipe values that are not fixed by the paper
    "ema_tc": (42, 168, 672),  # teacher time constant (iterations): 1/4x, 1x, 4x the derived one
    "pseudo_threshold": (0.968, 0.9),  # the paper's, and the old toy value
    "mix_start_frac": (0.0, 0.075),  # v1 (from the start), the follow-up's 3k of 40k
}


def tuning_jobs(out: Path, tune_data: Path, iters: int, seed: int = 0) -> list[Job]:
    jobs = []
    keys = list(TUNE_GRID)
    for values in itertools.product(*(TUNE_GRID[k] for k in keys)):
        g = dict(zip(keys, values))
        alpha = 1 - 1 / g["ema_tc"]
        ov = {"ema_alpha": f"{alpha:.8f}", "proto_momentum": f"{alpha:.8f}",
              "pseudo_threshold": g["pseudo_threshold"],
              "mix_start": int(round(g["mix_start_frac"] * iters))}  # fmt: skip
        name = f"tc{g['ema_tc']}_thr{g['pseudo_threshold']}_mix{g['mix_start_frac']}"
        jobs.append(Job(name, "selftrain", out / name, iters, seed, ov, eval_data=tune_data))
    return jobs


def convergence_jobs(out: Path, methods, lengths, seed: int = 0) -> list[Job]:
    """One run per method and length; the runs with G share their phase 0 (it does not depend
    on the run length)."""
    return [Job(f"{m}@{n}", m, out / m.replace("+", "_") / f"iters{n}", n, seed,
                cut_cache=out / "cut_cache")
            for m in methods for n in lengths]  # fmt: skip


def convergence_table(res: dict) -> dict[str, dict[int, float]]:
    """{method: {iters: mIoU}} of a convergence result."""
    table: dict[str, dict[int, float]] = {}
    for r in res["runs"]:
        table.setdefault(r["method"], {})[r["iters"]] = r["miou"]
    return {m: dict(sorted(v.items())) for m, v in table.items()}


def converged_length(table: dict[str, dict[int, float]], tol: float = 1.0) -> int | None:
    """The shortest L where every method's mIoU at 2L is within ``tol`` points of that at L."""
    lengths = sorted(set.intersection(*(set(v) for v in table.values()))) if table else []
    for n in lengths:
        if 2 * n in lengths and all(abs(v[2 * n] - v[n]) <= tol for v in table.values()):
            return n
    return None


def _check_lengths(preset: str, lengths) -> None:
    for n in lengths:
        scale_schedule(get_preset(preset), n).validate()


# ---- one loss at a time: CONFETI with each of its terms switched off ---------------------------
LOSS_ABLATION = {  # run name -> the override that removes one term of CONFETI's objective
    "no_psc": {"psc_weight": 0.0},  # G without the semantic (prototypical) consistency loss
    "no_cam": {"cam_weight": 0.0},  # no CAM loss (the CAM still weights the prototypes)
    "no_reg": {"reg_weight": 0.0},  # the contrast without its regulariser
    "no_target_contrast": {"target_contrast": False},  # no contrast on confident target pixels
}
# The other leave-one-out rows are ablation methods already: no contrast at all =
# selftrain+style, no G = selftrain+contrast, no self-training = style and contrast.


def loss_run_name(name: str, seed: int) -> str:
    """The run (folder and results row) of one ``LOSS_ABLATION`` entry on one seed: the entry's
    name on seed 0, ``NAME_seedS`` on the others, so that seeds never share a folder or a row."""
    return name if seed == 0 else f"{name}_seed{seed}"


def loss_jobs(out: Path, iters: int, seed: int = 0, names=None) -> list[Job]:
    """CONFETI once per ``LOSS_ABLATION`` entry (all of them by default), phase 0 shared."""
    names = list(names or LOSS_ABLATION)
    unknown = sorted(set(names) - set(LOSS_ABLATION))
    if unknown:
        raise SystemExit(f"--methods {unknown}: experiment losses knows {sorted(LOSS_ABLATION)}")
    runs = [(n, loss_run_name(n, seed)) for n in names]
    return [Job(r, "confeti", out / r, iters, seed, dict(LOSS_ABLATION[n]),
                cut_cache=out / "cut_cache") for n, r in runs]  # fmt: skip


# ---- the gap matrix: which alignment closes which gap ----------------------------------------
GAP_VARIANTS = {  # ToyStreets knobs of each variant (the source "game" is the same in all three)
    "appearance": {"content_gap": 0.0},  # the city looks different, its content is the game's
    "content": {"appearance_gap": 0.0},  # the city looks like the game, its content differs
    "both": {},  # the default benchmark
}
GAP_METHODS = ("source_only", "oracle", "fda", "style", "selftrain", "confeti")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"name:knob=value,knob=value"`` -> (name, {knob: value}); arguments of
    ``write_toystreets``, the gap's parts (``toystreets.gap_knobs``) included."""
    import inspect

    from .toystreets import GAP_KNOBS, write_toystreets

    name, _, body = spec.partition(":")
    params = set(inspect.signature(write_toystreets).parameters)
    allowed = (params | set(GAP_KNOBS)) - {"out", "progress", "workers", "knobs"}
    knobs = {}
    for item in filter(None, body.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k not in allowed:
            raise SystemExit(f"--variant {spec!r}: expected name:knob=value,... with knobs among "
                             f"{sorted(allowed)}")  # fmt: skip
        knobs[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    if not name:
        raise SystemExit(f"--variant {spec!r}: the variant needs a name before ':'")
    return name, knobs


def variant_data(root: Path, name: str, knobs: dict, default: Path) -> Path:
    """The data folder of a variant: ``default`` (the --data folder) when it has no knobs, else
    ``root/name``, generated once.

    Two lanes started together on a fresh machine both find ``root/name`` missing. Each writes
    into its own ``root/.name.tmp-<pid>`` and renames it to ``root/name`` when complete (one
    atomic step); a lane that finds the name taken by then drops its copy (same arguments, same
    bytes). So no lane ever reads a folder another is still writing, and an interrupted lane
    removes its copy. A ``root/name`` without ``toystreets.json`` (left by an older version) is
    unfinished: removed and rewritten."""
    if not knobs:
        return default
    from .toystreets import write_toystreets

    out = root / name
    if (out / "toystreets.json").exists():
        return out
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    print(f"generating ToyStreets variant {name} {knobs} -> {out}", flush=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_toystreets(tmp, progress=False, **knobs)
    except BaseException:  # Ctrl-C or an error: leave no half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(out)
    except OSError:  # another lane renamed its (identical) copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "toystreets.json").exists():
            raise
    return out


def gap_jobs(out: Path, variants: dict[str, Path], methods, iters: int, seed: int = 0) -> list[Job]:
    """One run per variant and method, each on its variant's data; phase 0 shared per data.
    Seed 0's run of method m on variant v is row ``v/m`` in folder ``out/v/m``; another seed's
    is ``v/m_seedS`` (``loss_run_name``), so a ``--seed`` call adds rows to the same file."""
    return [Job(f"{v}/{loss_run_name(m, seed)}", m,
                out / v / loss_run_name(m.replace("+", "_"), seed), iters, seed,
                cut_cache=out / "cut_cache", data=d, variant=v)
            for v, d in variants.items() for m in methods]  # fmt: skip


def file_methods(runs: list[dict], called=()) -> list[str]:
    """The methods a gap-matrix file lists: this call's (``called``) and every method it holds a
    run of, in ``GAP_METHODS`` order, others after (sorted). A call for some methods adds its
    runs to the file; it must not shrink the file's list to its own methods."""
    have = set(called) | {r["method"] for r in runs}
    return [m for m in GAP_METHODS if m in have] + sorted(have - set(GAP_METHODS))


def gap_seeds(res: dict) -> dict[str, dict[str, list[float]]]:
    """{variant: {method: [mIoU of each seed's run, by seed]}} of a gap-matrix result."""
    by: dict[str, dict[str, dict[int, float]]] = {}
    for r in res["runs"]:
        by.setdefault(r["variant"], {}).setdefault(r["method"], {})[r.get("seed", 0)] = r["miou"]
    return {v: {m: [x[s] for s in sorted(x)] for m, x in row.items()} for v, row in by.items()}


def gap_table(res: dict) -> dict[str, dict[str, float]]:
    """{variant: {method: mIoU}} of a gap-matrix result: the mean over the cell's seeds
    (most cells have one run; ``gap_seeds`` gives every run)."""
    return {v: {m: sum(x) / len(x) for m, x in row.items()} for v, row in gap_seeds(res).items()}


def gap_closed(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per variant, the share of the source-only -> oracle gap each method closes, in percent:
    100 (m - source_only) / (oracle - source_only). Variants without both ends are left out."""
    out = {}
    for v, row in table.items():
        if "source_only" in row and "oracle" in row and row["oracle"] > row["source_only"]:
            lo, hi = row["source_only"], row["oracle"]
            out[v] = {m: 100.0 * (x - lo) / (hi - lo) for m, x in row.items()}
    return out


def gap_markdown(table: dict[str, dict[str, float]], methods=GAP_METHODS,
                 seeds: dict[str, dict[str, list[float]]] | None = None) -> str:  # fmt: skip
    """The gap matrix as a markdown table: one row per variant, each cell "mIoU (gap closed)";
    "–" where the run has not finished. With ``seeds`` (``gap_seeds``), a cell of n > 1 runs
    reads "mean ± std (gap closed, n seeds)", the std over its seeds (ddof = 1)."""
    import statistics

    closed = gap_closed(table)
    cols = [m for m in methods if any(m in row for row in table.values())]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v, row in table.items():
        cells = []
        for m in cols:
            if m not in row:
                cells.append("–")
                continue
            runs = (seeds or {}).get(v, {}).get(m, [])
            g = closed.get(v, {}).get(m)
            notes = [] if g is None or m in ("source_only", "oracle") else [f"{g:.0f} %"]
            cell = f"{row[m]:.1f}"
            if len(runs) > 1:
                cell += f" ± {statistics.stdev(runs):.1f}"
                notes.append(f"{len(runs)} seeds")
            cells.append(cell + (f" ({', '.join(notes)})" if notes else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- grid: how much of each class the contrast's feature grid keeps (no training) ------------
GRID_PAIRS = (("confeti", "selftrain"), ("selftrain+contrast", "selftrain"),
              ("confeti", "selftrain+contrast"), ("selftrain+style", "selftrain"),
              ("confeti", "selftrain+style"))  # fmt: skip


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties get their average rank): Pearson's r of the ranks;
    nan (undefined) when either side has a single value for every class."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for u in np.unique(v):  # ties: the mean of their ranks
            r[v == u] = r[v == u].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:  # a constant has no ranking to correlate
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def feature_grid(cfg: Config) -> tuple[int, int]:
    """(h, w) of the segmentor's feature map for one training crop: the grid the contrast's
    labels are resized to (one forward pass of an untrained model on zeros)."""
    import dataclasses

    from .train import Segmentor

    model = Segmentor(dataclasses.replace(cfg, pretrained=None)).eval()
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 3, *cfg.crop_size))
    return tuple(logits.shape[-2:])


def class_survival(data: Path, cfg: Config, grid: tuple[int, int], n_source: int = 500) -> dict:
    """Per class: the share of its pixels that keep their label on ``grid`` (``grid_survival``),
    on city val (all images) and on the first ``n_source`` game images, both resized as the
    toy recipe trains (``target_resize``, ``source_resize``); and its share of city val pixels."""
    from .datasets import CityscapesDataset, GTA5Dataset
    from .labels import CLASSES, grid_survival

    def over(ds, n):
        kept = total = 0
        for i in range(min(n, len(ds))):
            k, t = grid_survival(ds[i][1][None].long(), grid)
            kept, total = kept + k, total + t
        return kept, total

    val = CityscapesDataset(Path(data) / "cityscapes", split="val", resize=cfg.target_resize,
                            crop_size=None, check=False)  # fmt: skip
    src = GTA5Dataset(Path(data) / "gta5", resize=cfg.source_resize, crop_size=None, check=False)
    kt, tt = over(val, len(val))
    ks, ts = over(src, n_source)
    share = tt.double() / tt.sum()
    return {
        c: {
            "survival_target": round(float(kt[i]) / max(int(tt[i]), 1), 3),
            "survival_source": round(float(ks[i]) / max(int(ts[i]), 1), 3),
            "share_target_percent": round(100 * float(share[i]), 3),
        }
        for i, c in enumerate(CLASSES)
    }


def generator_contrast(ckpt: Path, data: Path, n_source: int = 200, batch: int = 20) -> dict:
    """Per class, the mean ``stylize.class_contrast`` of the first ``n_source`` game images, of
    their translations by the generator G of the run ``ckpt``, and of city val (every image):
    how much of each class's contrast with its surroundings G keeps."""
    from .datasets import CityscapesDataset, GTA5Dataset
    from .labels import CLASSES
    from .runner import load_for_eval
    from .stylize import class_contrast

    state, cfg = load_for_eval(ckpt, "cpu")
    if state.style is None:
        raise SystemExit(f"experiment grid: --ckpt {ckpt}: the run has no generator G")
    src = GTA5Dataset(Path(data) / "gta5", resize=cfg.source_resize, crop_size=None, check=False)
    val = CityscapesDataset(Path(data) / "cityscapes", split="val", resize=cfg.target_resize,
                            crop_size=None, check=False)  # fmt: skip

    def mean_contrast(ds, n, translate):
        sums = counts = 0
        for i in range(0, min(n, len(ds)), batch):
            xs, ys = zip(*(ds[j] for j in range(i, min(i + batch, n, len(ds)))))
            x, y = torch.stack(xs), torch.stack(ys).long()
            if translate:
                with torch.no_grad():
                    x = state.style.translate(x)
            s_, c_ = class_contrast(x, y)
            sums, counts = sums + s_, counts + c_
        return [None if int(c) == 0 else round(float(v / c), 4) for v, c in zip(sums, counts)]

    a = mean_contrast(src, n_source, False)
    b = mean_contrast(src, n_source, True)
    t = mean_contrast(val, len(val), False)
    meta = json.loads((Path(ckpt).parent / "config.json").read_text())
    return {"ckpt": str(ckpt), "method": meta["method"], "seed": cfg.seed,
            "classes": {c: {"contrast_source": a[i], "contrast_translated": b[i],
                            "contrast_target": t[i]} for i, c in enumerate(CLASSES)}}  # fmt: skip


def _generator_key(g: dict) -> tuple:
    """Which run a measured generator is: method, seed and the run's folder (two runs of one
    method and seed, e.g. the loss-by-loss runs, are two generators)."""
    return g["method"], g["seed"], Path(g["ckpt"]).parent.name


def _generator_correlation(g: dict, diffs: dict) -> dict:
    """Spearman rho over the classes between a generator's per-class contrast ratios and each
    paired difference in ``diffs``: contrast in G(game) / in game (what G keeps), or / in the
    city (how visible a translated object is next to a real one)."""
    out = {}
    for ratio, ref in (("kept_of_source", "contrast_source"), ("of_target", "contrast_target")):
        r = {c: v["contrast_translated"] / v[ref] for c, v in g["classes"].items()
             if v[ref] and v["contrast_translated"] is not None}  # fmt: skip
        out[ratio] = {key: round(spearman([r[c] for c in r], [d["iou"][c] for c in r]), 3)
                      for key, d in diffs.items()}  # fmt: skip
    return out


def grid_experiment(data: Path, preset: str, ablation: Path, pairs=GRID_PAIRS,
                    ckpts=(), earlier=()) -> dict:  # fmt: skip
    """``experiment grid``: the contrast grid's class survival against the ablation's per-class
    paired differences (``ablation.paired_difference``, mean over the shared seeds). A positive
    Spearman rho: the classes the grid loses are the classes the method loses.

    ``ckpts``: measure the generator of each run (``generator_contrast``). ``earlier``: the
    ``generators`` of a previous result on the same data, kept (their correlations recomputed
    against this table) unless a checkpoint of the same method and seed is measured now."""
    import numpy as np

    from .ablation import paired_difference
    from .labels import CLASSES

    cfg = get_preset(preset)
    grid = feature_grid(cfg)
    classes = class_survival(data, cfg, grid)
    table = json.loads(Path(ablation).read_text())["methods"]
    diffs, rho = {}, {}
    for a, b in pairs:
        if a not in table or b not in table:
            continue
        try:
            d = paired_difference(table, a, b)
        except ValueError:  # no seed both have finished yet
            continue
        mean = {c: float(np.mean([v for v in d["iou"][c] if v is not None])) for c in CLASSES}
        key = f"{a} - {b}"
        diffs[key] = {"seeds": d["seeds"], "iou": {c: round(v, 2) for c, v in mean.items()}}
        rho[key] = {
            f"spearman_{dom}": round(
                spearman([classes[c][f"survival_{dom}"] for c in CLASSES], list(mean.values())), 3
            )
            for dom in ("target", "source")
        }
    measured = [generator_contrast(Path(ck), data) for ck in ckpts]
    now = {_generator_key(g) for g in measured}
    generators = [dict(g) for g in earlier if _generator_key(g) not in now] + measured
    for g in generators:
        g["correlation"] = _generator_correlation(g, diffs)
    return {"experiment": "grid", **provenance(preset), "toystreets": toystreets_id(data),
            "crop": list(cfg.crop_size), "grid": list(grid), "ablation": str(ablation),
            "classes": classes, "differences": diffs, "correlation": rho,
            "generators": generators}  # fmt: skip


# ---- the loss-by-loss table: every leave-one-out row of CONFETI on one seed -----------------
# (name, where its run lives, what it removes from CONFETI); "losses" rows come from
# results/losses.json, "ablation" rows from an ablation table (the same seed)
LOSS_ROWS = (
    ("confeti", "ablation", "nothing (CONFETI)"),
    ("no_psc", "losses", "L_psc: G's prototypical consistency"),
    ("no_cam", "losses", "L_cam: the CAM loss"),
    ("no_reg", "losses", "the contrast's regulariser"),
    ("no_target_contrast", "losses", "the contrast on target pixels"),
    ("selftrain+style", "ablation", "the whole contrast (and CAM, regulariser)"),
    ("selftrain+contrast", "ablation", "G (and L_psc)"),
    ("selftrain", "ablation", "G and the contrast"),
)


def loss_table(losses: dict, ablation: dict, seed: int = 0) -> dict[str, dict]:
    """CONFETI with one part removed at a time, on one seed, against CONFETI itself.

    ``losses``: an ``experiment losses`` results file; ``ablation``: an ablation table (its
    ``methods``) holding CONFETI and the rows that remove more (``LOSS_ROWS``). Every row is a
    run of the same seed, so it starts from CONFETI's segmentor weights and phase 0: the
    difference d = mIoU(row) - mIoU(CONFETI) is paired. Rows not run yet are left out.
    Returns {name: {"removed", "miou", "delta", "iou", "iou_delta"}} in ``LOSS_ROWS`` order.
    """
    from .labels import CLASSES

    methods = ablation.get("methods", ablation)
    runs = {r["name"]: r for r in losses.get("runs", []) if r.get("seed", 0) == seed}
    runs = {
        n: runs[loss_run_name(n, seed)] for n in LOSS_ABLATION if loss_run_name(n, seed) in runs
    }
    found = {}
    for name, where, removed in LOSS_ROWS:
        if where == "losses":
            r = runs.get(name)
        else:
            r = next((x for x in methods.get(name, {}).get("runs", []) if x["seed"] == seed), None)
        if r is not None:
            found[name] = {"removed": removed, "miou": r["miou"], "iou": r["iou"]}
    if "confeti" not in found:
        raise ValueError(f"loss_table: the ablation table has no CONFETI run of seed {seed}")
    ref = found["confeti"]
    for row in found.values():
        row["delta"] = round(row["miou"] - ref["miou"], 2)
        row["iou_delta"] = {
            c: None if row["iou"].get(c) is None or ref["iou"].get(c) is None
            else round(row["iou"][c] - ref["iou"][c], 2)
            for c in CLASSES
        }  # fmt: skip
    return found


def loss_seeds(losses: dict, ablation: dict, against=("confeti", "selftrain")) -> dict:
    """Every loss-by-loss run over the seeds it has, paired with the ablation's runs of its seed.

    For a row r of ``LOSS_ABLATION`` run on seeds S, and each method b in ``against``:
    d_b(s) = mIoU_r(s) - mIoU_b(s) for the s in S where b has a run (``paired_difference``),
    and their mean. Returns {name: {"seeds": [...], "miou": [...], "minus": {b: [d_b(s)...]},
    "mean": {b: mean d_b or None}}} for the rows run on at least one seed (``LOSS_ROWS`` order).
    """
    from .ablation import paired_difference

    methods = ablation.get("methods", ablation)
    out = {}
    for name in (n for n, where, _ in LOSS_ROWS if where == "losses"):
        runs = sorted((r for r in losses.get("runs", [])
                       if r["name"] == loss_run_name(name, r.get("seed", 0))),
                      key=lambda r: r["seed"])  # fmt: skip
        if not runs:
            continue
        row = {"seeds": [r["seed"] for r in runs], "miou": [r["miou"] for r in runs],
               "minus": {}, "mean": {}}  # fmt: skip
        for b in against:
            pair = {name: {"runs": runs}, b: methods.get(b, {"runs": []})}
            try:
                d = paired_difference(pair, name, b)["miou"]
            except ValueError:  # b has no run of these seeds
                d = []
            row["minus"][b] = d
            row["mean"][b] = round(sum(d) / len(d), 2) if d else None
        out[name] = row
    return out


def loss_seeds_markdown(rows: dict) -> str:
    """``loss_seeds`` as a table: one line per loss run, its seeds, and the paired differences."""
    against = next(iter(rows.values()))["minus"] if rows else {}
    head = (
        "| run | seeds | mIoU | " + " | ".join(f"− {b} (per seed) | mean" for b in against) + " |"
    )
    lines = [head, "|---|---|---|" + "---|---|" * len(against)]
    for name, r in rows.items():
        cells = [
            f"{name}",
            ", ".join(map(str, r["seeds"])),
            ", ".join(f"{m:.2f}" for m in r["miou"]),
        ]
        for b in against:
            cells.append(", ".join(f"{d:+.2f}" for d in r["minus"][b]) or "–")
            cells.append("–" if r["mean"][b] is None else f"{r['mean'][b]:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_noise(ablation: dict, a: str = "confeti", others=("selftrain", "selftrain+style",
                 "selftrain+contrast")) -> float | None:  # fmt: skip
    """How much a one-seed paired difference moves from seed to seed: the standard deviation
    over seeds of d_s = mIoU_a(s) - mIoU_b(s), pooled (root mean square) over the pairs (a, b)
    with at least three shared seeds. None if no pair has three."""
    from .ablation import paired_difference

    methods = ablation.get("methods", ablation)
    variances = []
    for b in others:
        if a not in methods or b not in methods:
            continue
        d = paired_difference(methods, a, b)["miou"]
        if len(d) >= 3:
            m = sum(d) / len(d)
            variances.append(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return None if not variances else round((sum(variances) / len(variances)) ** 0.5, 2)


def loss_markdown(rows: dict[str, dict], noise: float | None = None) -> str:
    """The loss-by-loss table: mIoU and its paired difference to CONFETI, then per class."""
    from .labels import CLASSES, SHORT_NAMES

    lines = ["| run | removed from CONFETI | mIoU | − CONFETI |", "|---|---|---|---|"]
    for name, r in rows.items():
        d = "–" if name == "confeti" else f"{r['delta']:+.2f}"
        lines.append(f"| {name} | {r['removed']} | {r['miou']:.2f} | {d} |")
    if noise is not None:
        lines.append(f"\nSeed-to-seed std of a one-seed paired difference: {noise:.2f} points.")
    lines += ["", "| run − CONFETI | " + " | ".join(SHORT_NAMES) + " |",
              "|---" * (len(CLASSES) + 1) + "|"]  # fmt: skip
    for name, r in rows.items():
        if name == "confeti":
            continue
        cells = ["–" if r["iou_delta"][c] is None else f"{r['iou_delta'][c]:+.0f}" for c in CLASSES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
