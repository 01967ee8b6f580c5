import math

import torch
import torch.nn.functional as F

from confeti.prototypes import (
    CAMHead,
    ProjectionHead,
    PrototypeMemory,
    cam_loss,
    class_presence,
    similarity,
)


def _emb(vectors, h=1):
    """(N, D) vectors -> (1, D, h, N/h) embedding map (pixels in row-major order)."""
    v = torch.tensor(vectors, dtype=torch.float32)
    return v.t().reshape(1, v.shape[1], h, -1)


def _lab(ids, h=1):
    return torch.tensor(ids, dtype=torch.long).reshape(1, h, -1)


def test_first_observation_replaces_then_the_ramp_gives_one_half_and_two_thirds():
    mem = PrototypeMemory(3, 2, momentum=0.9, top_k=10)
    assert mem.update(_emb([[3.0, 0.0]]), _lab([0])) == {0: 1}
    assert torch.allclose(mem.protos[0], torch.tensor([1.0, 0.0]))  # replaced, normalised
    assert (mem.protos[1:] == 0).all() and mem.counts.tolist() == [1, 0, 0]
    mem.update(_emb([[0.0, 2.0]]), _lab([0]))
    p1 = F.normalize(torch.tensor([0.5, 0.5]), dim=0)  # m = min(1 - 1/2, 0.9) = 0.5
    assert torch.allclose(mem.protos[0], p1)
    mem.update(_emb([[0.0, 1.0]]), _lab([0]))
    m = 2 / 3  # min(1 - 1/3, 0.9)
    assert torch.allclose(
        mem.protos[0], F.normalize(m * p1 + (1 - m) * torch.tensor([0.0, 1.0]), dim=0)
    )
    assert mem.counts.tolist() == [3, 0, 0]


def test_momentum_caps_the_ramp_and_ramp_false_is_constant():
    capped = PrototypeMemory(1, 2, momentum=0.6)  # ramp 0.5, then min(2/3, 0.6) = 0.6
    const = PrototypeMemory(1, 2, momentum=0.6, ramp=False)  # replace, then 0.6, 0.6
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for mem in (capped, const):
        for v in (x, y, y):
            mem.update(v.view(1, 2, 1, 1), _lab([0]))
    p = F.normalize(0.5 * x + 0.5 * y, dim=0)
    assert torch.allclose(capped.protos[0], F.normalize(0.6 * p + 0.4 * y, dim=0))
    q = F.normalize(0.6 * x + 0.4 * y, dim=0)
    assert torch.allclose(const.protos[0], F.normalize(0.6 * q + 0.4 * y, dim=0))


