import math

import pytest
import torch
import torch.nn.functional as F

from confeti.contrast import frozen, make_adapter, pixel_prototype_contrast, semantic_consistency


def test_equal_similarities_give_ln_c():
    emb = torch.randn(2, 4, 3, 3)
    protos = torch.zeros(19, 4)  # every logit 0
    out = pixel_prototype_contrast(
        emb, torch.zeros(2, 3, 3, dtype=torch.long), protos, weight=0.5, reg_weight=2.0
    )
    assert math.isclose(float(out["ce"]), 0.5 * math.log(19), rel_tol=1e-6)
    # uniform pi: sum_k log(1/C) / (C ln C) = -1, times reg_weight
    assert math.isclose(float(out["reg"]), -2.0, rel_tol=1e-6)


def test_own_prototype_beats_another_and_the_regulariser_bound():
    protos = torch.eye(3, 4)
    emb = protos[0].view(1, 4, 1, 1)
    own = pixel_prototype_contrast(emb, torch.tensor([[[0]]]), protos, weight=1.0)
    other = pixel_prototype_contrast(emb, torch.tensor([[[1]]]), protos, weight=1.0)
    assert float(own["ce"]) < float(other["ce"])
    assert float(own["reg"]) < -2.0  # strictly below the uniform value


def test_no_gradient_into_prototypes_and_gradient_into_embeddings():
    protos = F.normalize(torch.randn(5, 4), dim=1).requires_grad_(True)
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = pixel_prototype_contrast(emb, torch.randint(0, 5, (1, 2, 2)), protos)
    (out["ce"] + out["reg"]).backward()
    assert protos.grad is None and emb.grad is not None and emb.grad.abs().sum() > 0


def test_sampling_respects_budget_and_generator():
    emb = torch.randn(1, 4, 8, 8)
    labels = torch.randint(0, 3, (1, 8, 8))
    protos = F.normalize(torch.randn(3, 4), dim=1)
    a = pixel_prototype_contrast(
        emb, labels, protos, num_samples=5, generator=torch.Generator().manual_seed(1)
    )
    b = pixel_prototype_contrast(
        emb, labels, protos, num_samples=5, generator=torch.Generator().manual_seed(1)
    )
    full = pixel_prototype_contrast(emb, labels, protos, num_samples=10**6)
    assert torch.equal(a["ce"], b["ce"]) and not torch.equal(a["ce"], full["ce"])


def test_no_valid_pixel_gives_a_connected_zero():
    emb = torch.randn(1, 4, 2, 2, requires_grad=True)
    out = pixel_prototype_contrast(emb, torch.full((1, 2, 2), 255), torch.eye(3, 4))
    assert float(out["ce"].detach()) == 0.0 and out["ce"].grad_fn is not None


def test_frozen_restores_flags_even_after_an_exception():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.bias.requires_grad_(False)
    with pytest.raises(RuntimeError):
        with frozen(a, b):
            assert not any(p.requires_grad for p in a.parameters())
            raise RuntimeError
    assert a.weight.requires_grad and b.weight.requires_grad and not b.bias.requires_grad


def test_consistency_routes_gradient_to_g_and_adapter_only():
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
        loss = semantic_consistency(emb_src, emb_s2t, protos, adapter, weight=1.0)
    loss.backward()
    assert g.weight.grad is not None and adapter.weight.grad is not None
    assert seg.weight.grad is None and proj.weight.grad is None


def test_consistency_is_zero_for_an_identity_translation():
    adapter = make_adapter(4)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        adapter.bias.zero_()
    emb = torch.randn(2, 4, 3, 3)
    protos = F.normalize(torch.randn(5, 4), dim=1)
    for judge in ("student", "teacher"):
        assert float(semantic_consistency(emb, emb, protos, adapter, judge=judge)) < 1e-10
