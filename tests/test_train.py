"""The CONFETI iteration: every method runs, losses are finite, gradients go where
docs/method.md §9 says."""

import dataclasses

import pytest
import torch

from confeti.bench import synthetic_batch
from confeti.config import METHODS, smoke
from confeti.runner import to_device
from confeti.train import TrainState, lr_at, parts_of, setup_device, train_step

DEV = torch.device("cpu")


def _cfg(**kw):
    return dataclasses.replace(smoke(), **kw)


def _late(cfg):
    return max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start) + 1


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_two_steps(method):
    cfg = _cfg()
    torch.manual_seed(0)
    state = TrainState(cfg, method, DEV)
    batch = synthetic_batch(cfg, DEV)
    for t in (0, _late(cfg)):
        logs = train_step(state, batch, t)
        assert logs and all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
    p = parts_of(method)
    assert ("seg_mix" in logs) == p.selftrain
    assert ("pc_src" in logs) == p.contrast
    assert ("loss_D" in logs) == p.style


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="source_only"):
        parts_of("sorce_only")


def test_lr_schedule_warmup_and_poly():
    cfg = _cfg(iters=100, warmup_iters=10, lr=1.0)
    assert lr_at(cfg, 0) == pytest.approx(1e-6)
    assert lr_at(cfg, 10) == pytest.approx(0.9)
    assert lr_at(cfg, 100) == 0.0


def _grads(module):
    return [p.grad for p in module.parameters()]


def _has_grad(module):
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module))


def test_gradient_routing_follows_the_spec():
    """Snapshots taken by the benchmark hook after each phase of one CONFETI iteration."""
    cfg = _cfg(psc_weight=1.0)
    torch.manual_seed(0)
    state = TrainState(cfg, "confeti", DEV)
    batch = synthetic_batch(cfg, DEV)
    emb = torch.randn(2, cfg.proto_dim, 4, 8)
    labels = torch.arange(19).repeat(4)[: 2 * 32].view(2, 4, 8)
    state.protos.update(emb, labels)  # prototypes exist, so every loss is active
    s, st = state.student, state.style
    g_before = [p.detach().clone() for p in st.G.parameters()]
    d_before = [p.detach().clone() for p in st.D.parameters()]
    seen = {}

    def clock(phase):
        seen[phase] = {
            "backbone": _has_grad(s.seg.backbone),
            "seg_head": _has_grad(s.seg.head),
            "cam": _has_grad(s.cam),
            "proj": _has_grad(s.proj),
            "adapter": _has_grad(state.adapter),
            "G": _has_grad(st.G),
            "D": _has_grad(st.D),
        }

    state.clock = clock
    logs = train_step(state, batch, _late(cfg))
    assert "psc" in logs and "pc_tgt" in logs and "cam_mix" in logs
    psc = seen["semantic_consistency"]  # computed, not yet backpropagated (it rides on g_step)
    assert not any(psc.values())
    cut = seen["cut_steps"]  # D step, then G + F step with L_psc: adapter now has gradient,
    assert cut["adapter"] and cut["D"]  # the segmentor none (L_psc passes it frozen)
    assert not (cut["backbone"] or cut["seg_head"] or cut["cam"] or cut["proj"])
    src = seen["student_source"]  # CE + CAM + contrast on the detached x_s2t
    assert src["backbone"] and src["seg_head"] and src["cam"] and src["proj"]
    assert any(not torch.equal(a, b) for a, b in zip(g_before, st.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, st.D.parameters()))


def test_consistency_gradient_reaches_g_but_not_the_segmentor():
    """L_psc is backpropagated inside the CUT step: the student's gradients must not change there."""
    cfg = _cfg(psc_weight=10.0, fd_weight=0.0)
    torch.manual_seed(0)
    state = TrainState(cfg, "style", DEV)
    state.protos.update(torch.randn(2, cfg.proto_dim, 4, 8), torch.randint(19, (2, 4, 8)))
    batch = synthetic_batch(cfg, DEV)
    snap = {}

    def clock(phase):
        snap[phase] = [p.grad.clone() for p in state.student.parameters() if p.grad is not None]

    state.clock = clock
    logs = train_step(state, batch, _late(cfg))
    assert logs["psc"] > 0
    # the CUT step (which backpropagates L_psc through the frozen segmentor) runs before the
    # segmentor's own branches: no student parameter has a gradient after it
    assert snap["semantic_consistency"] == [] and snap["cut_steps"] == []
    assert len(snap["student_source"]) > 0
    assert _has_grad(state.adapter)


def test_features_are_the_forward_features():
    torch.manual_seed(0)
    state = TrainState(_cfg(), "confeti", torch.device("cpu"))
    x = torch.randn(2, 3, 32, 64)
    assert torch.equal(state.student.features(x), state.student(x)[1])


def test_channels_last_changes_layout_not_results():
    """setup_device's NHWC layout (now also on CPU) gives the losses of the NCHW layout."""
    cfg = _cfg()
    batch = synthetic_batch(cfg, torch.device("cpu"))
    t = _late(cfg)
    logs = []
    for cl in (False, True):
        torch.manual_seed(0)
        state = TrainState(
            dataclasses.replace(cfg, channels_last=cl), "confeti", torch.device("cpu")
        )
        setup_device(state, state.cfg, torch.device("cpu"))
        b = to_device(batch, torch.device("cpu"), channels_last=cl)
        assert b["x_s"].is_contiguous(memory_format=torch.channels_last) == cl
        torch.manual_seed(1)
        logs.append(train_step(state, b, t))
    assert logs[0].keys() == logs[1].keys()
    for k in logs[0]:
        assert logs[1][k] == pytest.approx(logs[0][k], rel=1e-3, abs=1e-5), k


def _conv_weights(module):
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_for_every_model_also_imnet_and_stage2():
    """setup_device: student, teacher, adapter, G/D and the frozen ImageNet copy (a plain list,
    outside the module tree) in NHWC; the two-stage schedule's fresh segmentor too."""
    from confeti.runner import _start_stage2

    cfg = _cfg(schedule="two_stage", fd_weight=0.1)
    torch.manual_seed(0)
    state = TrainState(cfg, "confeti", DEV)
    state._imnet.append(TrainState(cfg, "source_only", DEV).student)  # as with a pretrained net
    setup_device(state, cfg, DEV)
    nhwc = [state.student, state.teacher, state.adapter, state.imnet, state.style]
    for module in nhwc:
        ws = _conv_weights(module)
        assert ws and all(w.is_contiguous(memory_format=torch.channels_last) for w in ws)
    assert state.style.memory_format == torch.channels_last
    _start_stage2(state, cfg, DEV)
    for module in (state.student, state.teacher, state.adapter):
        ws = _conv_weights(module)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in ws)
