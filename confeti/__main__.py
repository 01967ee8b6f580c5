"""Command line: ``python -m confeti {data,train,eval,ablation,figures,bench,gpu-check,reproduce}``
(``data toy`` generates ToyStreets, ``data check`` verifies a data folder).

The only place that reads ``sys.argv``; every command calls a package function.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path

from .config import METHODS, PRESETS, Config, field_names, get_preset, scale_schedule
from .toystreets import GAP_KNOBS, WITHIN_CLASS, knob_top


def _parse_value(name: str, raw: str):
    """Turn ``--set name=raw`` into the field's type (bool, int, float, str, tuple, None)."""
    ftype = {f.name: f.type for f in dataclasses.fields(Config)}[name]
    hints = typing.get_type_hints(Config)[name]
    if raw.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(hints)
    args = [a for a in typing.get_args(hints) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and args:
        hints = args[0]
        origin = typing.get_origin(hints)
    try:
        if hints is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if origin is tuple:
            return tuple(int(v) for v in raw.replace("x", ",").split(",") if v)
        if hints in (int, float, str):
            return hints(raw)
    except ValueError:
        raise SystemExit(f"--set {name}={raw}: expected a value of type {ftype}") from None
    return raw


def build_config(preset: str, iters=None, seed=None, overrides=()) -> Config:
    """Preset + ``--iters`` (schedule scaled to it) + ``--seed`` + ``--set key=value`` overrides."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = get_preset(preset)
    if iters is not None:
        cfg = scale_schedule(cfg, iters)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        if key not in field_names():
            close = difflib.get_close_matches(key, field_names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(
                f"--set {key}: no such config field.{hint} Valid fields: {', '.join(field_names())}"
            )
        changes[key] = _parse_value(key, raw)
    try:
        return dataclasses.replace(cfg, **changes).validate()
    except ValueError as e:
        raise SystemExit(f"invalid configuration: {e}") from None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--iters", type=int, help="iterations (gates and LR warm-up scale with it)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any Config field, e.g. --set batch_size=2",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _cmd_data(a) -> None:
    if a.name == "check":
        return _cmd_data_check(a)
    from .toystreets import write_toystreets

    if a.name != "toy":
        raise SystemExit(
            f"unknown data command {a.name!r}: 'toy' generates ToyStreets (--out DIR), "
            "'check' verifies a data folder (--data DIR)"
        )
    if a.out is None:
        raise SystemExit("data toy: --out DIR is required (where to write ToyStreets)")
    summary = write_toystreets(
        a.out,
        n_source=a.n_source,
        n_target_train=a.n_target_train,
        n_target_val=a.n_target_val,
        height=a.height,
        width=a.width,
        seed=a.seed,
        appearance_gap=a.appearance_gap,
        content_gap=a.content_gap,
        **{k: getattr(a, k) for k in GAP_KNOBS if getattr(a, k) is not None},
    )
    print(json.dumps(summary, indent=2, default=str))


def _cmd_data_check(a) -> None:
    from .datacheck import check_folder

    if a.data is None:
        raise SystemExit("data check: --data DIR is required (the folder holding gta5/, cityscapes/ ...)")  # fmt: skip
    reports = check_folder(a.data)
    for r in reports:
        print(r.describe())
    bad = sum(len(r.bad) for r in reports)
    print(f"{sum(r.pairs for r in reports)} pairs checked, {bad} damaged file(s)")
    if bad:
        sys.exit(1)


def _cmd_train(a) -> None:
    from .runner import train

    if a.method not in METHODS:
        raise SystemExit(f"unknown method {a.method!r}; choose one of {', '.join(METHODS)}")
    cfg = build_config(a.preset, a.iters, a.seed, a.set)
    train(cfg, a.method, a.data, a.out, resume=a.resume, overwrite=a.overwrite, device=a.device,
          data_check=not a.skip_data_check, cut_cache=a.cut_cache)  # fmt: skip


def _cmd_eval(a) -> None:
    from .datasets import CityscapesDataset, GTA5Dataset
    from .metrics import format_table
    from .runner import evaluate_model, load_for_eval

    state, cfg = load_for_eval(a.ckpt, a.device)
    if a.bn_stats is not None:
        from .bnstats import recompute_bn_stats
        from .runner import BatchStream, build_data

        data = build_data(cfg, a.data, "source_only", data_check=False, progress=False)
        key = {"source": "x_s", "target": "x_t"}[a.bn_stats]
        dev = next(state.parameters()).device
        stream = BatchStream(data, cfg, 0, a.bn_batches, rank=0, oracle=False)
        n = recompute_bn_stats(state.student, (b[key].to(dev) for b in stream))
        print(f"BatchNorm statistics re-estimated on {n} batches of {a.bn_stats} crops")
    if a.domain == "source":  # e.g. a held-out game set: python -m confeti data toy --seed 1
        ds = GTA5Dataset(Path(a.data) / "gta5", resize=None, crop_size=None)
        cfg = dataclasses.replace(cfg, target_resize=cfg.source_resize)
    else:
        ds = CityscapesDataset(
            Path(a.data) / "cityscapes", split=a.split, resize=None, crop_size=None
        )
    res = evaluate_model(
        state.student, ds, cfg, next(state.parameters()).device, max_images=a.max_images
    )
    res["split"] = a.split if a.domain == "target" else "source"
    # the run's own eval.json is the target val score; other sets get their own file
    name = "eval.json" if res["split"] == "val" else f"eval_{res['split']}.json"
    if a.bn_stats is not None:  # never the run's own eval.json
        res["bn_stats"], res["bn_batches"] = a.bn_stats, a.bn_batches
        name = name.replace(".json", f"_bn_{a.bn_stats}.json")
    out = Path(a.out) if a.out else Path(a.ckpt).parent / name
    out.write_text(json.dumps(res, indent=2))
    print(format_table(res))
    print(f"wrote {out}")


def _cmd_ablation(a) -> None:
    from .ablation import run_ablation

    cfg = build_config(a.preset, a.iters, None, a.set)
    if a.compare is not None and not Path(a.compare).is_file():
        raise SystemExit(f"ablation: --compare {a.compare}: no such file (an ablation table)")
    res = run_ablation(cfg, a.data, a.out, seeds=a.seeds, methods=a.methods, device=a.device,
                       jobs=a.jobs, threads=a.threads, results=a.results,
                       collect_only=a.collect_only)  # fmt: skip
    if a.compare is not None:  # does the ranking hold on another benchmark (or another table)?
        from .ablation import rank_agreement, ranking_markdown

        other = json.loads(Path(a.compare).read_text())["methods"]
        # With --results, rank every run that file holds, not only this call's methods (one
        # method per call, as lanes run them, would leave nothing to rank).
        ours = json.loads(Path(a.results).read_text())["methods"] if a.results else res
        try:
            print(ranking_markdown(rank_agreement(other, ours), Path(a.compare).name,
                                   Path(a.results).name if a.results else "this run"))  # fmt: skip
        except ValueError as e:  # the runs are trained and saved: say so, do not fail
            print(f"ablation: --compare: nothing to rank yet ({e})")


def _cmd_figures(a) -> None:
    from .figures import write_figures

    write_figures(a.runs, a.data, a.out, ablation=a.ablation)


def _cmd_bench(a) -> None:
    from .bench import run_bench

    cfg = build_config(a.preset, None, None, a.set)
    if a.memory:  # an estimate of one iteration's memory, traced op by op (confeti/memory.py)
        from .memory import memory_report

        res = memory_report(cfg, methods=a.methods, device=a.device, dtype=a.dtype)
    else:
        res = run_bench(cfg, device=a.device, repeats=a.repeats, methods=a.methods, data=a.data)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


def _cmd_gpu_check(a) -> None:
    from .gpucheck import gpu_check

    res = gpu_check(a.out, tiny=a.tiny, method=a.method, device=a.device, iters=a.iters)
    print(json.dumps({k: res[k] for k in ("ok", "total_sec")}, indent=2))
    print(f"wrote {Path(a.out) / 'gpu_check.json'}")


def _grid(a, results: Path) -> None:
    from . import experiments as ex
    from .labels import CLASSES, SHORT_NAMES

    if a.data is None or a.ablation is None:
        raise SystemExit("experiment grid: --data (a ToyStreets folder) and --ablation "
                         "(an ablation table, e.g. results/ablation_3seeds.json) are required")  # fmt: skip
    if not Path(a.ablation).is_file():
        raise SystemExit(f"experiment grid: --ablation {a.ablation}: no such file")
    earlier = []  # generators an earlier call measured on the same data (their runs may be gone)
    if Path(results).is_file():
        old = json.loads(Path(results).read_text())
        if old.get("experiment") == "grid" and old.get("toystreets") == ex.toystreets_id(a.data):
            earlier = old.get("generators", [])
    res = ex.grid_experiment(Path(a.data), a.preset, Path(a.ablation), ckpts=a.ckpt or (),
                             earlier=earlier)  # fmt: skip
    ex.write_results(res, results)
    keys = list(res["differences"])
    print(f"grid {res['grid']} for crops {res['crop']}: share of each class's pixels kept")
    print("| class | kept (city val) | kept (game) | " + " | ".join(keys) + " |")
    print("|---" * (3 + len(keys)) + "|")
    for c, short in zip(CLASSES, SHORT_NAMES):
        k = res["classes"][c]
        d = " | ".join(f"{res['differences'][key]['iou'][c]:+.1f}" for key in keys)
        print(f"| {short} | {k['survival_target']:.2f} | {k['survival_source']:.2f} | {d} |")
    for key, r in res["correlation"].items():
        print(f"Spearman rho (kept on city val, {key}): {r['spearman_target']:+.2f}; "
              f"(kept on game): {r['spearman_source']:+.2f}")  # fmt: skip
    for g in res["generators"]:
        print(f"generator of {g['ckpt']} ({g['method']}, seed {g['seed']}): mean contrast of a "
              "class with its 2-pixel surroundings, game -> G(game), city val")  # fmt: skip
        for c, short in zip(CLASSES, SHORT_NAMES):
            v = g["classes"][c]
            cells = ["–" if v[k] is None else f"{v[k]:.3f}"
                     for k in ("contrast_source", "contrast_translated", "contrast_target")]  # fmt: skip
            print(f"| {short} | " + " | ".join(cells) + " |")
        for ratio, what in (("kept_of_source", "G(game) / game"), ("of_target", "G(game) / city")):
            for key, r in g["correlation"][ratio].items():
                print(f"Spearman rho (contrast {what}, {key}): {r:+.2f}")
    print(f"-> {results}")


def _cmd_experiment(a) -> None:
    from . import experiments as ex

    results = Path(a.results)
    if a.name == "plot":  # the convergence figure from a results file, without any training
        return _plot_convergence(results, a.figure)
    if a.name == "grid":  # no training: labels and a committed ablation table
        return _grid(a, results)
    if a.data is None or a.out is None:
        raise SystemExit(f"experiment {a.name}: --data and --out are required")
    data, out = Path(a.data), Path(a.out)
    if a.name == "tune":
        if a.tune_data is None:
            raise SystemExit("experiment tune: --tune-data DIR is required (the tuning split)")
        jobs = ex.tuning_jobs(out, Path(a.tune_data), a.iters or 1600, a.seed)
        extra = {"grid": ex.TUNE_GRID, "method": "selftrain", "iters": a.iters or 1600,
                 "tuning_split": str(a.tune_data)}  # fmt: skip
    elif a.name == "convergence":
        lengths = a.lengths or [800, 1600, 3200, 6400]
        ex._check_lengths(a.preset, lengths)
        methods = a.methods or ["source_only", "oracle", "selftrain", "style", "confeti"]
        jobs = ex.convergence_jobs(out, methods, lengths, a.seed)
        extra = {"lengths": lengths, "methods": methods}
    elif a.name == "losses":
        from .config import TOY_ITERS

        jobs = ex.loss_jobs(out, a.iters or TOY_ITERS, a.seed, a.methods)
        extra = {"iters": a.iters or TOY_ITERS, "variants": ex.LOSS_ABLATION}
    elif a.name == "gapmatrix":
        from .config import TOY_ITERS

        specs = a.variant or [f"{k}:" + ",".join(f"{n}={v}" for n, v in kn.items())
                              for k, kn in ex.GAP_VARIANTS.items()]  # fmt: skip
        knobs = dict(ex.parse_variant(s) for s in specs)
        variants = {v: ex.variant_data(out / "data", v, kn, data) for v, kn in knobs.items()}
        methods = a.methods or list(ex.GAP_METHODS)
        iters = a.iters or TOY_ITERS
        jobs = ex.gap_jobs(out, variants, methods, iters, a.seed)
        extra = {"iters": iters, "methods": methods, "variants": knobs}
    else:
        raise SystemExit(
            f"unknown experiment {a.name!r}; choose tune, convergence, losses, gapmatrix, plot or grid"
        )
    extra["toystreets"] = ex.toystreets_id(data)
    recorded = ex.recorded_rows(results, a.preset, data)  # the committed runs: not trained again
    names = {j.name for j in jobs}  # a call for some methods keeps the file's other rows
    if a.ablation:  # runs that are the ablation's (same method, length, seed, data): read from it
        recorded.update(ex.ablation_rows(Path(a.ablation), jobs, data))
    try:
        if not a.collect_only:
            ex.run_jobs(jobs, data, preset=a.preset, n_procs=a.jobs, recorded=recorded,
                        threads=a.threads)  # fmt: skip
    finally:  # whatever finished is kept, also after Ctrl-C
        res = ex.collect(jobs, a.preset, a.name, extra, recorded)
        # The file's rows of other runs are read now, not at the start: another call writing
        # the same file (e.g. a second lane) may have added some while this one trained.
        now = ex.recorded_rows(results, a.preset, data)
        res["runs"] = [row for name, row in now.items() if name not in names] + res["runs"]
        if "methods" in res:  # the methods of the whole file, not of this call only
            res["methods"] = ex.file_methods(res["runs"], res["methods"])
        ex.write_results(res, results)
        print(f"{len(res['runs'])} finished runs in {results}")
    if a.name == "convergence":
        table = ex.convergence_table(res)
        print(json.dumps(table, indent=1))
        print("converged length:", ex.converged_length(table))
        if a.figure:
            _plot_convergence(results, a.figure)
    if a.name == "losses":
        print(json.dumps({r["name"]: r["miou"] for r in res["runs"]}, indent=1))
        if a.ablation:  # the table against CONFETI and the ablation's leave-one-out rows
            ablation = json.loads(Path(a.ablation).read_text())
            rows = ex.loss_table(res, ablation, a.seed)
            noise = ex.paired_noise(ablation)
            print(ex.loss_markdown(rows, noise))
            print(ex.loss_seeds_markdown(ex.loss_seeds(res, ablation)))  # every seed run so far
            if a.figure:
                from .plots import plot_loss_ablation, save_figure

                title = (f"CONFETI with one part removed: seed {a.seed}, one run each, paired "
                         "with CONFETI's run of that seed")  # fmt: skip
                save_figure(plot_loss_ablation(rows, noise, title), a.figure)
                print(f"wrote {a.figure}")
    if a.name == "gapmatrix":
        table, seeds = ex.gap_table(res), ex.gap_seeds(res)
        print(json.dumps({"miou": table, "gap_closed_percent": ex.gap_closed(table),
                          "miou_by_seed": seeds}, indent=1))  # fmt: skip
        print(ex.gap_markdown(table, seeds=seeds))
        if a.figure:
            from .plots import plot_gap_matrix, save_figure

            save_figure(plot_gap_matrix(table, seeds), a.figure)
            print(f"wrote {a.figure}")


def _plot_convergence(results: Path, figure: str | None) -> None:
    from . import experiments as ex
    from .config import TOY_ITERS
    from .plots import plot_convergence, save_figure

    if not results.is_file():
        raise SystemExit(f"--results {results}: no such file")
    table = ex.convergence_table(json.loads(results.read_text()))
    path = Path(figure or "figures/convergence.png")
    save_figure(plot_convergence(table, chosen=TOY_ITERS), path)
    print(f"wrote {path}")


def _cmd_reproduce(a) -> None:
    from .reproduce import reproduce

    reproduce(a.data, a.runs, a.figures, preset=a.preset)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m confeti", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "data", help="'data toy --out DIR' generates ToyStreets; 'data check --data DIR' verifies"
    )
    p.add_argument("name", help="'toy' (generate) or 'check' (decode and verify every file)")
    p.add_argument("--out", default=None, help="data toy: where to write ToyStreets")
    p.add_argument("--data", default=None, help="data check: the folder to verify")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-source", type=int, default=2000)
    p.add_argument("--n-target-train", type=int, default=1000)
    p.add_argument("--n-target-val", type=int, default=300)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--appearance-gap", type=float, default=1.0)
    p.add_argument("--content-gap", type=float, default=1.0)
    for k in GAP_KNOBS:  # the gap's parts (toystreets.gap_knobs)
        default = WITHIN_CLASS if k == "within_class" else 1
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=float, default=None,
                       help=f"ToyStreets part of the gap, in [0, {knob_top(k):.3g}] (default {default})")  # fmt: skip
    p.set_defaults(fn=_cmd_data)

    p = sub.add_parser("train", help="train one method")
    _add_config_args(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not decode every image and label before training (file headers only)",
    )
    p.add_argument(
        "--cut-cache",
        default=None,
        metavar="DIR",
        help="store phase 0 (CUT pre-training) in DIR, or load it from there when a run of the "
        "same seed, data and CUT settings stored it (same results, phase 0 not trained again)",
    )
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument(
        "--domain",
        default="target",
        choices=("target", "source"),
        help="target: cityscapes/<split>; source: every image of gta5/",
    )
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--bn-stats",
        default=None,
        choices=("source", "target"),
        help="first re-estimate the BatchNorm statistics on this domain's training crops "
        "(AdaBN, confeti/bnstats.py; target: no labels used); writes eval_bn_<domain>.json",
    )
    p.add_argument("--bn-batches", type=int, default=100, help="--bn-stats: batches to average")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("ablation", help="every method x seeds; table and figure")
    _add_config_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs in parallel, one process each (default: min(cores, 2)); 1: one after another",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="threads per run (default: cores / jobs)"
    )
    p.add_argument("--results", default=None,
                   help="also write the table with its provenance here (e.g. results/ablation.json)")  # fmt: skip
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: collect the finished runs (--results, results.json)")  # fmt: skip
    p.add_argument("--compare", default=None,
                   help="an ablation table (e.g. results/ablation_3seeds.json): print how alike it "
                        "and this one rank the methods (means over seeds; Kendall's tau)")  # fmt: skip
    p.set_defaults(fn=_cmd_ablation)

    p = sub.add_parser("figures", help="write every figure from finished runs")
    p.add_argument("--runs", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="figures")
    p.add_argument("--ablation", default=None,
                   help="an ablation table (results/ablation.json) to draw ablation.png from "
                   "(default: RUNS/../ablation/results.json when it exists)")  # fmt: skip
    p.set_defaults(fn=_cmd_figures)

    p = sub.add_parser("bench", help="seconds per iteration, images/s, memory, FLOP/s")
    _add_config_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--data", default=None, help="also time the input pipeline on this data set")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--memory",
        action="store_true",
        help="estimate one iteration's peak memory per phase instead (default --device cpu, "
        "methods: confeti); no GPU needed",
    )
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="--memory: autocast dtype of the traced iteration (default fp32)")  # fmt: skip
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("gpu-check", help="the prepared GPU check: precision, memory, fit, loader, NCCL")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for data/ and gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="smoke-sized: runs on a CPU in seconds")
    p.add_argument("--method", default="confeti")
    p.add_argument("--iters", type=int, default=4, help="iterations per precision")
    p.add_argument("--device", default=None, help="cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(fn=_cmd_gpu_check)

    p = sub.add_parser("experiment",
                       help="many runs: 'tune' (tuning split), 'convergence', 'losses', 'gapmatrix'")  # fmt: skip
    p.add_argument("name", help="tune | convergence | losses | gapmatrix | plot (the convergence figure "
                   "from --results) | grid (no training: how much of each class the contrast's "
                   "feature grid keeps, against --ablation's per-class differences)")  # fmt: skip
    p.add_argument("--preset", default="toy")
    p.add_argument("--data", default=None)
    p.add_argument("--tune-data", default=None, help="tune: the tuning split (never reported)")
    p.add_argument("--out", default=None, help="folder of the runs (resumable)")
    p.add_argument("--results", required=True, help="the JSON collecting the finished runs")
    p.add_argument("--figure", default=None,
                   help="convergence / plot / gapmatrix / losses (with --ablation): write this PNG")  # fmt: skip
    p.add_argument(
        "--iters", type=int, default=None, help="tune / losses / gapmatrix: the run length"
    )
    p.add_argument("--variant", action="append", default=None,
                   help="gapmatrix: NAME:knob=value,... (a write_toystreets argument per knob; "
                   "repeat; default: appearance, content and both)")  # fmt: skip
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="convergence: run lengths")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0,
                   help="the runs' seed; losses, gapmatrix: a seed other than 0 adds rows "
                   "NAME_seedS to the same --results (a gap-matrix cell shows its seeds' mean)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="processes at once (--threads each)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per process (default 1; one long run on an otherwise idle machine: "
        "--jobs 1 --threads 2, which stalls when another process takes a core)",
    )
    p.add_argument("--ablation", default=None,
                   help="convergence, gapmatrix: take the runs that are this ablation table's "
                   "(same method, length, seed and data) from it instead of training them; "
                   "losses: the table holding CONFETI and its leave-one-out rows of --seed")  # fmt: skip
    p.add_argument("--collect-only", action="store_true",
                   help="write --results from the finished runs, train nothing")  # fmt: skip
    p.add_argument("--ckpt", action="append", default=None,
                   help="grid: also measure how much of each class's contrast the generator G "
                   "of this run keeps (RUN/checkpoint.pt; repeat)")  # fmt: skip
    p.set_defaults(fn=_cmd_experiment)

    p = sub.add_parser("reproduce", help="the whole toy pipeline: data, runs, notebooks, figures")
    p.add_argument("--data", default="data/toystreets")
    p.add_argument("--runs", default="runs")
    p.add_argument("--figures", default="figures")
    p.add_argument("--preset", default="toy")
    p.set_defaults(fn=_cmd_reproduce)

    a = ap.parse_args(argv)
    try:
        a.fn(a)
    except KeyboardInterrupt as e:  # runner.Interrupted carries 128 + the signal number
        sys.exit(getattr(e, "exit_code", 130))
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
