"""Experiments of many runs: resumable jobs, results files, the convergence rule."""

import json
import shutil
from pathlib import Path

import pytest

from confeti import experiments as ex


def test_converged_length_needs_every_method_within_a_point():
    table = {"a": {800: 30.0, 1600: 35.0, 3200: 35.6, 6400: 35.9},
             "b": {800: 40.0, 1600: 41.5, 3200: 43.0, 6400: 43.4}}  # fmt: skip
    assert ex.converged_length(table) == 3200  # 1600 -> 3200: b moves 1.5
    assert ex.converged_length(table, tol=2.0) == 1600
    table["b"][6400] = 45.0
    assert ex.converged_length(table) is None  # extend past 6400


def test_tuning_grid_scores_on_the_tuning_split_only(tmp_path):
    jobs = ex.tuning_jobs(tmp_path / "runs", tmp_path / "tune", iters=100)
    assert len(jobs) == 12 and all(j.method == "selftrain" for j in jobs)
    assert {j.overrides["mix_start"] for j in jobs} == {0, 8}  # 7.5 % of 100, rounded
    j = jobs[0]
    j.out.mkdir(parents=True)
    (j.out / "eval.json").write_text(json.dumps({"miou": 99.0, "iou": {}}))
    assert not j.done()  # the tuning split's score is missing
    (j.out / "eval_tune.json").write_text(json.dumps({"miou": 41.0}))
    assert j.done()
    res = ex.collect(jobs, "toy", "tune")
    assert [r["miou_tune"] for r in res["runs"]] == [41.0]
    assert "miou" not in res["runs"][0]  # the reported split never enters a tuning result
    assert res["commit"] and res["torch"] and res["base_config"]["preset"] == "toy"


def test_a_job_resumes_and_evaluates_on_the_tuning_split(toy, tmp_path):
    job = ex.Job("s", "source_only", tmp_path / "run", iters=3, eval_data=toy)
    cmds = job.commands(toy, "smoke")
    assert len(cmds) == 2 and "--resume" not in cmds[0]
    ex.run_jobs([job], toy, preset="smoke", n_procs=1, progress=False)
    assert job.done() and json.loads((job.out / "eval_tune.json").read_text())["miou"] >= 0
    assert job.commands(toy, "smoke")[0][-1] == str(job.out / "eval_tune.json")  # no retrain
    res = ex.collect([job], "smoke", "x")
    assert res["runs"][0]["iters"] == 3
    ex.write_results(res, tmp_path / "results" / "x.json")
    assert json.loads((tmp_path / "results" / "x.json").read_text())["runs"]


def test_convergence_figure_has_one_coloured_line_per_method():
    from confeti.plots import METHOD_COLORS, plot_convergence

    table = {"source_only": {800: 25.0, 1600: 29.0}, "confeti": {800: 35.0, 1600: 40.0}}
    fig = plot_convergence(table, chosen=1600)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["source_only", "confeti", "toy preset: 1600"]
    lines = {ln.get_label(): ln.get_color() for ln in ax.get_lines()}
    assert lines["confeti"] == METHOD_COLORS["confeti"] and ax.get_ylabel() and ax.get_xlabel()


def test_parse_variant_names_the_bad_knob():
    assert ex.parse_variant("appearance:content_gap=0") == ("appearance", {"content_gap": 0})
    assert ex.parse_variant("both:") == ("both", {})
    assert ex.parse_variant("x:content_gap=0.5,n_source=8") == (
        "x", {"content_gap": 0.5, "n_source": 8})  # fmt: skip
    assert ex.parse_variant("x:within_class=0.5") == ("x", {"within_class": 0.5})  # a gap part
    with pytest.raises(SystemExit, match="color_gap"):
        ex.parse_variant("x:color_gap=1")
    with pytest.raises(SystemExit, match="needs a name"):
        ex.parse_variant(":content_gap=0")