def test_rows_stay_unit_norm_or_zero_and_an_update_moves_towards_the_batch_mean():
    torch.manual_seed(0)
    mem = PrototypeMemory(5, 8, momentum=0.5)
    for _ in range(4):
        mem.update(torch.randn(2, 8, 4, 4), torch.randint(0, 4, (2, 4, 4)))  # class 4 unseen
    norms = mem.protos.norm(dim=1)
    assert torch.allclose(norms[:4], torch.ones(4), atol=1e-5) and norms[4] == 0
    target = F.normalize(torch.ones(8), dim=0)
    before = float(mem.protos[0] @ target)
    mem.update(target.view(1, 8, 1, 1).repeat(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert float(mem.protos[0] @ target) > before


def test_top_k_keeps_the_largest_weights_and_ignore_is_dropped():
    emb = _emb([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -5.0]])
    labels = _lab([0, 0, 0, 255])  # the ignored pixel has the largest weight of all
    weights = torch.zeros(1, 2, 1, 4)
    weights[0, 0] = torch.tensor([0.1, 0.9, 0.5, 1.0])
    top2 = PrototypeMemory(2, 2, top_k=2)
    assert top2.update(emb, labels, weights=weights) == {0: 2}
    mu = 0.9 * torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor([1.0, 1.0])  # pixels 1 and 2
    assert torch.allclose(top2.protos[0], F.normalize(mu, dim=0))
    everything = PrototypeMemory(2, 2, top_k=100)
    everything.update(emb, labels, weights=weights)
    mu_all = 0.1 * torch.tensor([1.0, 0.0]) + mu
    assert torch.allclose(everything.protos[0], F.normalize(mu_all, dim=0))
    assert not torch.allclose(top2.protos[0], everything.protos[0], atol=1e-3)


def test_top_k_with_ties_keeps_k_pixels_and_zero_weight_classes_are_skipped():
    mem = PrototypeMemory(2, 2, top_k=2)
    emb = _emb([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    weights = torch.ones(1, 2, 1, 4)
    weights[0, 1] = 0.0  # class 1 has weight 0 everywhere: skipped, its count stays 0
    updated = mem.update(emb, _lab([0, 0, 0, 1]), weights=weights)
    assert updated == {0: 2} and mem.counts.tolist() == [1, 0]
    # two of the three tied pixels: the mean of two of [1, 0], [1, 0], [0, 1]
    means = [torch.tensor([1.0, 0.0]), F.normalize(torch.tensor([1.0, 1.0]), dim=0)]
    assert any(torch.allclose(mem.protos[0], m, atol=1e-6) for m in means)
    assert (mem.protos[1] == 0).all()


def test_mask_and_full_resolution_labels():
    mem = PrototypeMemory(2, 2, top_k=5)
    emb = _emb([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mem.update(emb, _lab([0, 0, 0]), mask=torch.tensor([[[True, False, False]]]))
    assert torch.allclose(mem.protos[0], torch.tensor([1.0, 0.0]))
    # resolution="feature": labels at 2x the feature resolution are resized (nearest) to the
    # feature grid inside: (1, 2, 6) -> (1, 1, 3)
    full = PrototypeMemory(2, 2, top_k=5, resolution="feature")
    full.update(emb, torch.tensor([[[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]]))
    assert full.counts.tolist() == [1, 1]
    assert torch.allclose(full.protos[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(full.protos[0], torch.tensor([0.0, 1.0]))


def test_counts_are_saved_and_restored_and_get_is_a_detached_copy():
    mem = PrototypeMemory(2, 2)
    mem.update(_emb([[1.0, 0.0]]), _lab([1]))
    state = mem.state_dict()
    assert set(state) == {"protos", "counts"} and state["counts"].tolist() == [0, 1]
    other = PrototypeMemory(2, 2)
    other.load_state_dict(state)
    assert other.counts.tolist() == [0, 1] and torch.equal(other.protos, mem.protos)
    got = mem.get()
    got.add_(1.0)
    assert not got.requires_grad and mem.protos[0].abs().sum() == 0  # a copy


def test_cam_loss_by_hand_and_heads():
    cam = torch.zeros(1, 2, 1, 2)
    cam[0, 0] = torch.tensor([1.0, 3.0])  # GAP = 2 for class 0, 0 for class 1
    labels = torch.tensor([[[0, 255]]])  # class 0 present, class 1 absent (255 never counts)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2)) / 2  # BCE(2, 1), BCE(0, 0)
    assert math.isclose(float(cam_loss(cam, labels, 2)), expected, rel_tol=1e-6)
    full = torch.tensor([[[0, 0, 255, 255]] * 4])  # labels at another resolution: same loss
    assert math.isclose(float(cam_loss(cam, full, 2)), expected, rel_tol=1e-6)
    assert math.isclose(float(cam_loss(cam, torch.tensor([[[0, 1]]]), 2, ignore_index=1)), expected, rel_tol=1e-6)  # fmt: skip
    f = torch.randn(2, 16, 4, 4)
    assert ProjectionHead(16, 8)(f).shape == (2, 8, 4, 4)
    assert CAMHead(16, 19)(f).shape == (2, 19, 4, 4)
    assert ProjectionHead(16, 8).conv.bias is None and CAMHead(16, 19).conv.bias is None
    protos = F.normalize(torch.randn(19, 8), dim=1)
    s = similarity(torch.randn(2, 8, 4, 4), protos)
    assert s.shape == (2, 19, 4, 4) and s.abs().max() <= 1 + 1e-5


def test_feature_figures_build():
    import matplotlib.pyplot as plt

    from confeti import plots

    sims = similarity(torch.randn(1, 4, 4, 8), F.normalize(torch.randn(19, 4), dim=1))[0, [0, 13]]
    figs = [
        plots.plot_contrast_toy_2d(tau=0.5),
        plots.plot_prototype_similarity(sims, torch.randn(3, 32, 64), classes=[0, 13]),
        plots.plot_prototype_alignment({"iter": [0, 10], "road": [0.1, 0.8], "car": [None, 0.5]}),
    ]
    assert len(figs[0].axes) == 3 and len(figs[2].axes[0].lines) == 3  # 2 classes + the mean
    for fig in figs:
        plt.close(fig)


def test_class_presence_marks_exactly_the_classes_present():
    labels = torch.tensor([[[0, 0, 255], [3, 3, 3]], [[255, 255, 255], [1, 18, 1]]])
    z = class_presence(labels, num_classes=19)
    assert z.shape == (2, 19) and z.dtype == torch.float32
    assert torch.nonzero(z[0]).flatten().tolist() == [0, 3]  # ignore (255) is not a class
    assert torch.nonzero(z[1]).flatten().tolist() == [1, 18]
    assert class_presence(torch.full((1, 4, 4), 255), 19).sum() == 0
