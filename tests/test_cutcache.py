"""Phase 0 (CUT pre-training) stored once and reused: bit-identical runs, keys, concurrent fills."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confeti import cutcache, runner
from confeti.__main__ import build_config
from confeti.cutcache import NOT_PHASE0, cache_key, cache_path
from confeti.runner import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fixed_source(monkeypatch):
    """The key holds the source digest: edits of the package while a test runs must not
    turn its reuse into a miss (the subprocess test below reads the real files)."""
    monkeypatch.setattr(cutcache, "_source_digest", lambda: "fixed")


def _cfg(**kw):
    return build_config("smoke", iters=6, overrides=[f"{k}={v}" for k, v in kw.items()])


def _ck(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _same_run(a: Path, b: Path) -> None:
    """Identical final weights (segmentor, G/D/F), optimizer states and metrics.jsonl."""
    ca, cb = _ck(a), _ck(b)
    assert ca["iteration"] == cb["iteration"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for name in ("G", "D", "F"):
        sa, sb = ca["style_optim"][name]["state"], cb["style_optim"][name]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (name, i, k)
    ra = (a / "metrics.jsonl").read_text().splitlines()
    rb = (b / "metrics.jsonl").read_text().splitlines()
    assert ra == rb
    phases = [json.loads(r)["phase"] for r in ra]
    assert "style_pretrain" in phases and "train" in phases  # rows of both phases compared


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_reused_phase0_gives_the_run_that_trains_it(toy, tmp_path):
    cfg, cache = _cfg(log_every=1), tmp_path / "cache"
    for name, cut in (("fill", cache), ("reuse", cache), ("plain", None)):
        train(cfg, "style", toy, tmp_path / name, progress=False, cut_cache=cut)
    assert _summary(tmp_path / "fill")["cut_pretrain"] == "stored"
    assert _summary(tmp_path / "reuse")["cut_pretrain"] == "reused"
    assert "cut_pretrain" not in _summary(tmp_path / "plain")
    assert len(list(cache.glob("cut_*.pt"))) == 1
    _same_run(tmp_path / "fill", tmp_path / "plain")
    _same_run(tmp_path / "reuse", tmp_path / "plain")


def test_phase0_of_style_serves_confeti(toy, tmp_path):
    """Another method with G (and its other segmentor parts) loads the same phase 0."""
    cfg, cache = _cfg(log_every=1), tmp_path / "cache"
    train(cfg, "style", toy, tmp_path / "style", progress=False, cut_cache=cache)
    train(cfg, "confeti", toy, tmp_path / "reuse", progress=False, cut_cache=cache)
    train(cfg, "confeti", toy, tmp_path / "plain", progress=False)
    assert _summary(tmp_path / "reuse")["cut_pretrain"] == "reused"
    _same_run(tmp_path / "reuse", tmp_path / "plain")


def test_resume_inside_phase0_loads_the_cache(toy, tmp_path):
    cfg, cache = _cfg(log_every=1, ckpt_every=1), tmp_path / "cache"
    train(cfg, "style", toy, tmp_path / "fill", progress=False, cut_cache=cache)
    orig = runner.phases
    runner.phases = lambda c, m: [("style_pretrain", 0, 2)]  # stop after 2 of 3 CUT iterations
    try:
        train(cfg, "style", toy, tmp_path / "split", progress=False)
    finally:
        runner.phases = orig
    train(cfg, "style", toy, tmp_path / "split", resume=True, progress=False, cut_cache=cache)
    assert _summary(tmp_path / "split")["cut_pretrain"] == "reused"
    _same_run(tmp_path / "split", tmp_path / "fill")


def test_key_covers_what_phase0_reads_only(toy, tmp_path):
    cfg = _cfg()
    key = cache_key(cfg, toy, "cpu")
    assert key["data"] == os.path.realpath(toy) and key["threads"] == torch.get_num_threads()
    path = cache_path(tmp_path, cfg, toy, "cpu")
    for change in (dict(seed=1), dict(ngf=8), dict(style_pretrain_iters=4), dict(backbone_width=4)):
        assert cache_path(tmp_path, dataclasses.replace(cfg, **change), toy, "cpu") != path
    assert cache_path(tmp_path, cfg, tmp_path, "cpu") != path  # other data
    same = dict(iters=50, lr=1.0, contrast_weight=3.0, log_every=7, schedule="two_stage",
                target_contrast=False)  # fmt: skip
    assert set(same) <= NOT_PHASE0
    assert cache_path(tmp_path, dataclasses.replace(cfg, **same), toy, "cpu") == path


def test_two_processes_filling_one_cache_train_phase0_once(toy, tmp_path):
    """Started together, one run trains and stores phase 0 while the other waits for it on the
    lock and loads it; both equal a run without the cache."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "confeti", "train", "--preset", "smoke", "--iters", "6",
           "--method", "style", "--data", str(toy), "--cut-cache", str(tmp_path / "cache"),
           "--skip-data-check", "--set", "log_every=1"]  # fmt: skip
    procs = [
        subprocess.Popen([*cmd, "--out", str(tmp_path / n)], env=env, stdout=subprocess.DEVNULL)
        for n in ("a", "b")
    ]
    assert [p.wait() for p in procs] == [0, 0]  # a hang is caught by pytest-timeout
    status = sorted(_summary(tmp_path / n)["cut_pretrain"] for n in ("a", "b"))
    assert status == ["reused", "stored"]
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes (the cache key holds the thread count)
    try:
        train(_cfg(log_every=1), "style", toy, tmp_path / "plain", progress=False)
    finally:
        torch.set_num_threads(n)
    _same_run(tmp_path / "a", tmp_path / "plain")
    _same_run(tmp_path / "b", tmp_path / "plain")
