import math

import pytest
import torch
import torch.nn.functional as F

from confeti.contrast import frozen, make_adapter, pixel_prototype_contrast, semantic_consistency


def test_equal_similarities_give_weight_times_ln_c():
    emb = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 19, (2, 3, 3))
    out = pixel_prototype_contrast(emb, labels, torch.zeros(19, 4), weight=0.5, reg_weight=2.0)
    assert math.isclose(out["ce"].item(), 0.5 * math.log(19), rel_tol=1e-6)
    # uniform pi: reg_weight * sum_k log(1/C) / (C ln C) = -reg_weight exactly
    assert math.isclose(out["reg"].item(), -2.0, rel_tol=1e-6)
    ortho = torch.zeros(1, 4, 1, 2)
    ortho[0, 3] = 1.0  # embeddings orthogonal to every prototype in span(e0, e1, e2)
    out = pixel_prototype_contrast(ortho, torch.tensor([[[0, 2]]]), torch.eye(3, 4), weight=1.0)
    assert math.isclose(out["ce"].item(), math.log(3), rel_tol=1e-6)


def test_ce_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # v~ = (0.6, 0.8)
    out = pixel_prototype_contrast(emb, torch.tensor([[[0]]]), protos, tau=0.5, weight=0.5)
    logits = torch.tensor([0.6, 0.8]) / 0.5
    assert math.isclose(out["ce"].item(), -0.5 * float(F.log_softmax(logits, 0)[0]), rel_tol=1e-6)


def test_own_prototype_beats_another_and_the_regulariser_bound():
    protos = torch.eye(3, 4)
    emb = protos[0].view(1, 4, 1, 1)
    own = pixel_prototype_contrast(emb, torch.tensor([[[0]]]), protos, weight=1.0)
    other = pixel_prototype_contrast(emb, torch.tensor([[[1]]]), protos, weight=1.0)
    assert own["ce"].item() < other["ce"].item()
    assert own["reg"].item() < -2.0  # strictly below the uniform value
    torch.manual_seed(0)
    for _ in range(5):
        out = pixel_prototype_contrast(
            torch.randn(1, 4, 2, 2),
            torch.randint(0, 5, (1, 2, 2)),
            F.normalize(torch.randn(5, 4), dim=1),
            reg_weight=3.0,
        )
        assert out["reg"].item() <= -3.0 + 1e-6


def test_regulariser_uses_all_pixels_by_hand():
    protos = torch.eye(3, 2)  # P_2 = 0
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).t().reshape(1, 2, 1, 2)
    out = pixel_prototype_contrast(emb, torch.tensor([[[0, 1]]]), protos, num_samples=1)
    v_bar = torch.tensor([0.5, 0.5])  # mean of (1, 0) and (0, 1), not renormalised
    log_pi = F.log_softmax(protos @ v_bar / 0.1, dim=0)
    assert math.isclose(out["reg"].item(), 2.0 * float(log_pi.sum()) / (3 * math.log(3)), rel_tol=1e-6)  # fmt: skip


def test_no_gradient_into_prototypes_and_gradient_into_embeddings():
    protos = F.normalize(torch.randn(5, 4), dim=1).requires_grad_(True)
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = pixel_prototype_contrast(emb, torch.randint(0, 5, (1, 2, 2)), protos)
    (out["ce"] + out["reg"]).backward()
    assert protos.grad is None and emb.grad is not None and emb.grad.abs().sum() > 0


def test_sampling_respects_the_budget_and_is_deterministic_with_a_generator():
    torch.manual_seed(0)
    emb = torch.randn(1, 4, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    labels[0, 0] = 255  # 12 valid pixels
    protos = F.normalize(torch.randn(3, 4), dim=1)

    def run(seed, n=5):
        gen = torch.Generator().manual_seed(seed)
        return pixel_prototype_contrast(emb, labels, protos, num_samples=n, generator=gen)["ce"]

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    # by hand: the same permutation picks 5 of the 12 valid pixels (row-major order)
    pick = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:5]
    v = F.normalize(emb[0].permute(1, 2, 0).reshape(-1, 4)[4:], dim=1)[pick]  # (5, D)
    y = labels[0].reshape(-1)[4:][pick]
    assert math.isclose(run(1).item(), 0.5 * F.cross_entropy(v @ protos.t() / 0.1, y).item(), rel_tol=1e-5)  # fmt: skip
    assert math.isclose(run(1, n=100).item(), run(2, n=12).item(), rel_tol=1e-6)  # all pixels


def test_no_valid_pixel_gives_a_connected_zero():
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = pixel_prototype_contrast(emb, torch.full((1, 2, 2), 255), torch.eye(3, 4))
    for v in out.values():
        assert v.item() == 0.0 and v.grad_fn is not None
    (out["ce"] + out["reg"]).backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_frozen_restores_flags_even_after_an_exception():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(a, b):
            assert not any(p.requires_grad for p in [*a.parameters(), *b.parameters()])
            raise RuntimeError
    assert a.weight.requires_grad and b.weight.requires_grad and not b.bias.requires_grad


@pytest.mark.parametrize("judge", ["student", "teacher"])
def test_consistency_routes_gradient_to_g_and_adapter_only(judge):
    torch.manual_seed(0)
    g = torch.nn.Conv2d(3, 3, 1)  # stands for the generator
    seg = torch.nn.Conv2d(3, 6, 1)  # stands for the segmentor's features
    proj = torch.nn.Conv2d(6, 4, 1, bias=False)
    adapter = make_adapter(4)
    protos = F.normalize(torch.randn(5, 4), dim=1)
    x = torch.randn(2, 3, 4, 4)
    with frozen(seg, proj):
        emb_src = proj(seg(x))
        emb_s2t = proj(seg(g(x)))
        loss = semantic_consistency(emb_src, emb_s2t, protos, adapter, judge=judge, weight=1.0)
    loss.backward()
    assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0
    assert adapter.weight.grad is not None and adapter.bias.grad is not None
    assert seg.weight.grad is None and proj.weight.grad is None
    assert seg.weight.requires_grad and proj.weight.requires_grad  # restored


def test_consistency_is_zero_for_an_identity_translation_and_by_hand_otherwise():
    adapter = make_adapter(4)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        adapter.bias.zero_()
    emb = torch.randn(2, 4, 3, 3)
    protos = F.normalize(torch.randn(5, 4), dim=1)
    for judge in ("student", "teacher"):
        assert semantic_consistency(emb, emb, protos, adapter, judge=judge).item() < 1e-10
    shifted = emb + 0.5  # S_s2t - S_src = 0.5 * sum_d P_kd for every pixel
    diff = 0.5 * protos.sum(1)  # (C,)
    expected = 0.1 * float((diff**2).mean())
    got = semantic_consistency(emb, shifted, protos, adapter, judge="student", weight=0.1)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    with pytest.raises(ValueError):
        semantic_consistency(emb, emb, protos, adapter, judge="nobody")
