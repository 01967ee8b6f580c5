"""The ablation's runs in parallel processes give the runs of one process, and resume."""

import json

import pytest
import torch

from confeti import runner
from confeti.__main__ import build_config
from confeti.ablation import _pending, run_ablation, run_dir
from confeti.config import METHODS as ALL_METHODS
from confeti.experiments import COST

METHODS = ["style", "selftrain+style"]  # both share seed 0's CUT pre-training


def _cfg():
    return build_config("smoke", iters=6, overrides=["log_every=1"])


def _run(d):
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    return ck["model"], (d / "metrics.jsonl").read_text(), json.loads((d / "eval.json").read_text())


def test_longest_runs_first(tmp_path):
    todo = _pending(tmp_path, ["source_only", "selftrain", "style", "confeti", "oracle"], 2)
    assert [m for m, _ in todo[:2]] == ["confeti", "confeti"] and todo[0][1] == 0
    assert [m for m, _ in todo[-4:]] == ["source_only"] * 2 + ["oracle"] * 2
    assert COST["confeti"] > COST["selftrain+style"] > COST["style"] > COST["selftrain+contrast"]
    assert COST["selftrain"] > COST["contrast"] > COST["source_only"] > COST["oracle"]
    assert set(COST) == set(ALL_METHODS)  # one table for the ablation and the experiments


def test_two_jobs_give_the_runs_of_one_and_resume_an_interrupted_run(toy, tmp_path):
    cfg = _cfg()
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = run_ablation(cfg, toy, one, seeds=1, methods=METHODS, progress=False, jobs=1, threads=1)
    # an interrupted run in the second ablation: a checkpoint inside phase 0, no eval.json
    orig = runner.phases
    runner.phases = lambda c, m: [("style_pretrain", 0, 2)]
    try:
        runner.train(cfg, "style", toy, run_dir(two, "style", 0), progress=False)
    finally:
        runner.phases = orig
    (run_dir(two, "style", 0) / "eval.json").unlink()
    res2 = run_ablation(cfg, toy, two, seeds=1, methods=METHODS, progress=False, jobs=2, threads=1)
    assert res1.keys() == res2.keys() == set(METHODS)
    for m in METHODS:
        assert res1[m]["miou_mean"] == res2[m]["miou_mean"]
        (w1, log1, ev1), (w2, log2, ev2) = _run(run_dir(one, m, 0)), _run(run_dir(two, m, 0))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), m
        assert log1 == log2 and ev1 == ev2, m
    # phase 0 trained once per ablation and seed, then loaded
    for out in (one, two):
        assert len(list((out / "cut_cache").glob("cut_*.pt"))) == 1
    status = {m: json.loads((run_dir(one, m, 0) / "summary.json").read_text()) for m in METHODS}
    assert sorted(s["cut_pretrain"] for s in status.values()) == ["reused", "stored"]
    assert (two / "logs" / "style_seed0.log").exists()


def test_interval_gap_closed_and_table_from_finished_runs(tmp_path):
    from confeti.ablation import collect, interval95, markdown_table, run_dir
    from confeti.labels import CLASSES

    assert interval95([40.0]) is None
    lo, hi = interval95([40.0, 42.0, 44.0])  # mean 42, s = 2, t(0.975, 2) = 4.303
    assert lo == pytest.approx(42 - 4.303 * 2 / 3**0.5) and hi == pytest.approx(84 - lo)
    scores = {"source_only": (30, 32, 34), "oracle": (60, 60, 60), "confeti": (45, 47, 49)}
    for m, xs in scores.items():
        for s, x in enumerate(xs):
            d = run_dir(tmp_path, m, s)
            d.mkdir(parents=True)
            (d / "eval.json").write_text(json.dumps({"miou": x, "iou": dict.fromkeys(CLASSES, x)}))
    res = collect(tmp_path, methods=tuple(scores), seeds=3)
    assert res["confeti"]["gap_closed_percent"] == pytest.approx(
        100 * (47 - 32) / (60 - 32), abs=0.05
    )
    assert res["oracle"]["ci95"] == [60.0, 60.0] and res["source_only"]["gap_closed_percent"] == 0
    table = markdown_table(res)
    assert "| confeti | 47.0 ± 2.0 | 42.0 – 52.0 | 54 % | 3 |" in table


def _finished_runs(tmp_path, out, toystreets_seed: int):
    """A ToyStreets stamp and two finished seed-0 runs (source-only 30, oracle 60) under ``out``."""
    from confeti.ablation import run_dir
    from confeti.labels import CLASSES

    data = tmp_path / "data"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": toystreets_seed}))
    for m, x in (("source_only", 30.0), ("oracle", 60.0)):
        d = run_dir(out, m, 0)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"miou": x, "iou": dict.fromkeys(CLASSES, x)}))
    return data