def test_gap_closed_is_the_share_of_source_only_to_oracle():
    table = {"both": {"source_only": 30.0, "oracle": 60.0, "fda": 36.0, "confeti": 48.0},
             "content": {"source_only": 50.0, "fda": 51.0}}  # fmt: skip
    closed = ex.gap_closed(table)
    assert set(closed) == {"both"}  # no oracle: no gap to close
    assert closed["both"]["fda"] == pytest.approx(20.0)
    assert closed["both"]["confeti"] == pytest.approx(60.0)
    assert closed["both"]["source_only"] == 0.0 and closed["both"]["oracle"] == 100.0
    md = ex.gap_markdown(table).splitlines()
    assert md[0] == "| variant | source_only | oracle | fda | confeti |"
    assert md[2] == "| both | 30.0 | 60.0 | 36.0 (20 %) | 48.0 (60 %) |"
    assert md[3] == "| content | 50.0 | – | 51.0 | – |"  # no oracle yet: no share


def test_gap_matrix_runs_each_variant_on_its_own_data(toy, tmp_path):
    tiny = "n_source=8,n_target_train=8,n_target_val=2,height=64,width=128"
    knobs = dict(ex.parse_variant(s) for s in ("both:", f"appearance:content_gap=0,{tiny}"))
    variants = {v: ex.variant_data(tmp_path / "data", v, kn, toy) for v, kn in knobs.items()}
    assert variants["both"] == toy  # no knobs: the experiment's own data, not regenerated
    meta = json.loads((variants["appearance"] / "toystreets.json").read_text())
    assert meta["content_gap"] == 0 and meta["n_source"] == 8
    jobs = ex.gap_jobs(tmp_path / "runs", variants, ["source_only"], iters=2)
    assert [j.data for j in jobs] == [toy, variants["appearance"]]
    assert not list(variants["appearance"].rglob(".confeti_check.json"))
    ex.run_jobs(jobs, toy, preset="smoke", n_procs=1, progress=False)
    assert all(j.done() for j in jobs)
    # the run trained on its variant: the data check left its per-file cache in that folder
    assert list(variants["appearance"].rglob(".confeti_check.json"))
    res = ex.collect(jobs, "smoke", "gapmatrix")
    assert [r["variant"] for r in res["runs"]] == ["both", "appearance"]
    assert set(ex.gap_table(res)) == {"both", "appearance"}


def test_variant_data_never_exposes_a_half_written_folder(tmp_path, monkeypatch):
    """Two lanes generating the same variant: each writes its own temporary folder and renames
    it when complete; the lane that finds the name taken keeps the other's and drops its own."""
    import confeti.toystreets as ts

    seen = []

    def fake_write(out, progress=False, **knobs):  # stands in for the minute-long generation
        seen.append(out)
        assert out.name.startswith(".") and ".tmp-" in out.name  # never written in place
        (out / "gta5").mkdir(parents=True)
        (out / "toystreets.json").write_text(json.dumps({"writer": out.name, **knobs}))

    monkeypatch.setattr(ts, "write_toystreets", fake_write)
    # an unfinished folder left by an older version is replaced
    (tmp_path / "data" / "content" / "gta5").mkdir(parents=True)
    out = ex.variant_data(tmp_path / "data", "content", {"appearance_gap": 0}, tmp_path / "toy")
    assert out == tmp_path / "data" / "content"
    assert json.loads((out / "toystreets.json").read_text())["writer"] == seen[0].name
    # finished: not generated again
    assert ex.variant_data(tmp_path / "data", "content", {"appearance_gap": 0}, tmp_path) == out
    assert len(seen) == 1

    # another lane finishes first while this one generates: its folder stays, ours goes
    def other_lane_wins(out, progress=False, **knobs):
        fake_write(out, **knobs)
        other = tmp_path / "data" / "both2"
        (other / "gta5").mkdir(parents=True)
        (other / "toystreets.json").write_text(json.dumps({"writer": "other"}))

    monkeypatch.setattr(ts, "write_toystreets", other_lane_wins)
    out = ex.variant_data(tmp_path / "data", "both2", {"content_gap": 0}, tmp_path)
    assert json.loads((out / "toystreets.json").read_text())["writer"] == "other"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["both2", "content"]

    def interrupted(out, progress=False, **knobs):
        (out / "gta5").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ts, "write_toystreets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ex.variant_data(tmp_path / "data", "fog", {"content_gap": 0}, tmp_path)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["both2", "content"]


