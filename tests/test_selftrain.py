"""Tests of the DACS/DAFormer self-training parts: EMA, pseudo-labels, ClassMix, augmentation, FD."""

import colorsys
import math

import pytest
import torch
from torch import nn

from confeti.datasets import normalize
from confeti.labels import IGNORE_INDEX
from confeti.selftrain import (
    blur_kernel_size,
    class_mix_masks,
    color_jitter,
    ema_update,
    feature_distance,
    gaussian_blur,
    hsv_to_rgb,
    mix,
    mix_weights,
    pseudo_label,
    rgb_to_hsv,
    strong_augment,
    thing_cell_mask,
)


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


# ---- EMA -----------------------------------------------------------------------------------
def test_ema_first_update_copies_then_averages_params_only():
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    teacher[1].running_mean.fill_(7.0)
    assert ema_update(teacher, student, 0, 0.999) == 0.0
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p_t, p_s)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student[1].running_mean.fill_(-3.0)
    assert ema_update(teacher, student, 1, 0.999) == 0.5  # α_1 = min(1 − 1/2, 0.999)
    for p_t, b, p_s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(p_t, 0.5 * b + 0.5 * p_s)
        assert torch.allclose(p_t, b + 0.5)
    assert torch.all(teacher[1].running_mean == 7.0)  # buffers neither averaged nor copied
    assert ema_update(teacher, student, 10**6, 0.99) == 0.99  # capped at α


# ---- pseudo-labels ---------------------------------------------------------------------------
def test_pseudo_label_quality_and_labels():
    # 1 image, 3 classes, 2x2 pixels: three confident pixels (p ≈ 0.9999), one uncertain
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 10.0
    logits[0, 1, 0, 1] = 10.0
    logits[0, 2, 1, 0] = 10.0
    logits[0, 1, 1, 1] = 0.5  # softmax max ≈ 0.45 < 0.968
    labels, weights, q = pseudo_label(logits, 0.968, 0, 0)
    assert labels.dtype == torch.long and labels.tolist() == [[[0, 1], [2, 1]]]
    assert q == pytest.approx(0.75)
    assert torch.allclose(weights, torch.full((1, 2, 2), 0.75))


def test_pseudo_label_ignore_bands():
    logits = torch.zeros(2, 3, 10, 4)
    logits[:, 0] = 10.0  # all confident -> q = 1
    _, w, q = pseudo_label(logits, 0.968, ignore_top=2, ignore_bottom=3)
    assert q == 1.0 and w.shape == (2, 10, 4)
    assert torch.all(w[:, :2] == 0) and torch.all(w[:, -3:] == 0) and torch.all(w[:, 2:7] == 1)


# ---- ClassMix ------------------------------------------------------------------------------
def _labels():
    y = torch.full((2, 8, 8), IGNORE_INDEX, dtype=torch.long)
    y[0, :4, :4], y[0, :4, 4:], y[0, 4:, :4] = 0, 5, 13  # image 0: {0, 5, 13} + 255
    y[1, :, :4], y[1, :, 4:6] = 2, 11  # image 1: {2, 11} + 255
    return y


