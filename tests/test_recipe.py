"""The toy recipe against the official one: the two ablation bugs, the label-resolution
prototype estimator, per-image strong augmentation, frozen BN statistics in the PSC passes and
the mixed-branch gate. Each test fails on the code before the Fidelity I changes."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from confeti.bench import synthetic_batch
from confeti.config import smoke
from confeti.labels import IGNORE_INDEX
from confeti.prototypes import PrototypeMemory, sample_bilinear
from confeti.selftrain import strong_augment
from confeti.train import TrainState, train_step

DEV = torch.device("cpu")


def _cfg(**kw):
    return dataclasses.replace(smoke(), **kw)


def _late(cfg):
    return max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start, cfg.mix_start) + 1


def _spy_updates(state):
    """Record every PrototypeMemory.update call of ``state`` as (labels, weights, mask)."""
    calls, real = [], state.protos.update

    def update(emb, labels, weights=None, mask=None):
        calls.append((labels.clone(), weights, mask))
        return real(emb, labels, weights=weights, mask=mask)

    state.protos.update = update
    return calls


def _state(method, cfg, seed=0):
    torch.manual_seed(seed)
    return TrainState(cfg, method, DEV)


# ---- bug 1: selftrain+style weighted prototypes by a CAM head that is never trained ----------
def test_prototypes_use_the_cam_only_where_it_is_trained():
    cfg = _cfg()
    batch, t = synthetic_batch(cfg, DEV), _late(cfg)
    for method, cam_expected in (("selftrain+style", False), ("confeti", True)):
        state = _state(method, cfg)
        calls = _spy_updates(state)
        torch.manual_seed(1)
        train_step(state, batch, t)
        assert len(calls) == 1
        _, weights, mask = calls[0]
        assert (weights is not None) == cam_expected, method
        assert mask is None  # after the warm-up: every pixel of the mixed image


# ---- bug 2: `contrast` filtered nothing (or everything) and updated twice ---------------------
def test_contrast_updates_once_with_the_confident_target_pixels():
    cfg = _cfg()
    batch, t = synthetic_batch(cfg, DEV), _late(cfg)
    probe = _state("contrast", cfg)
    debug = {}
    torch.manual_seed(1)
    train_step(copy.deepcopy(probe), batch, t, debug=debug)
    conf = debug["t_conf"]
    thr = float(conf.median())  # half the target pixels are confident
    state = copy.deepcopy(probe)
    state.cfg = dataclasses.replace(cfg, pseudo_threshold=thr)
    calls = _spy_updates(state)
    torch.manual_seed(1)
    train_step(state, batch, t, debug=debug)
    assert len(calls) == 1  # one prototype update per iteration
    labels, _, _ = calls[0]
    b = batch["x_s"].shape[0]
    assert torch.equal(labels[:b], batch["y_s"])
    want = debug["y_t_hat"].masked_fill(debug["t_conf"] < thr, IGNORE_INDEX)
    assert torch.equal(labels[b:], want)
    kept = (labels[b:] != IGNORE_INDEX).float().mean()
    assert 0.2 < kept < 0.8  # per pixel: neither nothing nor everything


# ---- the prototype estimator at label resolution ---------------------------------------------
def test_sample_bilinear_equals_upsampling_the_whole_map():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 5, 4, 6, generator=g)
    up = F.interpolate(emb, size=(32, 48), mode="bilinear", align_corners=False)
    rows = up.permute(0, 2, 3, 1).reshape(-1, 5)
    idx = torch.randint(0, rows.shape[0], (300,), generator=g)
    assert torch.allclose(sample_bilinear(emb, idx, (32, 48)), rows[idx], atol=1e-5)


def test_label_resolution_estimator_is_the_official_one():
    """Upsample features and CAM to the crop, keep the top-k pixels of each class by CAM:
    written out here the slow way, against PrototypeMemory's sampled version."""
    g = torch.Generator().manual_seed(0)
    c, d, k = 3, 4, 7
    emb = torch.randn(2, d, 4, 8, generator=g)
    cam = torch.rand(2, c, 4, 8, generator=g)
    labels = torch.randint(0, c, (2, 32, 64), generator=g)
    labels[:, :3] = IGNORE_INDEX
    mem = PrototypeMemory(c, d, top_k=k)
    mem.update(emb, labels, weights=cam)
    up_e = F.interpolate(emb, size=(32, 64), mode="bilinear").permute(0, 2, 3, 1).reshape(-1, d)
    up_w = F.interpolate(cam, size=(32, 64), mode="bilinear").permute(0, 2, 3, 1).reshape(-1, c)
    lab = labels.reshape(-1)
    for cls in range(c):
        idx = torch.nonzero(lab == cls).squeeze(1)
        w, top = up_w[idx, cls].topk(k)
        mu = (w[:, None] * up_e[idx[top]]).sum(0) / w.sum()
        assert torch.allclose(mem.protos[cls], F.normalize(mu, dim=0), atol=1e-5)
    # the feature-resolution variant selects among 2*4*8 = 64 cells only: another estimate
    cheap = PrototypeMemory(c, d, top_k=k, resolution="feature")
    cheap.update(emb, labels, weights=cam)
    assert not torch.allclose(cheap.protos, mem.protos, atol=1e-3)


