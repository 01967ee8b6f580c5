"""The GPU path's logic, checked on the CPU: precision choice, fp32 similarities under
autocast, one source backward with the feature distance, the ImageNet copy's backbone only."""

import copy
import dataclasses

import torch

from confeti import train as train_mod
from confeti.bench import synthetic_batch
from confeti.config import smoke
from confeti.contrast import make_adapter, pixel_prototype_contrast, semantic_consistency
from confeti.train import TrainState, bf16_native, train_step

DEV = torch.device("cpu")


def test_bf16_only_with_bf16_tensor_cores(monkeypatch):
    assert not bf16_native(DEV)
    cuda = torch.device("cuda", 0)
    for cap, want in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert bf16_native(cuda) is want  # V100 / T4 / 2080 Ti: fp16 + GradScaler


def test_contrast_and_psc_logits_stay_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 16, 8, 8, generator=g)
    labels = torch.randint(0, 5, (2, 8, 8), generator=g)
    protos = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    ref = pixel_prototype_contrast(emb, labels, protos, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pixel_prototype_contrast(
            emb, labels, protos, generator=torch.Generator().manual_seed(1)
        )
    assert low["ce"].dtype == torch.float32
    assert torch.allclose(low["ce"], ref["ce"], atol=1e-6, rtol=0)  # bf16 would err ~1e-2
    assert torch.allclose(low["reg"], ref["reg"], atol=1e-6, rtol=0)
    adapter = make_adapter(16)
    ref = semantic_consistency(emb, emb * 0.9, protos, adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = semantic_consistency(emb, emb * 0.9, protos, adapter)
    assert low.dtype == torch.float32 and torch.allclose(low, ref, rtol=2e-2)


def _with_imnet(method):
    cfg = dataclasses.replace(smoke(), fd_weight=0.5, fd_ratio=0.0)  # every cell qualifies
    torch.manual_seed(0)
    state = TrainState(cfg, method, DEV)
    state._imnet.append(copy.deepcopy(state.student).eval().requires_grad_(False))
    return cfg, state


def test_feature_distance_joins_the_source_backward(monkeypatch):
    cfg, state = _with_imnet("source_only")
    calls, real = [], train_mod._backward
    monkeypatch.setattr(train_mod, "_backward", lambda *a, **k: (calls.append(k), real(*a, **k)))
    forwards = []
    state.imnet.register_forward_hook(lambda *a: forwards.append(1))
    logs = train_step(state, synthetic_batch(cfg, DEV), 0)
    assert "fd" in logs and logs["fd"] > 0
    assert len(calls) == 1 and not any(k.get("retain_graph") for k in calls)  # one backward
    assert forwards == []  # the ImageNet copy ran its backbone only (no ASPP head)


def test_fp16_scaler_state_is_checkpointed():
    from confeti.runner import _checkpoint, _restore

    cfg = smoke()
    torch.manual_seed(0)
    state = TrainState(cfg, "source_only", DEV)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)  # as after
    # a few overflows
    ck = _checkpoint(state, 5)
    again = TrainState(cfg, "source_only", DEV)
    again.scaler = torch.amp.GradScaler("cpu")  # a fresh one starts at 65,536
    assert _restore(again, ck) == 5
    assert again.scaler.get_scale() == 256.0 and again.scaler.get_growth_interval() == 7


def test_a_nonfinite_loss_on_any_rank_stops_every_rank_in_step(monkeypatch):
    """Under torchrun a rank must not stop alone: the stop is an all-reduced flag in _step."""
    cfg = smoke()
    torch.manual_seed(0)
    state = TrainState(cfg, "source_only", DEV)
    state.sync_grads = lambda module: None  # as under torchrun
    seen = []

    def all_reduce(t, op=None):  # another rank reports a NaN
        seen.append(op)
        t.fill_(1.0)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    before = [p.clone() for p in state.student.parameters()]
    try:
        train_step(state, synthetic_batch(cfg, DEV), 0)
    except FloatingPointError as e:
        assert "another rank" in str(e)
    else:
        raise AssertionError("the step did not stop")
    assert seen == [torch.distributed.ReduceOp.MAX]
    assert all(torch.equal(a, b) for a, b in zip(before, state.student.parameters()))
    # and a NaN here, under torchrun, waits for _step instead of raising alone
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: None)
    logs = {"seg_src": torch.tensor(float("nan"))}
    train_mod._backward(state, torch.tensor(1.0, requires_grad=True), logs)
    assert "seg_src" in state.nonfinite
    try:
        train_mod._step(state)
    except FloatingPointError as e:
        assert "seg_src" in str(e)
    else:
        raise AssertionError("_step did not stop on this rank's NaN")


