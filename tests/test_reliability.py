"""Faults a long run meets: kill -9, Ctrl-C, NaN, bad data and options, odd inputs (issue 8)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confeti import runner
from confeti.__main__ import build_config
from confeti.datasets import CityscapesDataset, DatasetError, GTA5Dataset, joint_transform
from confeti.labels import id_to_train_id
from confeti.metrics import confusion_matrix, iou
from confeti.runner import RunError, train


def _cli(toy, out, iters, *extra):
    return [
        sys.executable,
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
        str(iters),
        "--set",
        "ckpt_every=2",
        "--set",
        "log_every=1",
        *extra,
    ]


def _final_weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def _wait_for(proc, cond, what):
    """Poll the run's files until ``cond()``; fail (never hang) if the process ends first.

    No deadline on how fast the machine is: only on the process having stopped without it.
    """
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}")
        time.sleep(0.05)


def _log_iters(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["iter"] for ln in path.read_text().splitlines() if ln.endswith("}")]


def _default_sigint():
    """In the child: Ctrl-C handled as by default, even where the test runner was started in
    the background (``cmd &`` makes a shell ignore SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_until_paused(cmd, run, pause_at):
    """Start the run, wait until it sleeps at ``pause_at`` (CONFETI_PAUSE_AT), SIGKILL it."""
    proc = subprocess.Popen(cmd, env=_env(CONFETI_PAUSE_AT=pause_at),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(proc, (run / ".paused").exists, f"pausing at {pause_at}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (run / ".paused").unlink()


def test_sigkill_then_resume_matches_an_uninterrupted_run(toy, tmp_path):
    """Killed between checkpoints, then killed inside a checkpoint write: resume is exact."""
    iters = 16
    cli = lambda out, *extra: _cli(toy, out, iters, "--set", "ckpt_every=4", *extra)  # noqa: E731
    subprocess.run(cli(tmp_path / "straight"), check=True, env=_env(), capture_output=True)
    killed = tmp_path / "killed"
    _run_until_paused(cli(killed), killed, "10")  # after iteration 10; the checkpoint holds 8
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iteration"] == 8
    assert max(_log_iters(killed)) == 10
    # resume, and kill while it writes the checkpoint of iteration 12 (temp file complete)
    _run_until_paused(cli(killed, "--resume"), killed, "ckpt:12")
    assert list(killed.glob(".checkpoint.pt.*.tmp"))  # the half-done write ...
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["iteration"] == 8  # ... kept 8
    subprocess.run(cli(killed, "--resume"), check=True, env=_env(), capture_output=True)
    assert not list(killed.glob(".checkpoint.pt.*.tmp"))
    a, b = _final_weights(tmp_path / "straight"), _final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert ma == (killed / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "straight" / "eval.json").read_text()) == json.loads(
        (killed / "eval.json").read_text()
    )


def _interrupt_after_a_checkpoint(cmd, run, after=0):
    """Start a run that cannot finish by itself; once it has saved a checkpoint past ``after``
    and logged an iteration past that checkpoint, send SIGINT. Returns (code, stderr, logged)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)  # fmt: skip

    def ready():
        if not (run / "checkpoint.pt").exists():
            return False
        ck = torch.load(run / "checkpoint.pt", weights_only=True)["iteration"]
        return ck > after and max(_log_iters(run), default=0) > ck

    try:
        _wait_for(proc, ready, "a checkpoint and a later log line")
        logged = max(_log_iters(run))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, logged


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(toy, tmp_path):
    run = tmp_path / "int"
    cmd = _cli(toy, run, 100_000, "--set", "ckpt_every=3")  # cannot end on its own
    code, err, logged = _interrupt_after_a_checkpoint(cmd, run)
    assert code == 130, err[-2000:]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["iteration"]
    assert f"interrupted at iteration {saved}: checkpoint of iteration {saved}" in err
    assert saved >= logged  # the iteration under way finished and was saved
    assert not (run / "eval.json").exists()  # no success reported
    code, err, _ = _interrupt_after_a_checkpoint(cmd + ["--resume"], run, after=saved)
    assert code == 130, err[-2000:]
    iters = _log_iters(run)
    assert iters[saved - 1] == saved and iters[saved] == saved + 1  # continued from `saved`
    assert iters == list(range(1, len(iters) + 1))  # and nothing twice, nothing skipped


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test (it may run where SIGINT is ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _interrupt_inside(monkeypatch, what, at):
    """Send SIGINT to this process from inside the checkpoint write of iteration ``at`` (when
    the temp file is complete) or from inside the final evaluation: a real signal, a chosen
    place."""
    pid = os.getpid()
    if what == "eval":

        def fake_eval(*a, **k):  # noqa: E306
            os.kill(pid, signal.SIGINT)
            raise AssertionError("the evaluation was not interrupted")

        monkeypatch.setattr(runner, "evaluate_model", fake_eval)
        return
    real = runner.save_atomic

    def save(obj, path, before_replace=None):
        def hook():
            if obj["iteration"] == at:
                for _ in range(what):  # 1: one Ctrl-C; 2: a second one inside the write
                    os.kill(pid, signal.SIGINT)
            if before_replace is not None:
                before_replace()

        real(obj, path, before_replace=hook)

    monkeypatch.setattr(runner, "save_atomic", save)


def test_ctrl_c_during_a_checkpoint_write(toy, tmp_path, monkeypatch, sigint_default):
    """One Ctrl-C in the write: it completes, then the run stops. A second one: the write is
    abandoned and the previous checkpoint stays, whole."""
    cfg = build_config("smoke", iters=10, overrides=["ckpt_every=2"])
    _interrupt_inside(monkeypatch, 1, at=4)
    with pytest.raises(runner.Interrupted) as e:
        train(cfg, "source_only", toy, tmp_path / "one", progress=False)
    assert e.value.exit_code == 130
    assert torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    _interrupt_inside(monkeypatch, 2, at=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, "source_only", toy, tmp_path / "two", progress=False)
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not list((tmp_path / "two").glob(".checkpoint.pt.*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_during_the_final_evaluation_reports_no_success(
    toy, tmp_path, monkeypatch, sigint_default
):
    cfg = build_config("smoke", iters=4, overrides=["ckpt_every=100"])
    run = tmp_path / "ev"
    _interrupt_inside(monkeypatch, "eval", at=None)
    with pytest.raises(runner.Interrupted, match="final evaluation"):
        train(cfg, "source_only", toy, run, progress=False)
    assert not (run / "eval.json").exists() and not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 4
    monkeypatch.undo()
    res = train(cfg, "source_only", toy, run, resume=True, progress=False)
    assert json.loads((run / "eval.json").read_text())["miou"] == res["miou"]
    assert json.loads((run / "summary.json").read_text())["iters_run"] == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    cfg = build_config("smoke", iters=6, overrides=["ckpt_every=2"])
    real = runner.train_step

    def poisoned(state, batch, t, amp=None):
        logs = real(state, batch, t, amp)
        if t == 4:
            for p in state.student.parameters():
                p.data.fill_(float("nan"))
            logs["seg_src"] = float("nan")
        return logs

    monkeypatch.setattr(runner, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"seg_src.*iteration 4.*kept"):
        train(cfg, "source_only", toy, tmp_path / "nan", progress=False)
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_bad_options_are_refused_with_a_reason(toy, tmp_path):
    with pytest.raises(RunError, match="larger than the source images"):
        train(
            build_config("smoke", overrides=["crop_size=128,256"]),
            "source_only",
            toy,
            tmp_path / "big",
            progress=False,
        )
    with pytest.raises(RunError, match="not a folder"):
        train(
            build_config("smoke"),
            "source_only",
            tmp_path / "nowhere",
            tmp_path / "x",
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown method"):
        train(build_config("smoke"), "magic", toy, tmp_path / "y", progress=False)


def test_checkpoint_of_another_class_count_is_refused(toy, tmp_path):
    train(build_config("smoke", iters=2), "source_only", toy, tmp_path / "a", progress=False)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cfg16 = dataclasses.replace(build_config("smoke", iters=2), num_classes=16)
    from confeti.train import TrainState

    state = TrainState(cfg16, "source_only", torch.device("cpu"))
    with pytest.raises(Exception, match=r"shape mismatches"):
        runner._restore(state, ck)


def test_unwritable_out_gives_a_clear_error(toy, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "run"
    else:
        target = ro / "run"
    with pytest.raises(RunError, match="cannot write"):
        train(build_config("smoke", iters=2), "source_only", toy, target, progress=False)


# ---- fuzz ---------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=64),
    st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16]),
)
def test_fuzz_id_to_train_id(values, dtype):
    arr = np.array(values).astype(dtype)
    out = id_to_train_id(arr)
    assert out.shape == arr.shape and ((out < 19) | (out == 255)).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 3), st.data())
def test_fuzz_transform_and_metric(h, w, seed, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, h, w, generator=g)
    y = torch.randint(0, 256, (h, w), generator=g)
    ch, cw = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    xt, yt = joint_transform(x, y, resize=None, crop_size=(ch, cw), flip=True)
    assert xt.shape == (3, ch, cw) and yt.shape == (ch, cw)
    pred = torch.randint(-3, 30, (ch, cw), generator=g)
    valid = yt < 19  # the metric only counts pixels whose target is a class
    if ((pred[valid] < 0) | (pred[valid] >= 19)).any():
        with pytest.raises(ValueError, match="predictions must lie"):
            confusion_matrix(pred, yt, 19)
        pred = pred.clamp(0, 18)
    conf = confusion_matrix(pred, yt, 19)
    assert conf.shape == (19, 19) and int(conf.sum()) <= ch * cw
    v = iou(conf)
    assert ((v >= 0) & (v <= 1) | torch.isnan(v)).all()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=0, max_size=256))
def test_fuzz_image_reader_raises_only_dataset_errors(tmp_path, blob):
    root = tmp_path / "fz"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "images" / "0.png").write_bytes(blob)
    (root / "labels" / "0.png").write_bytes(blob[::-1])
    with pytest.raises(DatasetError, match="0.png"):
        GTA5Dataset(root)[0]
    _ = CityscapesDataset
