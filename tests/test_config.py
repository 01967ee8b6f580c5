import dataclasses

import pytest

from confeti.__main__ import build_config
from confeti.config import Config, get_preset, paper, scale_schedule, smoke, toy


def test_paper_preset_matches_the_official_code():
    c = paper()
    assert c.backbone == "resnet101" and c.aspp_dilations == (6, 12, 18, 24)
    assert c.crop_size == (512, 512) and c.batch_size == 2 and c.iters == 40_000
    assert c.lr == 6e-5 and c.head_lr_mult == 10 and c.warmup_iters == 1500
    assert c.ema_alpha == 0.999 and c.proto_momentum == 0.999 and c.tau == 0.1
    assert (c.proto_warmup_iters, c.contrast_start, c.cam_mix_start) == (3000, 3000, 2000)


def test_scale_schedule_keeps_fractions():
    c = scale_schedule(paper(), 4000)
    assert c.contrast_start == 300 and c.warmup_iters == 150 and c.cam_mix_start == 200
    assert abs(c.ema_alpha - 0.99) < 1e-12  # time constant 1000 * 0.1 = 100 iterations
    assert scale_schedule(paper(), 40_000).ema_alpha == pytest.approx(0.999)


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
