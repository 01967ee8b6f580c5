"""End to end on a tiny ToyStreets: files, resume bit-for-bit, determinism, refusals."""

import json

import pytest
import torch

from confeti.__main__ import build_config, main
from confeti.runner import RunError, train


def _cfg(iters=6, **kw):
    return build_config("smoke", iters=iters, overrides=[f"{k}={v}" for k, v in kw.items()])


def _train_first(n, cfg, method, data, out):
    """Train only the first ``n`` iterations of the run (its first phase), as if interrupted."""
    from confeti import runner

    orig = runner.phases
    runner.phases = lambda c, m: [(k, a, min(b, a + n)) for k, a, b in orig(c, m)][:1]
    try:
        train(cfg, method, data, out, progress=False)
    finally:
        runner.phases = orig


def _weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_train_writes_the_contract_files(toy, tmp_path):
    res = train(_cfg(), "source_only", toy, tmp_path / "run", progress=False)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "eval.json", "summary.json"):
        assert (tmp_path / "run" / name).exists(), name
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev) >= {"miou", "iou", "num_classes", "split", "images"} and ev == res
    assert ev["num_classes"] == 19 and ev["split"] == "val" and ev["images"] == 4


def test_resume_is_bit_for_bit(toy, tmp_path):
    cfg = _cfg(iters=6, ckpt_every=3, log_every=1)
    train(cfg, "confeti", toy, tmp_path / "straight", progress=False)
    half = build_config("smoke", iters=6, overrides=["ckpt_every=3", "log_every=1"])
    # stop after 3 iterations by training a copy whose loop ends there, then resume
    import dataclasses

    _train_first(3, half, "confeti", toy, tmp_path / "split")
    train(
        dataclasses.replace(half), "confeti", toy, tmp_path / "split", resume=True, progress=False
    )
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = (tmp_path / "straight" / "metrics.jsonl").read_text()
    lb = (tmp_path / "split" / "metrics.jsonl").read_text()
    assert la == lb


