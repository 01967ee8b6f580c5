"""ToyStreets: determinism, every class present, a measurable gap that the knobs remove."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from confeti.datasets import CityscapesDataset, GTA5Dataset
from confeti.labels import LABEL_ID_OF_TRAIN_ID, NUM_CLASSES
from confeti.toystreets import (
    class_colour_stats,
    class_frequencies,
    render_scene,
    sample_scenes,
    write_toystreets,
)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_render_shapes_and_label_ids():
    rgb, ids = render_scene(np.random.default_rng(0), "city", height=32, width=64)
    assert rgb.shape == (32, 64, 3) and rgb.dtype == np.uint8
    assert ids.shape == (32, 64) and ids.dtype == np.uint8
    allowed = set(LABEL_ID_OF_TRAIN_ID.tolist()) | {0, 1}  # + unlabeled, ego vehicle
    assert set(np.unique(ids).tolist()) <= allowed
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), "mars")


def test_write_is_deterministic_and_readable(tmp_path):
    kw = dict(n_source=3, n_target_train=2, n_target_val=2, height=16, width=32, progress=False)
    summary = write_toystreets(tmp_path / "a", seed=5, workers=1, **kw)
    write_toystreets(tmp_path / "b", seed=5, workers=2, **kw)
    write_toystreets(tmp_path / "c", seed=6, workers=1, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert json.loads((tmp_path / "a" / "toystreets.json").read_text())["seed"] == 5
    assert summary["n_target_val"] == 2
    assert Image.open(tmp_path / "a" / "gta5" / "labels" / "00000.png").mode == "P"
    gta, val = GTA5Dataset(tmp_path / "a" / "gta5"), CityscapesDataset(tmp_path / "a" / "cityscapes", "val")  # fmt: skip
    assert len(gta) == 3 and len(val) == 2
    x, y = val[1]
    assert x.shape == (3, 16, 32) and int(y.max()) <= 255


def test_every_class_occurs_long_tailed():
    freq = {}
    for domain in ("game", "city"):
        _, ids = sample_scenes(domain, 200, seed=1, height=64, width=128)
        freq[domain] = class_frequencies(ids)
        assert (freq[domain] > 0).all(), f"{domain}: missing classes {np.flatnonzero(freq[domain] == 0)}"  # fmt: skip
        big, rare = freq[domain][[0, 2, 8, 10]], freq[domain][[12, 16, 17]]  # road/building/veg/sky
        assert big.min() > 10 * rare.max()
    assert abs(freq["game"].sum() - 1) < 1e-9


def _colour_gap(a_gap, c_gap, n=40):
    src = sample_scenes("game", n, seed=2, height=32, width=64)
    tgt = sample_scenes("city", n, seed=3, appearance_gap=a_gap, content_gap=c_gap, height=32, width=64)  # fmt: skip
    ms, mt = class_colour_stats(*src), class_colour_stats(*tgt)
    big = [0, 1, 2, 8, 10, 13]  # classes frequent enough for a stable mean
    return float(np.linalg.norm(ms[big] - mt[big], axis=1).mean()), src, tgt


def test_domains_differ_and_knobs_remove_the_gap():
    full, _, _ = _colour_gap(1.0, 1.0)
    none, src, tgt = _colour_gap(0.0, 0.0)
    half, _, _ = _colour_gap(0.5, 1.0)
    assert full > 0.12  # mean RGB distance per class, RGB in [0, 1]
    assert none < 0.04 and none < half < full
    # gap 0: also the content matches (class frequencies of the same generator)
    f_s, f_t = class_frequencies(src[1]), class_frequencies(tgt[1])
    assert np.abs(f_s - f_t).sum() < 0.15
    assert len(f_s) == NUM_CLASSES
