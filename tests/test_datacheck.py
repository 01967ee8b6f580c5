"""The full data check: every image and label decoded before training, cached, one writer."""

import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import make_cityscapes, make_gta5, write_png16_rgb

from confeti import runner
from confeti.__main__ import build_config, main
from confeti.datacheck import CACHE_NAME, verify
from confeti.datasets import CityscapesDataset, DatasetError, GTA5Dataset, SynthiaDataset
from confeti.runner import train

H, W = 16, 32


def _every_id_label(legal: int) -> np.ndarray:
    """A label holding every legal id 0..legal-1 (row-major), the rest the last id."""
    ids = np.full(H * W, legal - 1, np.int64)
    ids[:legal] = np.arange(legal)
    return ids.reshape(H, W)


def test_files_holding_every_legal_id_pass(tmp_path):
    gta = make_gta5(tmp_path / "gta5", n=2, ids=[_every_id_label(34).astype(np.uint8)] * 2)
    rep = verify(GTA5Dataset(gta, check=False), progress=False)
    assert rep.ok and rep.pairs == 2 and sorted(rep.files_with_class) == list(range(19))
    cs = make_cityscapes(tmp_path / "cs", "val", 1)
    lab = next((cs / "gtFine" / "val").rglob("*.png"))
    Image.fromarray(_every_id_label(34).astype(np.uint8), mode="L").save(lab)
    assert verify(CityscapesDataset(cs, "val", check=False), progress=False).ok
    syn = tmp_path / "syn"
    (syn / "RGB").mkdir(parents=True)
    (syn / "GT" / "LABELS").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(syn / "RGB" / "0000000.png")
    cls = _every_id_label(23)
    write_png16_rgb(syn / "GT" / "LABELS" / "0000000.png", np.stack([cls, cls * 0 + 7, cls], -1))
    rep = verify(SynthiaDataset(syn, check=False), progress=False)
    assert rep.ok and sorted(rep.files_with_class) == list(range(19))


def _damage(root, kind):
    """Damage one file of a GTA5-layout folder; returns the damaged file."""
    img, lab = root / "images" / "00001.png", root / "labels" / "00001.png"
    with Image.open(img) as im:
        w, h = im.size
    if kind == "truncated image":
        img.write_bytes(img.read_bytes()[:100])  # a valid PNG header, nothing after it
        return img, "truncated"
    if kind == "truncated label":
        lab.write_bytes(lab.read_bytes()[:100])
        return lab, "truncated"
    if kind == "not a png":
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(img, format="JPEG")
        return img, "not a PNG"
    if kind == "out of range":
        ids = np.full((h, w), 7, np.uint8)
        ids[0, :3] = (34, 99, 200)
        lab_im = Image.fromarray(ids, mode="P")
        lab_im.putpalette([0, 0, 0] * 256)
        lab_im.save(lab)
        return lab, r"out of range: 34, 99, 200 \(legal ids are 0..33\)"
    if kind == "rgb label":
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(lab)
        return lab, "label mode RGB"
    if kind == "wrong size":
        Image.fromarray(np.zeros((h, w + 2), np.uint8), mode="L").save(lab)
        return lab, f"label size {w + 2}x{h} != image size {w}x{h}"
    raise AssertionError(kind)


KINDS = ["truncated image", "truncated label", "not a png", "out of range", "rgb label", "wrong size"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_each_damaged_file_is_refused_before_training(toy, tmp_path, kind):
    data = tmp_path / "data"
    shutil.copytree(toy, data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock", "*.json"))
    bad, why = _damage(data / "gta5", kind)
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=rf"(?s)nothing was trained.*{bad.name}: .*{why}"):
        train(build_config("smoke", iters=2), "source_only", data, out, progress=False)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_every_bad_file_is_named_and_data_check_cli(toy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy, data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    (data / "gta5" / "labels" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 92)
    bad_img, _ = _damage(data / "gta5", "truncated image")
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "--data", str(data)])
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert f"BAD {bad_img}" in text and "labels/00003.png" in text
    assert "cityscapes/val: 4 image/label pairs" in text and "2 damaged file(s)" in text
    with pytest.raises(SystemExit, match="--data DIR is required"):
        main(["data", "check"])
    with pytest.raises(SystemExit, match="--out DIR is required"):
        main(["data", "toy"])


def test_cache_skips_verified_files_and_rechecks_changed_ones(toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy, data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    ds = GTA5Dataset(data / "gta5", check=False)
    first = verify(ds, progress=False)
    assert first.ok and first.verified_now == len(ds) and first.from_cache == 0
    assert (data / "gta5" / CACHE_NAME).is_file()
    again = verify(ds, progress=False)
    assert again.verified_now == 0 and again.from_cache == len(ds)
    assert again.files_with_class == first.files_with_class
    bad, _ = _damage(data / "gta5", "truncated label")  # changed on disk: verified again
    third = verify(ds, progress=False)
    assert third.verified_now == 1 and [p for p, _ in third.bad] == [bad]


def _verify_in_child(root, queue):
    torch.set_num_threads(1)
    rep = verify(GTA5Dataset(root, check=False), progress=False, workers=1)
    queue.put((rep.ok, rep.verified_now, rep.from_cache))


def test_two_processes_at_once_verify_once(toy, tmp_path):
    """Two processes on one folder: the lock lets one verify and write; the other reads."""
    data = tmp_path / "data"
    shutil.copytree(toy / "gta5", data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_verify_in_child, args=(data, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get() for _ in procs)  # a hang is caught by pytest-timeout
    for p in procs:
        p.join()
    n = len(list((data / "images").glob("*.png")))
    assert got == [(True, 0, n), (True, n, 0)]
    assert not list(data.glob(f".{CACHE_NAME}.*.tmp"))  # the atomic write left no temp file


def test_parallel_verification_finds_the_same(toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy / "gta5", data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    bad, _ = _damage(data, "out of range")
    rep = verify(GTA5Dataset(data, check=False), progress=False, workers=2)
    assert [p for p, _ in rep.bad] == [bad] and rep.verified_now == rep.pairs


def test_skip_data_check_reads_headers_only(toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy, data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    cfg = build_config("smoke", iters=1)
    d = runner.build_data(cfg, data, "source_only", data_check=False)
    assert len(d.source) == 12 and not (data / "gta5" / CACHE_NAME).exists()


def test_a_file_damaged_mid_run_stops_cleanly_and_resumes(toy, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(toy, data, ignore=shutil.ignore_patterns(CACHE_NAME, "*.lock"))
    cfg = build_config("smoke", iters=6, overrides=["ckpt_every=100"])
    train(cfg, "source_only", data, tmp_path / "straight", progress=False)
    images = sorted((data / "gta5" / "images").glob("*.png"))
    backup = {p: p.read_bytes() for p in images}
    real = runner.train_step

    def step_then_damage(state, batch, t, amp=None):
        logs = real(state, batch, t, amp)
        if t == 2:  # after iteration 3: every source image truncated, so batch 4 fails
            for p in images:
                p.write_bytes(backup[p][:100])
        return logs

    monkeypatch.setattr(runner, "train_step", step_then_damage)
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"(?s)gta5.images.*iteration 4.*iteration 3.*--resume"):
        train(cfg, "source_only", data, run, progress=False)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 3
    monkeypatch.setattr(runner, "train_step", real)
    for p, b in backup.items():  # the user fixes the files
        p.write_bytes(b)
        os.utime(p)
    train(cfg, "source_only", data, run, resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
