import dataclasses

import pytest

from confeti.__main__ import build_config
from confeti.config import Config, ema_alpha_for, get_preset, paper, scale_schedule, smoke, toy


def test_paper_preset_matches_the_official_code():
    c = paper()
    assert c.backbone == "resnet101" and c.aspp_dilations == (6, 12, 18, 24)
    assert c.crop_size == (512, 512) and c.batch_size == 2 and c.iters == 40_000
    assert c.lr == 6e-5 and c.head_lr_mult == 10 and c.warmup_iters == 1500
    assert c.ema_alpha == 0.999 and c.proto_momentum == 0.999 and c.tau == 0.1
    assert (c.proto_warmup_iters, c.contrast_start, c.cam_mix_start) == (3000, 3000, 2000)


def test_scale_schedule_keeps_fractions_not_time_constants():
    c = scale_schedule(paper(), 4000)
    assert c.contrast_start == 300 and c.warmup_iters == 150 and c.cam_mix_start == 200
    assert c.ema_alpha == 0.999 and c.proto_momentum == 0.999  # not tied to the run length
    t = toy()
    assert scale_schedule(t, 4 * t.iters).contrast_start == 4 * t.contrast_start
    assert ema_alpha_for(2975, 2) == pytest.approx(0.999)  # the paper's teacher
    assert 1 / (1 - t.ema_alpha) == pytest.approx(168, abs=1)  # the same share of a pass


def test_toy_recipe_is_the_papers_where_it_can_be():
    t = toy()
    assert t.pseudo_threshold == 0.968 and t.tau == 0.1 and t.proto_top_k == 32
    assert (t.contrast_weight, t.reg_weight, t.cam_weight, t.psc_weight) == (0.5, 2.0, 1.0, 0.1)
    assert t.proto_resolution == "label" and t.psc_judge == "student"
    f = t.iters / 40_000
    assert t.contrast_start == round(3000 * f) and t.cam_mix_start == round(2000 * f)
    assert t.mix_start == round(0.075 * t.iters)


def test_presets_roundtrip_through_json():
    for c in (smoke(), toy(), paper()):
        again = Config.from_dict(dataclasses.asdict(c))
        assert again == c


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match="smoke"):
        get_preset("tiny")
    with pytest.raises(ValueError, match="unknown config field"):
        Config.from_dict({"lrr": 1})
    with pytest.raises(SystemExit, match="Did you mean lr"):
        build_config("smoke", overrides=["lrr=0.1"])
    with pytest.raises(SystemExit, match="expected a value of type"):
        build_config("smoke", overrides=["batch_size=two"])
    with pytest.raises(SystemExit, match="divisible by 8"):
        build_config("smoke", overrides=["crop_size=30,60"])


def test_overrides_parse_types():
    c = build_config("smoke", iters=20, seed=3, overrides=["crop_size=32x64", "amp=false"])
    assert c.crop_size == (32, 64) and c.amp is False and c.seed == 3 and c.iters == 20