def test_a_call_for_some_methods_keeps_the_files_method_list():
    runs = [{"method": "selftrain"}, {"method": "fda"}, {"method": "style"}, {"method": "mine"}]
    # a `--methods style` call on a file holding fda and selftrain runs lists all three
    assert ex.file_methods(runs, ["style"]) == ["fda", "style", "selftrain", "mine"]
    # a first call lists what it was asked for, finished or not, in the matrix's order
    assert ex.file_methods([], ["confeti", "oracle"]) == ["oracle", "confeti"]


def test_gap_matrix_figure_shows_every_cell():
    from confeti.plots import plot_gap_matrix

    table = {"appearance": {"source_only": 30.0, "oracle": 60.0, "fda": 45.0},
             "both": {"source_only": 25.0, "oracle": 58.0, "fda": 30.0}}  # fmt: skip
    fig = plot_gap_matrix(table)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "50 %\n45.0" in texts and len(texts) == 6
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "appearance only",
        "both (default)",
    ]
    del table["both"]["fda"]  # a run not finished: its cell says so instead of staying blank
    texts = [t.get_text() for t in plot_gap_matrix(table).axes[0].texts]
    assert texts.count("not run\nyet") == 1 and len(texts) == 6


def test_convergence_end_labels_of_equal_values_do_not_overlap():
    from confeti.plots import plot_convergence

    table = {"style": {6400: 44.8}, "confeti": {6400: 44.9}, "oracle": {800: 50.0, 6400: 58.0}}
    ax = plot_convergence(table).axes[0]
    ys = sorted(t.get_position()[1] for t in ax.texts if t.get_text() in ("44.8", "44.9"))
    assert ys[1] - ys[0] > 0.4  # 4.5 % of the 13.2-point range apart, not on top of each other


def test_loss_ablation_switches_off_one_term_of_confeti_each():
    import dataclasses

    from confeti.config import Config, get_preset

    jobs = ex.loss_jobs(Path("runs/l"), iters=12800)
    assert [j.name for j in jobs] == list(ex.LOSS_ABLATION) and {j.method for j in jobs} == {
        "confeti"
    }
    toy = get_preset("toy")
    for j in jobs:
        ((k, v),) = j.overrides.items()  # one term each
        assert getattr(toy, k) not in (0, False) and v in (0, False)  # the toy preset has it on
        Config.from_dict({**dataclasses.asdict(toy), k: v}).validate()
        assert j.cut_cache == Path("runs/l/cut_cache")
        assert ["--set", f"{k}={v}"] == j.commands(Path("d"), "toy")[0][-4:-2]
    with pytest.raises(SystemExit, match="no_such"):
        ex.loss_jobs(Path("r"), 10, names=["no_psc", "no_such"])
    # another seed: its own folder and results row, never the finished seed-0 run's
    (j1,) = ex.loss_jobs(Path("runs/l"), iters=12800, seed=1, names=["no_psc"])
    assert (j1.name, j1.out, j1.seed) == ("no_psc_seed1", Path("runs/l/no_psc_seed1"), 1)
    assert j1.cut_cache == Path("runs/l/cut_cache")


def test_recorded_rows_are_kept_on_a_new_machine_and_not_trained_again(tmp_path):
    """A results file made with this recipe on this data keeps its rows when the run folders are
    gone; another ToyStreets or a changed row (other length) is not reused."""
    import json

    from confeti import experiments as ex
    from confeti.labels import CLASSES

    data = tmp_path / "data"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 0}))
    job = ex.Job("both/source_only", "source_only", tmp_path / "m1" / "so", 50)
    job.out.mkdir(parents=True)
    (job.out / "eval.json").write_text(
        json.dumps({"miou": 30.0, "iou": dict.fromkeys(CLASSES, 30.0)})
    )
    results = tmp_path / "r.json"
    ex.write_results(
        ex.collect([job], "smoke", "gapmatrix", {"toystreets": ex.toystreets_id(data)}), results
    )
    # machine 2: same job name, nothing on disk
    again = ex.Job("both/source_only", "source_only", tmp_path / "m2" / "so", 50)
    rec = ex.recorded_rows(results, "smoke", data)
    ex.run_jobs([again], data, preset="smoke", n_procs=1, progress=False, recorded=rec)
    assert not again.out.exists()  # nothing trained
    res = ex.collect([again], "smoke", "gapmatrix", recorded=rec)
    assert [r["miou"] for r in res["runs"]] == [30.0]
    longer = ex.Job("both/source_only", "source_only", tmp_path / "m2" / "so", 100)
    assert ex.collect([longer], "smoke", "gapmatrix", recorded=rec)["runs"] == []
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 1}))
    assert ex.recorded_rows(results, "smoke", data) == {}
    assert ex.recorded_rows(results, "toy", data) == {}