def test_collect_only_writes_the_committed_table_with_its_provenance(tmp_path):
    from confeti.ablation import run_ablation, run_dir
    from confeti.config import get_preset

    out = tmp_path / "runs"
    data = _finished_runs(tmp_path, out, toystreets_seed=1)
    target = tmp_path / "results" / "ablation.json"
    # collect-only: nothing trains although selftrain has no finished run (it would take minutes)
    run_ablation(get_preset("smoke"), data, out, seeds=3, progress=False, jobs=1,
                 methods=("source_only", "selftrain", "oracle"), results=target,
                 collect_only=True)  # fmt: skip
    res = json.loads(target.read_text())
    assert not run_dir(out, "selftrain", 0).exists()
    assert res["seeds_done"] == {"source_only": 1, "oracle": 1} and res["seeds_planned"] == 3
    assert (res["toystreets_version"], res["toystreets_seed"], res["data"]) == (2, 1, "data")
    assert res["methods"]["oracle"]["gap_closed_percent"] == 100
    assert {"commit", "torch", "date", "preset"} <= set(res)


def test_runs_recorded_in_the_committed_table_are_not_trained_again(tmp_path):
    """A new machine (empty runs folder) keeps the committed runs and trains only what is missing;
    a table made with another run length is not reused."""
    import dataclasses

    from confeti.ablation import recorded_runs, run_ablation, run_dir
    from confeti.config import get_preset

    cfg = get_preset("smoke")
    first = tmp_path / "machine1"
    data = _finished_runs(tmp_path, first, toystreets_seed=0)
    target = tmp_path / "results" / "ablation.json"
    run_ablation(cfg, data, first, seeds=1, progress=False, jobs=1,
                 methods=("source_only", "oracle"), results=target, collect_only=True)  # fmt: skip
    # machine 2: nothing on disk; collecting (and training, which would take minutes) keeps both
    second = tmp_path / "machine2"
    res = run_ablation(cfg, data, second, seeds=1, progress=False, jobs=1,
                       methods=("source_only", "oracle"), results=target)  # fmt: skip
    assert not run_dir(second, "source_only", 0).exists()
    assert res["source_only"]["runs"][0]["miou"] == 30.0 and res["oracle"]["seeds"] == 1
    assert json.loads(target.read_text())["seeds_done"] == {"source_only": 1, "oracle": 1}
    assert set(recorded_runs(target, cfg, data)) == {("source_only", 0), ("oracle", 0)}
    assert recorded_runs(target, dataclasses.replace(cfg, iters=cfg.iters + 1), data) == {}
    # a call for one method keeps the other method in the file
    res = run_ablation(cfg, data, second, seeds=1, progress=False, jobs=1,
                       methods=("oracle",), results=target, collect_only=True)  # fmt: skip
    assert set(res) == {"oracle"}
    assert set(json.loads(target.read_text())["methods"]) == {"source_only", "oracle"}


def test_a_call_with_fewer_seeds_keeps_the_other_seeds_in_the_committed_table(tmp_path):
    """`ablation --seeds 1 --methods X` on a machine whose runs folder is empty used to rewrite
    the committed table with seed 0 of every method only; every recorded seed must stay."""
    from confeti.ablation import run_ablation, run_dir
    from confeti.config import get_preset
    from confeti.labels import CLASSES

    cfg = get_preset("smoke")
    first = tmp_path / "machine1"
    data = _finished_runs(tmp_path, first, toystreets_seed=0)
    for s in (1, 2):  # seeds 1 and 2 of source_only, finished on the first machine
        d = run_dir(first, "source_only", s)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"miou": 31.0, "iou": dict.fromkeys(CLASSES, 1)}))
    target = tmp_path / "results" / "ablation.json"
    run_ablation(cfg, data, first, seeds=3, progress=False, jobs=1,
                 methods=("source_only", "oracle"), results=target, collect_only=True)  # fmt: skip
    assert json.loads(target.read_text())["seeds_done"] == {"source_only": 3, "oracle": 1}
    run_ablation(cfg, data, tmp_path / "machine2", seeds=1, progress=False, jobs=1,
                 methods=("oracle",), results=target, collect_only=True)  # fmt: skip
    res = json.loads(target.read_text())
    assert res["seeds_done"] == {"source_only": 3, "oracle": 1} and res["seeds_planned"] == 3
    assert [r["seed"] for r in res["methods"]["source_only"]["runs"]] == [0, 1, 2]


def _table_of(runs: dict) -> dict:
    """A collect()-shaped table from {method: {seed: (mIoU, per-class value)}}."""
    from confeti.labels import CLASSES

    return {
        m: {
            "runs": [
                {"seed": s, "miou": x, "iou": dict.fromkeys(CLASSES, c)}
                for s, (x, c) in by_seed.items()
            ]
        }  # fmt: skip
        for m, by_seed in runs.items()
    }