# ---- strong augmentation per image --------------------------------------------------------------
def test_strong_augmentation_draws_new_parameters_for_every_image():
    x = torch.randn(1, 3, 16, 32).repeat(4, 1, 1, 1)  # four copies of one image
    out = strong_augment(x, torch.Generator().manual_seed(0), jitter_p=1.0, blur_p=1.0)
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4))


# ---- BatchNorm statistics and the PSC passes -------------------------------------------------
def _bn_stats(module):
    return [b.clone() for n, b in module.named_buffers() if "running" in n]


def test_the_psc_passes_leave_the_batchnorm_statistics_alone():
    cfg = _cfg()
    batch = synthetic_batch(cfg, DEV)
    stats = {}
    for w in (0.1, 0.0):
        state = _state("style", dataclasses.replace(cfg, psc_weight=w))
        for t in range(2):  # t = 0 fills the prototypes, t = 1 runs the PSC (if w > 0)
            torch.manual_seed(t)
            logs = train_step(state, batch, t)
        assert ("psc" in logs) == (w > 0)
        stats[w] = _bn_stats(state.student)
    assert all(torch.equal(a, b) for a, b in zip(stats[0.1], stats[0.0]))


# ---- the mixed-branch gate -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["selftrain", "confeti"])
def test_the_mixed_branch_waits_for_its_gate(method):
    cfg = _cfg(mix_start=5)
    batch = synthetic_batch(cfg, DEV)
    state = _state(method, cfg)
    assert "seg_mix" not in train_step(state, batch, 4)
    assert "seg_mix" in train_step(state, batch, 5)


# ---- fda: a training-free translation baseline ---------------------------------------------------
def test_fda_swaps_the_low_frequency_amplitude_and_keeps_the_phase():
    from confeti.datasets import denormalize, normalize
    from confeti.fda import fda_transfer, low_freq_window

    g = torch.Generator().manual_seed(0)
    src = torch.rand(2, 3, 32, 64, generator=g) * 0.5 + 0.25
    tgt = (torch.rand(2, 3, 32, 64, generator=g) * 0.3 + 0.1).flip(0)
    out = denormalize(fda_transfer(normalize(src), normalize(tgt), beta=0.1))
    assert low_freq_window(32, 64, 0.1) == 3
    # the mean colour (frequency 0) is the target's; the fine detail (the phase) the source's
    assert torch.allclose(out.mean((2, 3)), tgt.mean((2, 3)), atol=2e-3)
    hi = lambda x: x - torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)  # noqa: E731
    corr = torch.corrcoef(torch.stack([hi(out).flatten(), hi(src).flatten()]))[0, 1]
    assert corr > 0.9
    same = denormalize(fda_transfer(normalize(src), normalize(src), beta=0.1))
    assert torch.allclose(same, src, atol=1e-4)  # its own spectrum: unchanged


def test_the_fda_method_trains_on_translated_source_without_self_training():
    cfg = _cfg()
    state = _state("fda", cfg)
    debug = {}
    logs = train_step(state, synthetic_batch(cfg, DEV), 0, debug=debug)
    assert set(logs) == {"seg_src"} and state.teacher is None and state.style is None
    assert not torch.allclose(debug["x_s2t"], debug["x_s"])
