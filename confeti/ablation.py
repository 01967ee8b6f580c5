"""The ablation: every method x K seeds on one preset, as a table and a figure.

``python -m confeti ablation --preset toy --data DIR --seeds 3 --out DIR`` writes
``DIR/<method>/seed<k>/`` (one ordinary run each; finished runs are reused, interrupted ones
resumed), ``results.json``, ``results.md`` (mIoU mean ± std and per-class IoU) and
``ablation.png``.
Taught in notebooks/04_joint_training.ipynb.

With ``--jobs N`` (default: min(cores, 2)) the runs go to N processes of ``cores // N`` threads
each, the longest first (``experiments.COST``); their output is in ``DIR/logs/``. Every method with G
shares its seed's CUT pre-training (phase 0) through ``DIR/cut_cache`` (``cutcache``): the first
run of a seed trains and stores it, the others load it; a run whose phase 0 another job is still
training starts after the runs that need no wait. Each run is the run ``jobs=1`` gives with the
same thread count (tests/test_ablation.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import METHODS, Config
from .experiments import COST, provenance, toystreets_id, write_results
from .labels import CLASSES, SHORT_NAMES

# every method of the CLI, the oracle (the upper bound) last
ABLATION_METHODS = tuple(m for m in METHODS if m != "oracle") + ("oracle",)


def default_jobs() -> int:
    """Parallel runs: one per core, at most 2 (the toy runs' memory and the 2-core laptop)."""
    return max(1, min(os.cpu_count() or 1, 2))


def run_dir(out: str | Path, method: str, seed: int) -> Path:
    return Path(out) / method.replace("+", "_") / f"seed{seed}"


# Student's t quantile t_{0.975, dof} for the 95 % interval of a mean of dof + 1 seeds
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval95(values) -> tuple[float, float] | None:
    """The 95 % confidence interval of the mean of ``values`` (one per seed), assuming they are
    normal: mean ± t_{0.975, n-1} · s / √n with s the sample std (ddof = 1). None below 2 values."""
    x = np.asarray(values, float)
    n = len(x)
    if n < 2:
        return None
    t = _T975.get(n - 1, 1.96)  # 1.96: the normal limit, within 2 % of t from 60 seeds on
    half = t * x.std(ddof=1) / np.sqrt(n)
    return float(x.mean() - half), float(x.mean() + half)


def gap_closed(res: dict) -> dict[str, float]:
    """Per method, the share of the source-only -> oracle gap its mean closes, in percent:
    100 (m - source_only) / (oracle - source_only); empty without both ends."""
    if "source_only" not in res or "oracle" not in res:
        return {}
    lo, hi = res["source_only"]["miou_mean"], res["oracle"]["miou_mean"]
    if hi <= lo:
        return {}
    return {m: round(100.0 * (r["miou_mean"] - lo) / (hi - lo), 1) for m, r in res.items()}


def recorded_runs(path, cfg: Config, data) -> dict[tuple[str, int], dict]:
    """The runs a committed table (``save_results``' file) already holds, {(method, seed): run},
    when it was made with this preset, run length and data (name, ToyStreets version and seed);
    empty otherwise. They count as done: a new machine, whose ``runs/`` is empty, trains only
    what the table lacks instead of repeating it."""
    path = Path(path)
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    bench = toystreets_id(data) or {}
    same = (
        old.get("preset") == cfg.preset
        and old.get("iters") == cfg.iters
        and old.get("data") == Path(data).name
        and old.get("toystreets_version") == bench.get("version")
        and old.get("toystreets_seed") == bench.get("seed")
    )
    if not same:
        return {}
    return {(m, r["seed"]): r for m, v in old.get("methods", {}).items() for r in v["runs"]}


def collect(out: str | Path, methods=ABLATION_METHODS, seeds: int = 3, recorded=None) -> dict:
    """Read every finished run's eval.json/summary.json into {method: {...}}; a run missing on
    disk but in ``recorded`` (``recorded_runs``) is taken from there."""
    recorded = recorded or {}
    res = {}
    for m in methods:
        runs = []
        for s in range(seeds):
            d = run_dir(out, m, s)
            if not (d / "eval.json").exists() and (m, s) in recorded:
                runs.append(dict(recorded[(m, s)]))
            elif (d / "eval.json").exists():
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
        # a class no run scored (absent from its val split) has no mean: nan, written as None
        scored = {c: [r["iou"][c] for r in runs if r["iou"].get(c) is not None] for c in CLASSES}
        per_class = {c: float(np.mean(v)) if v else np.nan for c, v in scored.items()}
        res[m] = {
            "miou_mean": round(float(mious.mean()), 2),
            "miou_std": round(float(mious.std(ddof=1)) if len(mious) > 1 else 0.0, 2),
            "seeds": len(runs),
            "runs": runs,
            "iou_mean": {c: (None if np.isnan(v) else round(v, 2)) for c, v in per_class.items()},
            "seconds_mean": round(float(np.mean([r["seconds"] or 0 for r in runs])), 1),
            "ci95": None if (ci := interval95(mious)) is None else [round(v, 2) for v in ci],
        }
    for m, g in gap_closed(res).items():
        res[m]["gap_closed_percent"] = g
    return res


def _run_mious(r: dict) -> np.ndarray | None:
    """The mIoU of each run of a table row, unrounded (None for a row without its runs). The
    row's ``miou_mean``, ``miou_std`` and ``ci95`` are stored at two decimals; a table printed
    from them at one would round twice (std 0.4456 stored as 0.45 prints as 0.5)."""
    return np.array([x["miou"] for x in r["runs"]]) if r.get("runs") else None


def mean_std(r: dict) -> str:
    """Mean ± std over the seeds, "45.9 ± 0.6"; one seed has no spread: "45.4 (1 seed)".
    From the runs where the row has them (``_run_mious``: rounded once)."""
    mious = _run_mious(r)
    mean = r["miou_mean"] if mious is None else float(mious.mean())
    if r["seeds"] < 2:
        return f"{mean:.1f} (1 seed)"
    std = r["miou_std"] if mious is None else float(mious.std(ddof=1))
    return f"{mean:.1f} ± {std:.1f}"


def markdown_table(res: dict) -> str:
    """mIoU mean ± std per method, then per-class IoU means."""
    short = SHORT_NAMES  # t.light, t.sign, ... (a plain [:5] made two 'traff' columns)
    lines = [
        "| method | mIoU (mean ± std) | 95 % interval | gap closed | seeds | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in res.items():
        mious = _run_mious(r)  # rounded once, as in mean_std
        ci = r.get("ci95") if mious is None else interval95(mious)
        ci_s = "–" if ci is None else f"{ci[0]:.1f} – {ci[1]:.1f}"
        g = r.get("gap_closed_percent")
        g_s = "–" if g is None else f"{g:.0f} %"
        lines.append(
            f"| {m} | {mean_std(r)} | {ci_s} | {g_s} | {r['seeds']} | {r['seconds_mean']:.0f} |"
        )
    lines += ["", "| method | " + " | ".join(short) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for m, r in res.items():
        vals = ["–" if r["iou_mean"][c] is None else f"{r['iou_mean'][c]:.0f}" for c in CLASSES]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def runs_markdown(res: dict) -> str:
    """Every run's mIoU, one column per seed (the table the means and intervals come from)."""
    seeds = sorted({r["seed"] for v in res.values() for r in v["runs"]})
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (len(seeds) + 1) + "|"]  # fmt: skip
    for m, v in res.items():
        by_seed = {r["seed"]: r["miou"] for r in v["runs"]}
        cells = ["–" if s not in by_seed else f"{by_seed[s]:.2f}" for s in seeds]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_difference(res: dict, a: str, b: str) -> dict:
    """Method ``a`` minus method ``b``, seed by seed, on the seeds both have.

    A paired difference removes what a seed does to both runs (both start from the same
    segmentor weights), so it is what says whether ``a`` beats ``b``:
    d_s = mIoU_a(s) - mIoU_b(s), and per class d_s,c = IoU_a,c(s) - IoU_b,c(s).
    Returns {"seeds": [s, ...], "miou": [d_s, ...], "iou": {class: [d_s,c, ...]}} (a class's
    entry is None for a seed where either run has no IoU for it).
    """
    for m in (a, b):
        if m not in res:
            raise KeyError(f"paired_difference: method {m!r} is not in the table ({sorted(res)})")
    ra = {r["seed"]: r for r in res[a]["runs"]}
    rb = {r["seed"]: r for r in res[b]["runs"]}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise ValueError(f"paired_difference: {a!r} and {b!r} share no seed")

    def diff(s, c):
        x, y = ra[s]["iou"].get(c), rb[s]["iou"].get(c)
        return None if x is None or y is None else round(x - y, 2)

    return {
        "seeds": seeds,
        "miou": [round(ra[s]["miou"] - rb[s]["miou"], 2) for s in seeds],
        "iou": {c: [diff(s, c) for s in seeds] for c in CLASSES},
    }


def rank_agreement(a: dict, b: dict, seed: int | None = None) -> dict:
    """How alike two tables (``collect``'s; e.g. two ToyStreets) order the methods they share.

    A method's score is its mean mIoU over its runs, or the mIoU of the run of ``seed`` (methods
    without that run are left out). Kendall's tau over the pairs of methods:
    tau = (concordant - discordant) / (n (n - 1) / 2), 1 = the same order, -1 = reversed;
    ``swapped`` lists the pairs the two tables order differently (ties count as neither).
    """

    def scores(t):
        out = {}
        for m, v in t.items():
            by_seed = {r["seed"]: r["miou"] for r in v["runs"]}
            if seed is None and by_seed:
                out[m] = float(np.mean(list(by_seed.values())))
            elif seed in by_seed:
                out[m] = by_seed[seed]
        return out

    sa, sb = scores(a), scores(b)
    common = sorted(set(sa) & set(sb), key=lambda m: -sa[m])
    if len(common) < 2:
        raise ValueError(
            f"rank_agreement: the tables share {len(common)} method(s) with runs; need 2"
        )

    def rank(s):
        order = sorted(common, key=lambda m: -s[m])
        return {m: order.index(m) + 1 for m in common}

    conc = disc = 0
    swapped = []
    for i, m in enumerate(common):
        for n in common[i + 1 :]:
            sign = (sa[m] - sa[n]) * (sb[m] - sb[n])
            conc, disc = conc + (sign > 0), disc + (sign < 0)
            if sign < 0:
                swapped.append([m, n])
    pairs = len(common) * (len(common) - 1) / 2
    return {"methods": common, "score_a": {m: round(sa[m], 2) for m in common},
            "score_b": {m: round(sb[m], 2) for m in common}, "rank_a": rank(sa),
            "rank_b": rank(sb), "kendall_tau": round((conc - disc) / pairs, 3),
            "swapped": swapped}  # fmt: skip


def ranking_markdown(agr: dict, name_a: str = "a", name_b: str = "b") -> str:
    """``rank_agreement``'s result as a table (ordered by ``name_a``) and a line with tau."""
    lines = [f"| method | {name_a} | rank | {name_b} | rank |", "|---|---|---|---|---|"]
    for m in agr["methods"]:
        lines.append(f"| {m} | {agr['score_a'][m]:.2f} | {agr['rank_a'][m]} | "
                     f"{agr['score_b'][m]:.2f} | {agr['rank_b'][m]} |")  # fmt: skip
    sw = ", ".join(f"{m} / {n}" for m, n in agr["swapped"]) or "none"
    lines += ["", f"Kendall's tau = {agr['kendall_tau']:+.2f}; pairs ordered differently: {sw}"]
    return "\n".join(lines) + "\n"


def save_results(path, res: dict, cfg: Config, data, seeds: int) -> None:
    """``res`` (``collect``'s table) with its provenance, written atomically to ``path``."""
    meta = Path(data) / "toystreets.json"
    bench = json.loads(meta.read_text()) if meta.is_file() else {}
    done = {m: r["seeds"] for m, r in res.items()}
    write_results({"experiment": "ablation", **provenance(cfg.preset), "iters": cfg.iters,
                "seeds_planned": seeds, "seeds_done": done, "data": Path(data).name,
                "toystreets_version": bench.get("version"), "toystreets_seed": bench.get("seed"),
                "methods": res}, Path(path))  # fmt: skip


def _pending(out: Path, methods, seeds: int, recorded=()) -> list[tuple[str, int]]:
    """Runs without eval.json and not in ``recorded``, the longest first (then in the given
    order)."""
    todo = [(m, s) for m in methods for s in range(seeds) if (m, s) not in recorded]
    todo = [(m, s) for m, s in todo if not (run_dir(out, m, s) / "eval.json").exists()]
    return sorted(todo, key=lambda r: -COST.get(r[0], 1.0))  # stable: ties keep the order


def _phase0_file(cfg: Config, method: str, seed: int, data, out: Path, device, threads):
    """The cut_cache file a run needs (None for a method without G or phase 0)."""
    from .cutcache import cache_path
    from .runner import resolve_device
    from .train import parts_of

    if not parts_of(method).style or cfg.style_pretrain_iters <= 0:
        return None
    c = dataclasses.replace(cfg, seed=seed)
    return cache_path(out / "cut_cache", c, data, resolve_device(device), threads)


def _worker(spec_json: str) -> None:
    """One run in a child process (``python -m confeti.ablation SPEC``)."""
    import torch

    from .runner import train

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    d = Path(spec["out"])
    train(
        Config.from_dict(spec["config"]),
        spec["method"],
        spec["data"],
        d,
        resume=(d / "config.json").exists(),
        device=spec["device"],
        progress=False,
        cut_cache=spec["cut_cache"],
    )


def _run_parallel(cfg, data, out: Path, todo, device, jobs: int, threads: int, progress) -> None:
    """Start up to ``jobs`` child processes over ``todo`` (longest first); a run whose phase 0
    another running job is training waits until no run without that wait is left."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    todo = list(todo)
    running: dict = {}  # Popen -> (method, seed, phase-0 file being trained or None, log, t0)
    failed = []

    def start(m: str, s: int) -> None:
        d = run_dir(out, m, s)
        cut = _phase0_file(cfg, m, s, data, out, device, threads)
        fills = cut if cut is not None and not cut.exists() else None
        spec = {
            "config": dataclasses.replace(cfg, seed=s).to_dict(),
            "method": m,
            "data": str(data),
            "out": str(d),
            "device": device,
            "threads": threads,
            "cut_cache": str(out / "cut_cache"),
        }
        log = logs / f"{m.replace('+', '_')}_seed{s}.log"
        with log.open("a") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "confeti.ablation", json.dumps(spec)],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        running[proc] = (m, s, fills, log, time.time())
        if progress:
            print(f"[ablation] start {m} seed {s} -> {d} (log {log})", flush=True)

    def pick():
        busy = {v[2] for v in running.values() if v[2] is not None}
        for i, (m, s) in enumerate(todo):
            if _phase0_file(cfg, m, s, data, out, device, threads) not in busy:
                return todo.pop(i)
        return todo.pop(0)  # every run left waits for a phase 0: it blocks on the cache lock

    try:
        while todo or running:
            while todo and len(running) < jobs:
                start(*pick())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                m, s, _, log, t_start = running.pop(proc)
                if proc.returncode != 0:
                    failed.append(f"{m} seed {s} (exit {proc.returncode}, see {log})")
                if progress:
                    state = "done" if proc.returncode == 0 else "FAILED"
                    print(
                        f"[ablation] {state} {m} seed {s} in {time.time() - t_start:.0f} s",
                        flush=True,
                    )
    except BaseException:  # Ctrl-C or a kill: let every run save its checkpoint, then stop
        deadline = time.time() + 5  # a terminal's Ctrl-C reached the runs too: they are saving
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.terminate()  # SIGTERM: the run finishes its iteration and checkpoints
        for proc in running:
            proc.wait()
        raise
    if failed:
        raise RuntimeError("ablation runs failed: " + "; ".join(failed))


def run_ablation(
    cfg: Config,
    data,
    out,
    seeds: int = 3,
    methods=None,
    device=None,
    progress: bool = True,
    jobs: int | None = None,
    threads: int | None = None,
    results=None,
    collect_only: bool = False,
) -> dict:
    """Train (or reuse) every method x seed, then write results.json, results.md, ablation.png.

    ``jobs`` > 1: that many child processes of ``threads`` threads each (default: cores / jobs);
    ``jobs=1``: the runs one after another in this process (``threads``: its thread count while
    they run). Either way the methods with G share each seed's phase 0 through ``out/cut_cache``.
    ``results``: also write the table, with where it came from (commit, torch, machine, date,
    the runs' data folder), to this file (the committed copy under ``results/``).
    ``collect_only``: train nothing, only collect the finished runs.
    The runs ``results`` already holds for this preset, length and data (``recorded_runs``)
    are not trained again: they stay in the table as recorded.
    """
    from .plots import plot_ablation, save_figure
    from .runner import train

    methods = list(methods or ABLATION_METHODS)
    out = Path(out)
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    t0 = time.time()
    recorded = {} if results is None else recorded_runs(results, cfg, data)
    todo = [] if collect_only else _pending(out, methods, seeds, recorded)
    if jobs > 1 and len(todo) > 1:
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        _run_parallel(cfg, data, out, todo, device, jobs, threads, progress)
    else:
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for m, s in todo:
                d = run_dir(out, m, s)
                if progress:
                    print(f"[ablation] {m} seed {s} -> {d}", flush=True)
                c = dataclasses.replace(cfg, seed=s)
                resume = (d / "config.json").exists()
                train(c, m, data, d, resume=resume, device=device, progress=progress,
                      cut_cache=out / "cut_cache")  # fmt: skip
        finally:
            torch.set_num_threads(before)
    res = collect(out, methods, seeds, recorded)
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
    if results is not None:
        # The file keeps every run it holds that this call did not make: other methods, and
        # seeds beyond this call's ``seeds`` (a `--seeds 1` call must not drop seeds 1 and 2).
        # It is read again now, not at the start: another process may have added runs since.
        recorded = recorded_runs(results, cfg, data)
        kept = {m for m, _ in recorded} | set(methods)
        n = max([seeds] + [s + 1 for _, s in recorded])
        everything = collect(out, [m for m in ABLATION_METHODS if m in kept], n, recorded)
        save_results(results, everything, cfg, data, n)
    if progress:
        print(markdown_table(res))
    return res


if __name__ == "__main__":  # a child run of _run_parallel
    _worker(sys.argv[1])