# ---- host-device synchronisations of one step ------------------------------------------------
SYNC_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "_to_copy", "copy_"}  # fmt: skip
HOST_SIDE = ("torch/optim/", "_uniform")  # CPU scalars on every device: optimizer step counts,
# the strong augmentation's parameters drawn from a CPU generator


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that wait for the device: reading a value (``float()``, ``bool()``, ``.item()``
    all become ``_local_scalar_dense``), data-dependent shapes (nonzero, unique), and copies to
    the CPU; ops called from host-side code (``HOST_SIDE``) are not device syncs anywhere."""

    def __init__(self):
        super().__init__()
        self.where = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import traceback

        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in SYNC_OPS:
            if name in ("_to_copy", "copy_"):  # only a copy *to* the host counts
                dst = kwargs.get("device") if name == "_to_copy" and kwargs else None
                if name == "copy_" or dst is None or torch.device(dst).type != "cpu":
                    return out
            stack = "".join(traceback.format_stack(limit=25))
            if not any(h in stack for h in HOST_SIDE):
                self.where.append(name)
        return out


def test_one_confeti_step_synchronises_a_handful_of_times():
    cfg = smoke()
    t = max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start, cfg.mix_start) + 1
    torch.manual_seed(0)
    state = TrainState(cfg, "confeti", DEV)
    batch = synthetic_batch(cfg, DEV)
    train_step(state, batch, 0)
    with _SyncCounter() as c:
        logs = train_step(state, batch, t)
    assert {"pc_tgt", "psc", "seg_mix"} <= set(logs)  # every part ran
    # today: 3 nonzero (the contrast's valid pixels), 3 finite checks (one per branch), 1
    # prototypes-ready test; the code before counted ~70 (a float() per log, .item() in the
    # CUT steps and pseudo-labels, a nonzero and int() per class in the prototype update)
    assert len(c.where) <= 10, c.where


def test_fp16_overflow_on_one_rank_skips_the_cut_step_on_every_rank():
    """The G/D/F gradients are averaged before ``scaler.step``: an inf from any rank reaches
    every rank, so all skip the step together (a step hook would run only where the step runs,
    and a rank that skipped it would leave the others waiting in the all-reduce)."""
    from confeti.stylize import StyleTransfer

    torch.manual_seed(0)
    st = StyleTransfer(ngf=4, n_blocks=1, ndf=4, d_layers=1, nce_layers=(0, 2), num_patches=8)
    calls = []

    def sync(grads):  # another rank overflowed: the average holds an inf
        calls.append(len(grads))
        grads[0].fill_(float("inf"))

    st.sync_grads = sync
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(2, 3, 16, 16)
    d_before = [p.detach().clone() for p in st.D.parameters()]
    st.d_step(st.translate(x), x, scaler=scaler)
    assert calls and calls[0] == len(d_before)  # called once, with every D gradient
    assert all(torch.equal(a, b) for a, b in zip(d_before, st.D.parameters()))  # step skipped
    scaler.update()
    assert scaler.get_scale() < 65536.0  # and the scale backs off, as on every other rank