def test_class_mix_masks_pick_half_of_own_classes():
    y = _labels()
    for seed in range(10):
        m = class_mix_masks(y, torch.Generator().manual_seed(seed))
        assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(m[y == IGNORE_INDEX] == 0)  # 255 never pasted
        for i, n in ((0, 3), (1, 2)):
            chosen = {c for c in y[i].unique().tolist() if c != IGNORE_INDEX and m[i][y[i] == c].all()}  # fmt: skip
            assert len(chosen) == math.ceil(n / 2)
            for c in y[i].unique().tolist():  # every class fully in or fully out
                assert m[i][y[i] == c].unique().numel() == 1
    a = class_mix_masks(y, torch.Generator().manual_seed(3))
    b = class_mix_masks(y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    empty = torch.full((1, 4, 4), IGNORE_INDEX, dtype=torch.long)
    assert class_mix_masks(empty).sum() == 0


def test_mix_labels_weights_images_consistent():
    y_s = _labels()
    y_t = torch.randint(0, 19, y_s.shape)
    w_t = torch.full(y_s.shape, 0.3)
    m = class_mix_masks(y_s, torch.Generator().manual_seed(0))
    y_m, w_m = mix(y_s, y_t, m), mix_weights(m, w_t)
    assert y_m.dtype == torch.long
    on = m.bool()
    assert torch.equal(y_m[on], y_s[on]) and torch.equal(y_m[~on], y_t[~on])
    assert torch.all(w_m[on] == 1) and torch.all(w_m[~on] == 0.3)
    assert torch.equal(w_m, mix(torch.ones_like(w_t), w_t, m))
    x_a, x_b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    x_m = mix(x_a, x_b, m)
    on3 = on.unsqueeze(1).expand_as(x_a)
    assert torch.equal(x_m[on3], x_a[on3]) and torch.equal(x_m[~on3], x_b[~on3])


# ---- strong augmentation -------------------------------------------------------------------
def _image(b=2, h=16, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.rand(b, 3, h, w, generator=g) * 0.8 + 0.1)


def test_strong_augment_identity_and_determinism():
    x = _image()
    assert torch.equal(strong_augment(x, torch.Generator().manual_seed(0), 0.0, 0.2, 0.0), x)
    a = strong_augment(x, torch.Generator().manual_seed(5), 1.0, 0.2, 1.0)
    b = strong_augment(x, torch.Generator().manual_seed(5), 1.0, 0.2, 1.0)
    assert torch.equal(a, b) and a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, x)
    outs = [strong_augment(x, torch.Generator().manual_seed(s)) for s in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # seeds differ


def test_blur_reduces_high_frequencies():
    x = _image(h=32, w=32)
    assert blur_kernel_size(512, 1024) == 51 and blur_kernel_size(640, 640) == 63
    assert blur_kernel_size(16, 32) == 3
    y = gaussian_blur(x, 1.0, blur_kernel_size(32, 32))
    hf = lambda z: (z[..., 1:, :] - z[..., :-1, :]).pow(2).mean()  # noqa: E731
    assert y.shape == x.shape and hf(y) < 0.5 * hf(x)
    assert torch.allclose(y.mean(), x.mean(), atol=0.05)  # kernel sums to 1
    const = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(gaussian_blur(const, 1.0, 5), const)


def test_color_jitter_parts():
    x = torch.rand(2, 3, 8, 8) * 0.6 + 0.2
    assert torch.allclose(color_jitter(x, 1.0, 1.0, 1.0, 0.0), x)
    assert color_jitter(x, 1.2, 1.0, 1.0, 0.0).mean() > x.mean()  # brighter
    assert color_jitter(x, 0.8, 1.0, 1.0, 0.0).mean() < x.mean()  # darker
    assert color_jitter(x, 1.0, 0.5, 1.0, 0.0).std() < x.std()  # less contrast
    grey = color_jitter(x, 1.0, 1.0, 0.0, 0.0)  # saturation 0 -> grey
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.allclose(color_jitter(x, 1.0, 1.0, 1.0, 1.0), x, atol=1e-5)  # a full turn


def test_hsv_matches_colorsys_and_round_trips():
    x = torch.rand(1, 3, 4, 5)
    x[0, :, 0, 0] = 0.5  # a grey pixel
    hsv = rgb_to_hsv(x)
    for i in range(4):
        for j in range(5):
            ref = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            assert torch.allclose(hsv[0, :, i, j], torch.tensor(ref), atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = color_jitter(red, 1.0, 1.0, 1.0, 1 / 3)  # +120° hue: red -> green
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


# ---- ImageNet feature distance ---------------------------------------------------------------
def _fd_case():
    # 8x8 labels, features on a 2x2 grid of 4x4 cells
    y = torch.zeros(1, 8, 8, dtype=torch.long)  # road (stuff) everywhere
    y[0, :4, :4] = 13  # cell (0,0): car, 100 % -> selected
    y[0, :4, 4:] = 11
    y[0, :2, 4:6] = 0  # cell (0,1): person 12/16 = 75 % -> selected at ratio 0.75, not 0.8
    y[0, 4:, :4] = 13
    y[0, 4:, :2] = IGNORE_INDEX  # cell (1,0): car 50 %, ignore 50 % -> excluded
    f_s = torch.zeros(1, 2, 2, 2, requires_grad=True)
    f_in = torch.zeros(1, 2, 2, 2)
    with torch.no_grad():
        f_s[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # ‖(3, 4)‖ = 5
        f_s[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # ‖(6, 8)‖ = 10
        f_s[0, :, 1, 1] = torch.tensor([100.0, 0.0])  # road cell: never selected
    f_in.requires_grad_(True)
    return y, f_s, f_in


def test_feature_distance_hand_computed():
    y, f_s, f_in = _fd_case()
    mask = thing_cell_mask(y, (2, 2), ratio=0.8)
    assert mask.tolist() == [[[True, False], [False, False]]]
    loss = feature_distance(f_s, f_in, y, ratio=0.8)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert f_in.grad is None  # f_imnet is detached
    assert torch.allclose(f_s.grad[0, :, 0, 0], torch.tensor([0.6, 0.8]))  # d‖v‖/dv = v/‖v‖
    assert torch.all(f_s.grad[0, :, 1] == 0) and torch.all(f_s.grad[0, :, 0, 1] == 0)
    # at ratio 0.75 the person cell (12/16) qualifies: mean(5, 10)
    assert feature_distance(f_s, f_in, y, ratio=0.75).item() == pytest.approx(7.5)


def test_feature_distance_empty_is_zero_and_connected():
    f_s = torch.randn(1, 4, 2, 2, requires_grad=True)
    y = torch.zeros(1, 8, 8, dtype=torch.long)  # only road: no thing cell
    loss = feature_distance(f_s, torch.randn(1, 4, 2, 2), y)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.isfinite(f_s.grad).all() and torch.all(f_s.grad == 0)


# ---- debug figure ---------------------------------------------------------------------------
def test_plot_train_step_draws_every_panel():
    from confeti.plots import plot_train_step

    y = _labels()
    m = class_mix_masks(y, torch.Generator().manual_seed(0))
    x = _image(h=8, w=8)
    panels = {"source": x, "target": x, "pseudo-label": y, "mask": m, "mixed": mix(x, x, m),
              "mixed label": mix(y, y, m), "weights": mix_weights(m, torch.full_like(m, 0.4))}  # fmt: skip
    fig = plot_train_step(panels)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == list(panels) and len(fig.axes) == 8 + 2  # 2x4 grid + 2 colourbars
