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


# ---- the gap's parts (the knobs the benchmark's calibration turns) ------------------------------
def test_gap_knobs_name_the_bad_knob_and_range():
    from confeti.toystreets import APPEARANCE_STRENGTH, WITHIN_CLASS, gap_knobs

    assert gap_knobs()["colour_gap"] == 1.0 and gap_knobs()["within_class"] == WITHIN_CLASS
    with pytest.raises(ValueError, match="colour_gaps"):
        gap_knobs(colour_gaps=0.5)
    with pytest.raises(ValueError, match=r"layout_gap=1.5 must lie in \[0, 1\]"):
        gap_knobs(layout_gap=1.5)
    top = 1 / APPEARANCE_STRENGTH["texture"]
    with pytest.raises(ValueError, match=rf"texture_gap={top + 1} must lie in \[0, {top:.4g}\]"):
        gap_knobs(texture_gap=top + 1)


def test_an_appearance_part_above_one_moves_towards_the_extreme_look_and_stops_there():
    from confeti.toystreets import _LOOK, APPEARANCE_STRENGTH, domain_params

    strength = APPEARANCE_STRENGTH["sensor"]
    top = 1.0 / strength
    half = (1 + top) / 2  # halfway between the default and the extreme look
    base, mid = domain_params("city")["look"], domain_params("city", sensor_gap=half)["look"]
    far = domain_params("city", sensor_gap=top)["look"]
    for k in ("noise", "blur", "vignette"):
        game, city = _LOOK["game"][k], _LOOK["city"][k]
        assert base[k] == pytest.approx(game + (city - game) * strength)
        assert mid[k] == pytest.approx(game + (city - game) * half * strength)
        assert far[k] == pytest.approx(city)  # the extreme look, not beyond it
    assert far["sat"] == base["sat"]  # colour untouched


def test_each_part_of_the_gap_moves_only_its_own_values():
    from confeti.toystreets import domain_params

    game, city = domain_params("game"), domain_params("city")
    no_colour = domain_params("city", colour_gap=0.0)
    assert np.allclose(no_colour["materials"]["sky"], game["materials"]["sky"])
    assert np.allclose(no_colour["look"]["sat"], city["look"]["sat"])  # the tone stays
    no_tone = domain_params("city", tone_gap=0.0)
    assert np.allclose(no_tone["look"]["sat"], game["look"]["sat"])
    assert np.allclose(no_tone["look"]["cast"], game["look"]["cast"])
    assert np.allclose(no_tone["materials"]["sky"], city["materials"]["sky"])
    assert np.allclose(no_colour["look"]["noise"], city["look"]["noise"])  # the sensor stays
    assert np.allclose(no_colour["tex_fine"], city["tex_fine"])  # and the texture
    no_tex = domain_params("city", texture_gap=0.0)
    assert np.allclose(no_tex["tex_fine"], game["tex_fine"])
    assert np.allclose(no_tex["materials"]["sky"], city["materials"]["sky"])
    no_sensor = domain_params("city", sensor_gap=0.0)
    assert no_sensor["look"]["noise"] == 0.0 and no_sensor["look"]["blur"] == 0.0
    assert no_sensor["look"]["sun"] == city["look"]["sun"]
    no_freq = domain_params("city", frequency_gap=0.0)
    assert no_freq["content"]["n_persons"] == game["content"]["n_persons"]
    assert no_freq["content"]["horizon"] == city["content"]["horizon"]  # the layout stays
    no_layout = domain_params("city", layout_gap=0.0)
    assert no_layout["content"]["cam_h"] == game["content"]["cam_h"]
    assert no_layout["content"]["n_persons"] == city["content"]["n_persons"]
    assert domain_params("city", within_class=0.5)["hue"] == 0.5
    assert domain_params("game", within_class=0.5)["hue"] == 0.0  # a city property
    assert domain_params("city", 0.0, within_class=0.5)["hue"] == 0.0  # no appearance gap at all


def test_within_class_variation_gives_objects_of_one_class_different_colours():
    from confeti.toystreets import BUILDING, class_colour_stats, sample_scenes

    def chroma_spread(within_class):
        imgs, labs = sample_scenes("city", 8, within_class=within_class)
        st = np.stack([class_colour_stats(imgs[i : i + 1], labs[i : i + 1]) for i in range(8)])
        chroma = st[:, BUILDING] / st[:, BUILDING].sum(-1, keepdims=True)  # colour, not brightness
        return float(chroma.std(axis=0).mean())

    assert chroma_spread(0.5) > 3 * chroma_spread(0.0)


def test_write_toystreets_records_the_knobs(tmp_path):
    from confeti.toystreets import VERSION, WITHIN_CLASS, write_toystreets

    s = write_toystreets(tmp_path, n_source=2, n_target_train=2, n_target_val=1, height=32,
                         width=64, progress=False, workers=1, texture_gap=0.25)  # fmt: skip
    meta = json.loads((tmp_path / "toystreets.json").read_text())
    assert meta["texture_gap"] == 0.25 and meta["within_class"] == WITHIN_CLASS
    assert s["colour_gap"] == 1.0 and meta["version"] == VERSION


def test_version_1_of_the_benchmark_stays_reachable_through_the_knobs():
    """Version 1 put every appearance part at 0.3 of the extreme look and had no within-class
    variation; the same knobs give its scenes byte for byte (digest taken at version 1)."""
    from confeti.toystreets import APPEARANCE_PARTS, APPEARANCE_STRENGTH

    v1 = {f"{k}_gap": 0.3 / APPEARANCE_STRENGTH[k] for k in APPEARANCE_PARTS} | {"within_class": 0}
    h = hashlib.sha256()
    for dom in ("game", "city"):
        im, lab = sample_scenes(dom, 4, seed=2, height=32, width=64, **v1)
        h.update(im.tobytes() + lab.tobytes())
    assert h.hexdigest() == "8d6ecdd91c9d25363576c07d2fdb6a5ee39c51733dd538f35e918d7b10aa09ac"