def test_same_seed_same_run_other_seed_differs(toy, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(_cfg(seed=seed), "selftrain", toy, tmp_path / name, progress=False)
    m = {n: (tmp_path / n / "metrics.jsonl").read_text() for n in "abc"}
    assert m["a"] == m["b"] and m["a"] != m["c"]


def test_occupied_out_is_refused(toy, tmp_path):
    train(_cfg(iters=2), "source_only", toy, tmp_path / "r", progress=False)
    with pytest.raises(RunError, match="--resume"):
        train(_cfg(iters=2), "source_only", toy, tmp_path / "r", progress=False)
    train(_cfg(iters=2), "source_only", toy, tmp_path / "r", overwrite=True, progress=False)


def test_a_run_folder_in_use_by_another_process_is_refused(toy, tmp_path):
    import fcntl
    import subprocess
    import sys

    run = tmp_path / "r"
    run.mkdir()
    # another process holds the run's lock (a second open file: flock conflicts as between
    # processes, also inside this one)
    with open(run / ".lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 12345\n")
        other.flush()
        with pytest.raises(RunError, match=r"being trained by pid 12345.*another --out"):
            train(_cfg(iters=2), "source_only", toy, run, progress=False)
    assert not (run / "config.json").exists()  # refused before it touched the folder
    # a process killed while it holds the lock leaves no stale lock: the resume starts
    code = ("import sys, pathlib; from confeti.runner import run_lock\n"
            "with run_lock(pathlib.Path(sys.argv[1])):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "locked"  # blocks until the child holds the lock
    with pytest.raises(RunError, match="being trained by pid"):
        train(_cfg(iters=2), "source_only", toy, run, progress=False)
    p.kill()
    p.wait()
    train(_cfg(iters=2), "source_only", toy, run, progress=False)
    assert (run / "eval.json").exists()


def test_cli_train_and_eval(toy, tmp_path, capsys):
    run = tmp_path / "cli"
    main(
        [
            "train",
            "--preset",
            "smoke",
            "--method",
            "source_only",
            "--data",
            str(toy),
            "--out",
            str(run),
            "--iters",
            "2",
        ]
    )
    main(["eval", "--ckpt", str(run / "checkpoint.pt"), "--data", str(toy)])
    assert "road" in capsys.readouterr().out
    val = (run / "eval.json").read_text()
    # another evaluation set must not overwrite the run's own (target val) eval.json
    main(["eval", "--ckpt", str(run / "checkpoint.pt"), "--data", str(toy), "--domain", "source"])
    assert (run / "eval.json").read_text() == val
    assert '"split": "source"' in (run / "eval_source.json").read_text()
    with pytest.raises(SystemExit, match="choose one of"):
        main(
            [
                "train",
                "--preset",
                "smoke",
                "--method",
                "magic",
                "--data",
                str(toy),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_two_process_data_parallel_ranks_agree(toy, tmp_path):
    """torchrun with 2 CPU processes (gloo): the ranks end with identical weights and prototypes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: two test runs on one machine never collide
        "--nproc_per_node",
        "2",
        "-m",
        "confeti",
        "train",
        "--preset",
        "smoke",
        "--method",
        "confeti",
        "--data",
        str(toy),
        "--out",
        str(out),
        "--iters",
        "6",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    (w0, p0), (w1, p1) = summary["rank_checksums"]
    assert w0 == w1 and p0 == p1 and p0 != 0.0
    # the evaluation was sharded over the two ranks and summed: one process on the whole
    # split scores the saved weights the same
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, "-m", "confeti", "eval", "--ckpt", str(out / "checkpoint.pt"),
                    "--data", str(toy), "--out", str(single)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    sharded = json.loads((out / "eval.json").read_text())
    assert json.loads(single.read_text())["iou"] == sharded["iou"]


def test_two_stage_schedule_retrains_the_segmentor_with_g_frozen(toy, tmp_path):
    cfg = _cfg(iters=4, schedule="two_stage", log_every=1)
    train(cfg, "confeti", toy, tmp_path / "two", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    by_phase = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r)
    assert set(by_phase) == {"style_pretrain", "train", "stage2"}
    assert len(by_phase["train"]) == len(by_phase["stage2"]) == 4
    assert all("loss_D" in r for r in by_phase["train"])  # stage 1: CUT trained jointly
    assert not any("loss_D" in r or "psc" in r or "pc_tgt" in r for r in by_phase["stage2"])
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["train_style"] is False


def test_data_cache_and_cpu_seeding_leave_the_run_unchanged(toy, tmp_path, monkeypatch):
    """Two speed changes keep the maths: the run with the in-memory data cache equals the run
    that decodes every file each time, and the CPU-only seeding equals torch.manual_seed."""
    from confeti import datasets, runner

    cfg = _cfg(iters=8, log_every=1)
    train(cfg, "confeti", toy, tmp_path / "cached", progress=False)
    monkeypatch.setattr(datasets, "CACHE_BYTES", 0)
    monkeypatch.setattr(runner, "_seed_step", lambda seed, device: torch.manual_seed(seed))
    monkeypatch.setattr(runner._Seeded, "__getitem__",
                        lambda self, key: (torch.manual_seed(key[1]), self.base[key[0]])[1])  # fmt: skip
    train(cfg, "confeti", toy, tmp_path / "fresh", progress=False)
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = [(tmp_path / n / "metrics.jsonl").read_text() for n in ("cached", "fresh")]
    assert m[0] == m[1]


def test_summary_seconds_cover_every_call_of_a_resumed_run(toy, tmp_path):
    """summary.json's seconds add the calls before a resume (recorded in the checkpoint); a
    checkpoint without that record says the total is incomplete instead of under-reporting."""
    cfg = _cfg(iters=6, ckpt_every=3)
    _train_first(3, cfg, "source_only", toy, tmp_path / "r")
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 3 and ck["seconds"] > 0
    first = ck["seconds"]
    train(cfg, "source_only", toy, tmp_path / "r", resume=True, progress=False)
    sm = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert sm["iters_run"] == 3 and "seconds_complete" not in sm
    assert sm["seconds"] == pytest.approx(first + sm["seconds_this_call"], abs=0.11)
    # an older checkpoint (no "seconds"): the total is flagged, not guessed
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    ck["iteration"], ck["seconds"] = 3, None
    del ck["seconds"]
    torch.save(ck, tmp_path / "r" / "checkpoint.pt")
    train(cfg, "source_only", toy, tmp_path / "r", resume=True, progress=False)
    sm = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert sm["seconds_complete"] is False and sm["seconds"] == sm["seconds_this_call"]


def test_code_commit_is_read_once_per_process(monkeypatch):
    """A run reports the commit it started with, even if the checkout moves while it trains."""
    import subprocess

    from confeti import runner

    first = runner.code_commit()

    def moved(*a, **k):
        raise AssertionError("git read again")

    monkeypatch.setattr(subprocess, "run", moved)
    assert runner.code_commit() == first


def test_target_contrast_switch_and_config_of_an_older_version_resumes(toy, tmp_path):
    """``target_contrast=False`` drops exactly the target term (no pc_tgt rows); a config.json
    written before that field existed resumes (the field's default keeps the old behaviour)."""
    rows = {}
    for on in (True, False):
        run = tmp_path / f"tc{on}"
        train(_cfg(iters=10, log_every=1, target_contrast=on), "contrast", toy, run, progress=False)
        rows[on] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("pc_tgt" in r for r in rows[True]) and not any("pc_tgt" in r for r in rows[False])
    assert any("pc_src" in r for r in rows[False])  # the source contrast stays
    cfg = _cfg(iters=6, ckpt_every=3)
    _train_first(3, cfg, "source_only", toy, tmp_path / "old")
    f = tmp_path / "old" / "config.json"
    meta = json.loads(f.read_text())
    del meta["config"]["target_contrast"]  # as written before the field was added
    f.write_text(json.dumps(meta))
    train(cfg, "source_only", toy, tmp_path / "old", resume=True, progress=False)
    meta["config"]["no_such_field"] = 1  # a file of another version is still refused
    f.write_text(json.dumps(meta))
    with pytest.raises(RunError, match="another method or config"):
        train(cfg, "source_only", toy, tmp_path / "old", resume=True, progress=False)
