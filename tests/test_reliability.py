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


def test_sigkill_then_resume_matches_an_uninterrupted_run(toy, tmp_path):
    iters = 16
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run(
        _cli(toy, tmp_path / "straight", iters), check=True, env=env, capture_output=True
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(toy, killed, iters), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # kill at a random moment after the first checkpoint exists
    deadline = time.time() + 60
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(np.random.default_rng().uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)  # never half-written
    assert 0 < ck["iteration"] <= iters
    subprocess.run(_cli(toy, killed, iters, "--resume"), check=True, env=env, capture_output=True)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert ma == (killed / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "straight" / "eval.json").read_text()) == json.loads(
        (killed / "eval.json").read_text()
    )


def test_ctrl_c_writes_a_checkpoint(toy, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "int"
    proc = subprocess.Popen(
        _cli(toy, run, 400, "--set", "ckpt_every=1000"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "checkpoint saved" in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] > 0


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