def test_the_ablations_runs_fill_the_convergence_check_and_the_gap_matrix(tmp_path):
    """``--ablation``: a convergence job at the ablation's length and seed, or the gap matrix's
    default-data cell, is read from the ablation table; other lengths, variants, overrides or
    another ToyStreets are not."""
    import json

    from confeti import experiments as ex
    from confeti.__main__ import main
    from confeti.labels import CLASSES

    data = tmp_path / "toystreets"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 0}))
    run = {"seed": 0, "miou": 31.0, "iou": dict.fromkeys(CLASSES, 31.0), "seconds": 5.0}
    ab = tmp_path / "ablation.json"
    ab.write_text(json.dumps({"experiment": "ablation", "commit": "abc", "iters": 64,
                              "data": "toystreets", "toystreets_version": 2, "toystreets_seed": 0,
                              "methods": {"source_only": {"runs": [run]}}}))  # fmt: skip
    jobs = ex.convergence_jobs(tmp_path / "conv", ["source_only", "oracle"], [64, 128])
    assert set(ex.ablation_rows(ab, jobs, data)) == {"source_only@64"}
    variant = tmp_path / "appearance"
    gap = ex.gap_jobs(tmp_path / "gap", {"appearance": variant, "both": data}, ["source_only"], 64)
    rows = ex.ablation_rows(ab, gap, data)
    assert set(rows) == {"both/source_only"} and rows["both/source_only"]["variant"] == "both"
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 1}))
    assert ex.ablation_rows(ab, jobs, data) == {}
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 0}))
    # the command: collect-only writes the ablation's run as the convergence row, trains nothing
    out = tmp_path / "results.json"
    main(["experiment", "convergence", "--preset", "smoke", "--data", str(data), "--out",
          str(tmp_path / "conv"), "--results", str(out), "--lengths", "64", "128",
          "--methods", "source_only", "--ablation", str(ab), "--collect-only"])  # fmt: skip
    res = json.loads(out.read_text())
    assert [(r["name"], r["miou"], r["from"]) for r in res["runs"]] == [
        ("source_only@64", 31.0, "ablation.json")
    ]
    assert res["toystreets"] == {"version": 2, "seed": 0}
    # and the next call keeps it as a recorded row of its own file
    main(["experiment", "convergence", "--preset", "smoke", "--data", str(data), "--out",
          str(tmp_path / "conv"), "--results", str(out), "--lengths", "64", "128",
          "--methods", "source_only", "--collect-only"])  # fmt: skip
    assert [r["name"] for r in json.loads(out.read_text())["runs"]] == ["source_only@64"]
    # a call for another method keeps the file's rows of the methods it does not run
    main(["experiment", "convergence", "--preset", "smoke", "--data", str(data), "--out",
          str(tmp_path / "conv"), "--results", str(out), "--lengths", "64", "128",
          "--methods", "oracle", "--collect-only"])  # fmt: skip
    assert [r["name"] for r in json.loads(out.read_text())["runs"]] == ["source_only@64"]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"experiment": "gapmatrix", "runs": []}))
    with pytest.raises(SystemExit, match="not an ablation table"):
        ex.ablation_rows(bad, jobs, data)


def test_spearman_is_one_for_a_monotone_pair_and_averages_ties():
    from confeti.experiments import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 35, 90]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: [1, 1, 2] ranks (0.5, 0.5, 2) against (0, 1, 2): r of the ranks
    assert spearman([1, 1, 2], [0, 1, 2]) == pytest.approx(0.8660254, abs=1e-6)
    # a constant side has no ranking: nan, without numpy's divide-by-zero warning
    import math
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman([3, 3, 3], [0, 1, 2])) and math.isnan(spearman([1], [2]))


