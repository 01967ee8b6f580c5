import math

import torch
import torch.nn.functional as F

from confeti.prototypes import CAMHead, ProjectionHead, PrototypeMemory, cam_loss, similarity


def _emb(vectors, h=1):
    """(N, D) vectors -> (1, D, h, N/h) embedding map."""
    v = torch.tensor(vectors, dtype=torch.float32)
    return v.t().reshape(1, v.shape[1], h, -1)


def test_first_observation_replaces_then_ema_with_ramp():
    mem = PrototypeMemory(3, 2, momentum=0.9, top_k=10)
    mem.update(_emb([[1.0, 0.0]]), torch.tensor([[[0]]]))
    assert torch.allclose(mem.protos[0], torch.tensor([1.0, 0.0]))
    assert (mem.protos[1:] == 0).all() and mem.counts.tolist() == [1, 0, 0]
    mem.update(_emb([[0.0, 1.0]]), torch.tensor([[[0]]]))
    # ramp: m = min(1 - 1/2, 0.9) = 0.5 -> (0.5, 0.5), renormalised
    assert torch.allclose(mem.protos[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    mem.update(_emb([[0.0, 1.0]]), torch.tensor([[[0]]]))
    m = 1 - 1 / 3
    expected = F.normalize(
        m * F.normalize(torch.tensor([0.5, 0.5]), dim=0) + (1 - m) * torch.tensor([0.0, 1.0]), dim=0
    )  # noqa: E501
    assert torch.allclose(mem.protos[0], expected, atol=1e-6)


def test_rows_stay_unit_norm_and_move_towards_the_batch_mean():
    torch.manual_seed(0)
    mem = PrototypeMemory(4, 8, momentum=0.5)
    for _ in range(5):
        mem.update(torch.randn(2, 8, 4, 4), torch.randint(0, 4, (2, 4, 4)))
    norms = mem.protos.norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-5)
    target = F.normalize(torch.ones(8), dim=0)
    before = float(mem.protos[0] @ target)
    mem.update(target.view(1, 8, 1, 1).repeat(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert float(mem.protos[0] @ target) > before


def test_top_k_keeps_the_largest_weights_and_ignore_and_mask_are_respected():
    mem = PrototypeMemory(2, 2, top_k=1)
    emb = _emb([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([[[0, 0, 255]]])
    weights = torch.zeros(1, 2, 1, 3)
    weights[0, 0] = torch.tensor([0.1, 0.9, 1.0])
    mem.update(emb, labels, weights=weights)
    assert torch.allclose(mem.protos[0], torch.tensor([0.0, 1.0]))  # only the 0.9 pixel
    mem2 = PrototypeMemory(2, 2, top_k=5)
    mask = torch.tensor([[[True, False, False]]])
    mem2.update(emb, torch.tensor([[[0, 0, 0]]]), mask=mask)
    assert torch.allclose(mem2.protos[0], torch.tensor([1.0, 0.0]))


def test_counts_are_saved_and_get_is_detached():
    mem = PrototypeMemory(2, 2)
    mem.update(_emb([[1.0, 0.0]]), torch.tensor([[[1]]]))
    state = mem.state_dict()
    assert state["counts"].tolist() == [0, 1]
    assert not mem.get().requires_grad


def test_cam_loss_by_hand_and_heads():
    cam = torch.zeros(1, 2, 1, 1)
    cam[0, 0] = 2.0
    labels = torch.tensor([[[0, 255]]])  # class 0 present, class 1 absent
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2)) / 2
    assert math.isclose(float(cam_loss(cam, labels, 2)), expected, rel_tol=1e-6)
    f = torch.randn(2, 16, 4, 4)
    assert ProjectionHead(16, 8)(f).shape == (2, 8, 4, 4)
    assert CAMHead(16, 19)(f).shape == (2, 19, 4, 4)
    protos = F.normalize(torch.randn(19, 8), dim=1)
    s = similarity(torch.randn(2, 8, 4, 4), protos)
    assert s.shape == (2, 19, 4, 4) and s.abs().max() <= 1 + 1e-5
