"""Activation checkpointing (``Config.grad_checkpoint``): G's stages and the consistency's student
pass recompute their forward in the backward. Same maths: the same losses, gradients, updated
weights, BatchNorm statistics and random stream, bit for bit on CPU; less memory in the CUT step."""

import dataclasses

import pytest
import torch

from confeti.bench import synthetic_batch
from confeti.config import paper, smoke, toy
from confeti.memory import late_iteration, trace_step
from confeti.runner import to_device
from confeti.stylize import Generator, StyleTransfer
from confeti.train import TrainState, setup_device, train_step

DEV = torch.device("cpu")


def _two_steps(grad_checkpoint: bool, amp: bool):
    """A seeded smoke CONFETI state, two train_steps past every gate (the first fills the
    prototypes: the second runs the consistency loss too)."""
    cfg = dataclasses.replace(smoke(), grad_checkpoint=grad_checkpoint)
    torch.manual_seed(0)
    state = TrainState(cfg, "confeti", DEV)
    setup_device(state, cfg, DEV)
    batch = to_device(synthetic_batch(cfg, DEV), DEV, cfg.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else None
    t0 = late_iteration(cfg)
    torch.manual_seed(1)
    logs = [train_step(state, batch, t0 + i, amp=autocast) for i in range(2)]
    return state, logs, torch.get_rng_state()


def _grads(module):
    return [p.grad for p in module.parameters()]


def _same(a, b):
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_train_step_is_bitwise_the_same_with_checkpointing(amp):
    off, logs_off, rng_off = _two_steps(False, amp)
    on, logs_on, rng_on = _two_steps(True, amp)
    assert on.style.G.grad_checkpoint and not off.style.G.grad_checkpoint
    assert "psc" in logs_on[-1] and "loss_G" in logs_on[-1]
    assert logs_on == logs_off  # every loss, both iterations, exactly
    # gradients of this iteration: G, D, F (kept after their steps), student and adapter
    for name in ("G", "D", "F"):
        assert _same(_grads(getattr(on.style, name)), _grads(getattr(off.style, name))), name
    assert _same(_grads(on.student), _grads(off.student))
    assert _same(_grads(on.adapter), _grads(off.adapter))
    # updated weights and buffers: BatchNorm statistics and batch counters untouched by the
    # recomputation of the consistency pass (frozen there as in the pass)
    sd_on, sd_off = on.state_dict(), off.state_dict()
    assert sd_on.keys() == sd_off.keys()
    assert [k for k in sd_on if not torch.equal(sd_on[k], sd_off[k])] == []
    for opt in ("G", "D", "F"):
        a, b = on.style.optimizers[opt].state, off.style.optimizers[opt].state
        assert _same([v for s in a.values() for v in s.values()],
                     [v for s in b.values() for v in s.values()])  # fmt: skip
    # the recomputation restores the random state it used: later draws are unchanged
    assert torch.equal(rng_on, rng_off)
    # and the flags the consistency pass froze are back
    assert all(p.requires_grad for p in on.student.parameters())


@pytest.mark.parametrize("layers", [(0, 4, 8, 12, 16), (0, 2, 5, 13)])
def test_generator_features_and_gradients_are_the_same(layers):
    """Encoder outputs taken inside a checkpointed stage (2 is overwritten by an in-place ReLU,
    so copied) are the same tensors' values and pass the same gradients."""
    torch.manual_seed(0)
    g = Generator(ngf=4, n_blocks=6)
    x = torch.randn(2, 3, 32, 32)
    res = []
    for ckpt in (False, True):
        g.grad_checkpoint = ckpt
        g.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y, feats = g(xi, layers)
        enc = g.encode(y, layers)  # the query pass over G's output
        loss = y.square().mean() + sum((f * f.detach().sign()).mean() for f in feats + enc)
        loss.backward()
        res.append(([y, *feats, *enc], [p.grad for p in g.parameters()], xi.grad))
        assert torch.equal(g(x), g.model(x))  # grad on, no layers: the plain Sequential
    (out0, g0, x0), (out1, g1, x1) = res
    assert all(torch.equal(a, b) for a, b in zip(out0, out1, strict=True))
    assert _same(g0, g1) and torch.equal(x0, x1)


def test_generator_keeps_only_stage_inputs():
    """With checkpointing, the graph of G(x) saves no activation inside a stage: what the outer
    graph saves is each stage's input, far less than every layer's activations."""
    saved = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        g = Generator(ngf=4, n_blocks=3)
        g.grad_checkpoint = ckpt
        sizes: list[int] = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            g(torch.randn(1, 3, 32, 32))
        saved[ckpt] = sum(sizes)
    assert saved[True] < 0.25 * saved[False]


def test_style_transfer_and_presets_carry_the_switch():
    assert StyleTransfer(
        ngf=4, n_blocks=1, nce_layers=(0, 4), grad_checkpoint=True
    ).G.grad_checkpoint
    assert not StyleTransfer(ngf=4, n_blocks=1, nce_layers=(0, 4)).G.grad_checkpoint
    assert paper().grad_checkpoint and not toy().grad_checkpoint and not smoke().grad_checkpoint


def test_checkpointing_lowers_the_traced_cut_step_peak():
    """The memory tracer at the toy crop (64x128, batch 4, fp32): the CUT step, where G's graphs
    and the consistency's meet, peaks lower; the segmentor's own phases do not change."""
    res = {ck: trace_step(dataclasses.replace(toy(), grad_checkpoint=ck), "confeti")
           for ck in (False, True)}  # fmt: skip
    off, on = res[False]["per_phase"], res[True]["per_phase"]
    assert on["cut_steps"] < 0.75 * off["cut_steps"]
    assert res[True]["peak_mb"] < res[False]["peak_mb"]
    for phase in ("student_source", "student_mixed", "target_contrast", "optimizer"):
        assert on[phase] == off[phase], phase
    assert res[True]["static_mb"] == res[False]["static_mb"]
    assert res[True]["end_mb"] == pytest.approx(res[False]["end_mb"], abs=0.1)