def test_paired_difference_pairs_runs_by_seed_and_skips_unshared_seeds():
    from confeti.ablation import paired_difference

    res = _table_of({"confeti": {0: (46.0, 10.0), 1: (45.0, 20.0), 2: (44.0, 5.0)},
                     "selftrain": {1: (47.0, 25.0), 0: (47.5, 4.0)}})  # fmt: skip
    res["selftrain"]["runs"][0]["iou"]["bicycle"] = None  # seed 1 has no bicycle IoU
    d = paired_difference(res, "confeti", "selftrain")
    assert d["seeds"] == [0, 1]  # seed 2 only in confeti: not paired
    assert d["miou"] == [-1.5, -2.0]
    assert d["iou"]["road"] == [6.0, -5.0]
    assert d["iou"]["bicycle"] == [6.0, None]
    with pytest.raises(KeyError, match="oracle"):
        paired_difference(res, "oracle", "selftrain")
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference(_table_of({"a": {0: (1.0, 1.0)}, "b": {1: (1.0, 1.0)}}), "a", "b")


def test_runs_markdown_has_a_column_per_seed_and_a_dash_for_a_missing_run():
    from confeti.ablation import runs_markdown

    md = runs_markdown(_table_of({"style": {0: (43.58, 1.0)}, "fda": {0: (35.92, 1.0), 1: (35.87, 1.0)}}))  # fmt: skip
    lines = md.splitlines()
    assert lines[0] == "| method | seed 0 | seed 1 |"
    assert lines[2] == "| style | 43.58 | – |"
    assert lines[3] == "| fda | 35.92 | 35.87 |"


def test_rank_agreement_counts_the_pairs_two_tables_order_differently():
    from confeti.ablation import rank_agreement, ranking_markdown

    a = _table_of({"selftrain": {0: (47.0, 1.0), 1: (47.2, 1.0)}, "confeti": {0: (46.0, 1.0)},
                   "fda": {0: (36.0, 1.0)}, "source_only": {0: (28.0, 1.0)}})  # fmt: skip
    b = _table_of({"selftrain": {0: (44.0, 1.0)}, "confeti": {0: (45.0, 1.0)},
                   "fda": {0: (30.0, 1.0)}, "source_only": {0: (25.0, 1.0)},
                   "oracle": {0: (55.0, 1.0)}})  # fmt: skip
    agr = rank_agreement(a, b)
    assert agr["methods"] == ["selftrain", "confeti", "fda", "source_only"]  # oracle: only in b
    assert agr["score_a"]["selftrain"] == 47.1  # the mean over its runs
    assert agr["swapped"] == [["selftrain", "confeti"]]
    assert agr["kendall_tau"] == pytest.approx((5 - 1) / 6, abs=1e-3)
    assert agr["rank_b"]["confeti"] == 1 and agr["rank_a"]["confeti"] == 2
    assert rank_agreement(a, a)["kendall_tau"] == 1.0
    with pytest.raises(ValueError, match="share 0 method"):
        rank_agreement(a, b, seed=1)  # b has no seed-1 run
    md = ranking_markdown(agr, "v2 seed 0", "v2 seed 1")
    assert md.splitlines()[2] == "| selftrain | 47.10 | 1 | 44.00 | 2 |"
    assert "selftrain / confeti" in md and "+0.67" in md


def _two_runs_and_another_table(tmp_path):
    """Finished runs of selftrain (47) and fda (36) in tmp_path/runs, and a table ranking them
    the other way round (40, 41) in tmp_path/other.json."""
    from confeti.labels import CLASSES

    out = tmp_path / "runs"
    for m, x in (("selftrain", 47.0), ("fda", 36.0)):
        d = run_dir(out, m, 0)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"miou": x, "iou": dict.fromkeys(CLASSES, x)}))
    other = tmp_path / "other.json"
    table = _table_of({"selftrain": {0: (40.0, 1.0)}, "fda": {0: (41.0, 1.0)}})
    other.write_text(json.dumps({"methods": table}))
    return out, other


def test_ablation_compare_prints_the_ranking_against_another_table(tmp_path, capsys):
    from confeti.__main__ import main

    out, other = _two_runs_and_another_table(tmp_path)
    args = ["ablation", "--preset", "smoke", "--data", str(tmp_path), "--out", str(out),
            "--seeds", "1", "--collect-only", "--methods", "selftrain", "fda"]  # fmt: skip
    main(args + ["--compare", str(other)])
    text = capsys.readouterr().out
    assert "| fda | 41.00 | 1 | 36.00 | 2 |" in text and "tau = -1.00" in text
    with pytest.raises(SystemExit, match="--compare"):
        main(args + ["--compare", str(tmp_path / "missing.json")])