def test_experiment_grid_reads_labels_and_the_ablation_table_and_trains_nothing(toy, tmp_path):
    import json

    from confeti.__main__ import main
    from confeti.labels import CLASSES

    runs = {m: [{"seed": s, "miou": 40.0 + s, "iou": {c: 40.0 + i * (m == "confeti")
                                                       for i, c in enumerate(CLASSES)}}
                for s in (0, 1)] for m in ("confeti", "selftrain")}  # fmt: skip
    ab = tmp_path / "ablation.json"
    ab.write_text(json.dumps({"methods": {m: {"runs": r} for m, r in runs.items()}}))
    out = tmp_path / "grid.json"
    main(["experiment", "grid", "--preset", "smoke", "--data", str(toy), "--ablation", str(ab),
          "--results", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert list(res["differences"]) == ["confeti - selftrain"]  # pairs without runs are left out
    assert res["differences"]["confeti - selftrain"]["iou"]["bicycle"] == 18.0
    assert res["toystreets"]["seed"] == 0 and len(res["grid"]) == 2
    assert res["grid"][0] < res["crop"][0]  # the feature grid is coarser than the crop
    kept = [res["classes"][c]["survival_target"] for c in CLASSES]
    assert all(0.0 <= k <= 1.0 for k in kept) and max(kept) > 0
    shares = sum(res["classes"][c]["share_target_percent"] for c in CLASSES)
    assert shares == pytest.approx(100.0, abs=0.1)
    with pytest.raises(SystemExit, match="--ablation"):
        main(["experiment", "grid", "--data", str(toy), "--results", str(out)])


def test_experiment_grid_measures_what_a_runs_generator_keeps(toy, tmp_path):
    import json

    from confeti.__main__ import build_config, main
    from confeti.labels import CLASSES
    from confeti.runner import train

    cfg = build_config("smoke", iters=4)
    train(cfg, "style", toy, tmp_path / "style", progress=False)
    train(cfg, "source_only", toy, tmp_path / "so", progress=False)
    runs = [{"seed": 0, "miou": 40.0, "iou": {c: float(i) for i, c in enumerate(CLASSES)}}]
    ab = tmp_path / "ablation.json"
    ab.write_text(json.dumps({"methods": {"confeti": {"runs": runs}, "selftrain": {"runs": runs}}}))
    out = tmp_path / "grid.json"
    main(["experiment", "grid", "--preset", "smoke", "--data", str(toy), "--ablation", str(ab),
          "--results", str(out), "--ckpt", str(tmp_path / "style" / "checkpoint.pt")])  # fmt: skip
    (g,) = json.loads(out.read_text())["generators"]
    assert g["method"] == "style" and g["seed"] == cfg.seed
    seen = [v for v in g["classes"].values() if v["contrast_source"] is not None]
    assert seen and all(v["contrast_translated"] >= 0 for v in seen)
    assert set(g["correlation"]) == {"kept_of_source", "of_target"}
    assert set(g["correlation"]["of_target"]) == {"confeti - selftrain"}
    with pytest.raises(SystemExit, match="has no generator"):
        main(["experiment", "grid", "--preset", "smoke", "--data", str(toy), "--ablation",
              str(ab), "--results", str(out), "--ckpt", str(tmp_path / "so" / "checkpoint.pt")])  # fmt: skip


def test_experiment_grid_keeps_generators_measured_earlier_and_recorrelates_them(toy, tmp_path):
    import json

    from confeti.__main__ import build_config, main
    from confeti.labels import CLASSES
    from confeti.runner import train

    cfg = build_config("smoke", iters=4)
    ck = tmp_path / "style" / "checkpoint.pt"
    train(cfg, "style", toy, ck.parent, progress=False)

    def table(methods, slope):
        runs = [{"seed": 0, "miou": 40.0, "iou": {c: slope * i for i, c in enumerate(CLASSES)}}]
        other = {"selftrain": lambda i: 0.0, "selftrain+style": lambda i: float(i % 3)}
        return {"methods": {m: {"runs": runs if m == "confeti" else [
            {**runs[0], "iou": {c: other[m](i) for i, c in enumerate(CLASSES)}}]}
            for m in methods}}  # fmt: skip

    ab, out = tmp_path / "ablation.json", tmp_path / "grid.json"
    args = ["experiment", "grid", "--preset", "smoke", "--data", str(toy), "--ablation", str(ab),
            "--results", str(out)]  # fmt: skip
    ab.write_text(json.dumps(table(("confeti", "selftrain"), 1.0)))
    main(args + ["--ckpt", str(ck)])
    (g,) = json.loads(out.read_text())["generators"]
    # a second run of the same method and seed (another folder) is another generator
    shutil.copytree(ck.parent, tmp_path / "style_again")
    main(args + ["--ckpt", str(tmp_path / "style_again" / "checkpoint.pt")])
    both = json.loads(out.read_text())["generators"]
    assert [Path(x["ckpt"]).parent.name for x in both] == ["style", "style_again"]
    ck2 = tmp_path / "style_again" / "checkpoint.pt"
    main(args + ["--ckpt", str(ck2)])  # measured again: replaced, not added
    assert len(json.loads(out.read_text())["generators"]) == 2
    shutil.rmtree(tmp_path / "style_again")
    out.write_text(json.dumps({**json.loads(out.read_text()), "generators": [g]}))
    ck.unlink()  # the run is gone (a new machine); its measurement stays in the results file
    ab.write_text(json.dumps(table(("confeti", "selftrain", "selftrain+style"), -1.0)))
    main(args)
    (kept,) = json.loads(out.read_text())["generators"]
    assert kept["classes"] == g["classes"] and kept["method"] == "style"
    assert set(kept["correlation"]["of_target"]) == {
        "confeti - selftrain",
        "confeti - selftrain+style",
        "selftrain+style - selftrain",
    }
    rho = kept["correlation"]["of_target"]["confeti - selftrain"]
    assert rho == pytest.approx(-g["correlation"]["of_target"]["confeti - selftrain"], abs=1e-3)


def test_two_calls_writing_one_results_file_keep_each_others_rows(tmp_path, monkeypatch):
    """A row another call added to the results file while this one trained survives this call's
    write (the file's other rows are read at the end, not at the start)."""
    import json

    from confeti import experiments as ex
    from confeti.__main__ import main
    from confeti.labels import CLASSES

    data = tmp_path / "toystreets"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": 2, "seed": 0}))
    out = tmp_path / "results.json"
    args = ["experiment", "convergence", "--preset", "smoke", "--data", str(data), "--out",
            str(tmp_path / "conv"), "--results", str(out), "--lengths", "64"]  # fmt: skip

    def the_other_lane_finishes(jobs, *a, **k):  # stands in for training; the other call writes
        other = ex.Job("oracle@64", "oracle", tmp_path / "conv2" / "oracle", 64)
        other.out.mkdir(parents=True)
        (other.out / "eval.json").write_text(json.dumps({"miou": 50.0, "iou": dict.fromkeys(CLASSES, 50.0)}))  # fmt: skip
        extra = {"toystreets": ex.toystreets_id(data)}
        ex.write_results(ex.collect([other], "smoke", "convergence", extra), out)
        for j in jobs:  # and this call's own run finishes
            j.out.mkdir(parents=True, exist_ok=True)
            (j.out / "eval.json").write_text(json.dumps({"miou": 30.0, "iou": dict.fromkeys(CLASSES, 30.0)}))  # fmt: skip

    monkeypatch.setattr(ex, "run_jobs", the_other_lane_finishes)
    main(args + ["--methods", "source_only"])
    rows = {r["name"]: r["miou"] for r in json.loads(out.read_text())["runs"]}
    assert rows == {"oracle@64": 50.0, "source_only@64": 30.0}


def _run(seed, miou, road, bicycle=None):
    from confeti.labels import CLASSES

    iou = {c: 10.0 for c in CLASSES}
    iou.update(road=road, bicycle=bicycle)
    return {"seed": seed, "miou": miou, "iou": iou}


def test_loss_table_pairs_each_row_with_confetis_run_of_the_same_seed():
    ablation = {"methods": {
        "confeti": {"runs": [_run(0, 46.0, 90.0, 5.0), _run(1, 45.0, 80.0, 4.0)]},
        "selftrain": {"runs": [_run(0, 47.0, 91.0, 20.0), _run(1, 46.5, 85.0, 15.0)]},
    }}  # fmt: skip
    losses = {"runs": [{"name": "no_psc", **_run(0, 44.5, 88.0, 6.0)},
                       {"name": "no_psc_seed1", **_run(1, 49.0, 70.0, 1.0)},
                       {"name": "no_cam_seed1", **_run(1, 40.0, 70.0, 1.0)}]}  # fmt: skip
    rows = ex.loss_table(losses, ablation, seed=0)
    assert list(rows) == ["confeti", "no_psc", "selftrain"]  # no_cam has no seed-0 run
    assert rows["no_psc"]["delta"] == -1.5 and rows["selftrain"]["delta"] == 1.0
    assert rows["no_psc"]["iou_delta"]["road"] == -2.0 and rows["no_psc"]["iou_delta"]["wall"] == 0
    assert rows["confeti"]["iou_delta"]["bicycle"] == 0 and rows["no_psc"]["removed"].startswith("L_psc")  # fmt: skip
    rows1 = ex.loss_table(losses, ablation, seed=1)
    assert rows1["no_psc"]["delta"] == 4.0 and rows1["no_cam"]["delta"] == -5.0
    ablation["methods"]["confeti"]["runs"][0]["iou"]["bicycle"] = None  # a class not scored
    assert ex.loss_table(losses, ablation, seed=0)["no_psc"]["iou_delta"]["bicycle"] is None
    with pytest.raises(ValueError, match="seed 2"):
        ex.loss_table(losses, ablation, seed=2)
    text = ex.loss_markdown(rows, noise=0.8)
    assert "| no_psc | L_psc: G's prototypical consistency | 44.50 | -1.50 |" in text
    assert "0.80 points" in text and "| selftrain | +1 | +0 |" in text


def test_loss_seeds_pairs_every_seed_of_a_loss_run_with_that_seeds_methods():
    ablation = {"methods": {
        "confeti": {"runs": [_run(0, 46.0, 90.0), _run(1, 45.0, 80.0)]},
        "selftrain": {"runs": [_run(0, 47.0, 91.0)]},
    }}  # fmt: skip
    losses = {"runs": [{"name": "no_target_contrast", **_run(0, 47.5, 88.0)},
                       {"name": "no_target_contrast_seed1", **_run(1, 46.0, 70.0)},
                       {"name": "no_psc", **_run(0, 42.0, 70.0)}]}  # fmt: skip
    rows = ex.loss_seeds(losses, ablation)
    assert list(rows) == ["no_psc", "no_target_contrast"]  # LOSS_ROWS order
    r = rows["no_target_contrast"]
    assert r["seeds"] == [0, 1] and r["miou"] == [47.5, 46.0]
    assert r["minus"]["confeti"] == [1.5, 1.0] and r["mean"]["confeti"] == 1.25
    assert r["minus"]["selftrain"] == [0.5] and r["mean"]["selftrain"] == 0.5  # no seed-1 run
    text = ex.loss_seeds_markdown(rows)
    assert (
        "| no_target_contrast | 0, 1 | 47.50, 46.00 | +1.50, +1.00 | +1.25 | +0.50 | +0.50 |"
        in text
    )
    assert "| no_psc | 0 | 42.00 | -4.00 | -4.00 | -5.00 | -5.00 |" in text


def test_paired_noise_is_the_pooled_seed_std_of_paired_differences():
    def m(*v):
        return {"runs": [_run(s, x, 0.0) for s, x in enumerate(v)]}

    ab = {"confeti": m(46, 45, 47), "selftrain": m(47, 47, 47), "selftrain+style": m(45, 44)}
    # confeti - selftrain = -1, -2, 0: std 1; selftrain+style shares two seeds only: left out
    assert ex.paired_noise({"methods": ab}) == 1.0
    ab["selftrain+contrast"] = m(46, 43, 49)  # differences 0, 2, -2: std 2 -> pooled sqrt(2.5)
    assert ex.paired_noise(ab) == round(2.5**0.5, 2)
    assert ex.paired_noise({"confeti": m(46, 45)}) is None


def test_loss_figure_draws_one_bar_and_one_heatmap_row_per_removed_part():
    from confeti.plots import plot_loss_ablation

    ablation = {"confeti": {"runs": [_run(0, 46.0, 90.0, 5.0)]},
                "selftrain": {"runs": [_run(0, 47.0, 91.0, 20.0)]}}  # fmt: skip
    losses = {"runs": [{"name": "no_reg", **_run(0, 43.0, 88.0, 6.0)}]}
    rows = ex.loss_table(losses, ablation)
    fig = plot_loss_ablation(rows, noise=0.8)
    bars, heat = fig.axes[:2]
    assert [round(p.get_width(), 2) for p in bars.patches if p.get_height() < 1] == [-3.0, 1.0]
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert labels[0].startswith("no_reg") and labels[1].startswith("selftrain")
    assert "-3.00 (43.0)" in [t.get_text() for t in bars.texts]
    cells = [t.get_text() for t in heat.texts]
    assert len(cells) == 2 * 19 and "+15" in cells and "-2" in cells  # bicycle, road
    assert "0.80" in bars.get_legend().get_texts()[0].get_text()  # the seed-noise band


def test_a_gap_matrix_seed_gets_its_own_runs_and_cells_average_over_seeds(tmp_path):
    from confeti.plots import plot_gap_matrix

    variants = {"appearance": tmp_path / "a", "content": tmp_path / "c"}
    seed0 = ex.gap_jobs(tmp_path, variants, ["selftrain+style"], iters=4)
    seed2 = ex.gap_jobs(tmp_path, variants, ["selftrain+style"], iters=4, seed=2)
    assert [j.name for j in seed0] == ["appearance/selftrain+style", "content/selftrain+style"]
    assert [j.name for j in seed2] == ["appearance/selftrain+style_seed2",
                                       "content/selftrain+style_seed2"]  # fmt: skip
    assert seed2[0].out == tmp_path / "appearance" / "selftrain_style_seed2" and seed2[0].seed == 2
    assert {j.out for j in seed0}.isdisjoint(j.out for j in seed2)
    row = {"variant": "appearance"}
    res = {"runs": [{**row, "method": "source_only", "seed": 0, "miou": 30.0},
                    {**row, "method": "oracle", "seed": 0, "miou": 60.0},
                    {**row, "method": "style", "seed": 2, "miou": 48.0},
                    {**row, "method": "style", "seed": 0, "miou": 44.0},
                    {**row, "method": "style", "seed": 1, "miou": 46.0}]}  # fmt: skip
    assert ex.gap_seeds(res)["appearance"]["style"] == [44.0, 46.0, 48.0]  # by seed
    table = ex.gap_table(res)
    assert table["appearance"]["style"] == pytest.approx(46.0)
    md = ex.gap_markdown(table, seeds=ex.gap_seeds(res)).splitlines()
    assert md[2] == "| appearance | 30.0 | 60.0 | 46.0 ± 2.0 (53 %, 3 seeds) |"
    assert ex.gap_markdown(table).splitlines()[2] == "| appearance | 30.0 | 60.0 | 46.0 (53 %) |"
    texts = [t.get_text() for t in plot_gap_matrix(table, ex.gap_seeds(res)).axes[0].texts]
    assert "53 %\n46.0\n3 seeds" in texts and "0 %\n30.0" in texts
    title = plot_gap_matrix(table, ex.gap_seeds(res)).axes[0].get_title()
    assert title.endswith("(mean over seeds where a cell says so; one seed elsewhere)")
    res["runs"] += [{**r, "seed": 1} for r in res["runs"][:2]]  # every cell has several seeds now
    title = plot_gap_matrix(ex.gap_table(res), ex.gap_seeds(res)).axes[0].get_title()
    assert title.endswith("(mean over the seeds each cell names)") and "one seed" not in title


def test_run_jobs_gives_each_process_the_threads_asked_for(tmp_path, monkeypatch):
    """`experiment --jobs 1 --threads 2`: one long run alone on both cores."""
    import subprocess
    from types import SimpleNamespace

    seen = []

    def fake_run(cmd, env, stdout, stderr):
        seen.append(env["OMP_NUM_THREADS"])
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    job = ex.Job("confeti", "confeti", tmp_path / "confeti", 4, 0)
    ex.run_jobs([job], tmp_path, preset="smoke", n_procs=1, progress=False, threads=2)
    ex.run_jobs([job], tmp_path, preset="smoke", n_procs=1, progress=False)
    assert seen == ["2", "1"]