def test_ablation_compare_ranks_every_run_of_the_results_file_and_never_fails_after_training(
    tmp_path, capsys
):
    """One method per call (two lanes): the ranking is over every run --results holds; with one
    method recorded there is nothing to rank yet, which is said, not raised."""
    from confeti.__main__ import main

    out, other = _two_runs_and_another_table(tmp_path)
    results = tmp_path / "results.json"
    args = ["ablation", "--preset", "smoke", "--data", str(tmp_path), "--out", str(out),
            "--seeds", "1", "--collect-only", "--results", str(results),
            "--compare", str(other), "--methods"]  # fmt: skip
    main(args + ["selftrain"])
    assert "nothing to rank yet" in capsys.readouterr().out
    main(args + ["fda"])  # this call collects fda only; the file holds selftrain too
    text = capsys.readouterr().out
    assert "| fda | 41.00 | 1 | 36.00 | 2 |" in text and "tau = -1.00" in text


def _collected(runs: dict, out) -> dict:
    """``collect``'s summary (means, std, intervals) of a ``_table_of`` table's runs."""
    from confeti.ablation import collect

    recorded = {(m, r["seed"]): dict(r, seconds=1.0) for m, v in runs.items() for r in v["runs"]}
    return collect(out, list(runs), 3, recorded)


def test_one_seed_shows_no_spread_in_the_tables(tmp_path):
    from confeti.ablation import markdown_table

    runs = _table_of({"style": {0: (43.58, 1.0)}, "fda": {0: (35.0, 1.0), 1: (37.0, 1.0)}})
    md = markdown_table(_collected(runs, tmp_path))
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in md.splitlines()[2:4]}
    assert rows == {"style": "43.6 (1 seed)", "fda": "36.0 ± 1.4"}


def test_figures_draw_both_paired_differences_from_an_ablation_table(tmp_path):
    import json

    from confeti.figures import write_figures

    runs = _table_of({m: {0: (40.0 + i, 1.0), 1: (41.0 + i, 2.0)}
                      for i, m in enumerate(["selftrain", "selftrain+style", "confeti"])})  # fmt: skip
    table = tmp_path / "ablation.json"
    table.write_text(json.dumps({"methods": _collected(runs, tmp_path)}))
    written = write_figures(tmp_path / "no_runs", tmp_path / "no_data", tmp_path / "figs", table)
    assert {"ablation.png", "ablation_difference.png", "ablation_difference_style.png"} <= set(
        written
    )


def test_collect_gives_no_mean_to_a_class_no_run_scored(tmp_path):
    """A class absent from val (IoU None in every run) gets None, not a numpy warning and NaN."""
    import warnings

    from confeti.ablation import collect
    from confeti.labels import CLASSES

    for s, miou in enumerate((40.0, 42.0)):
        d = run_dir(tmp_path, "selftrain", s)
        d.mkdir(parents=True)
        iou = {c: (None if c == "train" else 50.0 + s) for c in CLASSES}
        (d / "eval.json").write_text(json.dumps({"miou": miou, "iou": iou}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = collect(tmp_path, ["selftrain"], seeds=2)["selftrain"]
    assert r["iou_mean"]["train"] is None and r["iou_mean"]["road"] == 50.5
    assert r["miou_mean"] == 41.0 and r["seeds"] == 2


def test_mean_std_rounds_once_from_the_runs(tmp_path):
    """std 0.4456 is stored as 0.45 (two decimals); the table must print 0.4, not 0.5."""
    from confeti.ablation import collect, markdown_table

    mious = [47.24, 46.78, 47.11, 46.09, 46.79]
    runs = _table_of({"selftrain": {s: (v, 1.0) for s, v in enumerate(mious)}})
    recorded = {("selftrain", r["seed"]): dict(r, seconds=1.0) for r in runs["selftrain"]["runs"]}
    res = collect(tmp_path, ["selftrain"], 5, recorded)
    assert res["selftrain"]["miou_std"] == 0.45
    row = markdown_table(res).splitlines()[2].split(" | ")
    assert row[1] == "46.8 ± 0.4"
    # the interval too: 55.554 is stored as 55.55, whose float prints as 55.5; the table: 55.6
    oracle = [56.14, 55.86, 56.29]
    runs = _table_of({"oracle": {s: (v, 1.0) for s, v in enumerate(oracle)}})
    recorded = {("oracle", r["seed"]): dict(r, seconds=1.0) for r in runs["oracle"]["runs"]}
    res = collect(tmp_path, ["oracle"], 3, recorded)
    row = markdown_table(res).splitlines()[2].split(" | ")
    assert res["oracle"]["ci95"][0] == 55.55 and row[2] == "55.6 – 56.6"
