"""``train_step`` is its phases called in order (confeti/train.py, docs/method.md §8): one
iteration taught phase by phase (notebook 04) must give the weights, prototypes, optimizer
states, logs and debug images of ``train_step`` bit for bit, past every warm-up gate."""

import dataclasses

import pytest
import torch

from confeti import train
from confeti.bench import synthetic_batch
from confeti.config import smoke
from confeti.runner import to_device

DEV = torch.device("cpu")
# every branch the method has must run at the last iteration
LOSSES = {
    "source_only": {"seg_src"},
    "selftrain": {"seg_src", "seg_mix", "pseudo_q"},
    "style": {"seg_src", "psc", "loss_D", "loss_G", "loss_nce"},
    "contrast": {"seg_src", "cam_src", "pc_src", "reg_src", "pc_tgt", "reg_tgt", "pseudo_q"},
    "confeti": {"seg_src", "cam_src", "pc_src", "seg_mix", "cam_mix", "pc_mix", "pc_tgt", "psc",
                "loss_D", "loss_G", "pseudo_q"},
}  # fmt: skip


def _cfg():
    """The smoke preset with every gate at 1 or 0 (prototype warm-up, contrast, mixed CAM, mixed
    branch), so iteration 0 fills the prototypes and iteration 2 runs every branch."""
    cfg = dataclasses.replace(
        smoke(), proto_warmup_iters=1, contrast_start=1, cam_mix_start=0, mix_start=1
    )
    assert train.lr_at(cfg, 3) > 0
    return cfg


def _by_hand(state, batch, t, debug):
    """One iteration, phase by phase, as notebook 04 walks through it."""
    ctx = train.begin_step(state, batch, t)
    train.phase_ema(state, ctx)
    train.phase_stylize(state, ctx)
    train.phase_pseudo_labels(state, ctx)
    train.phase_class_mix(state, ctx)
    debug.update(train.debug_images(state, ctx))
    train.phase_prototype_update(state, ctx)
    train.phase_semantic_consistency(state, ctx)
    train.phase_cut_step(state, ctx)
    train.phase_source_branch(state, ctx)
    train.phase_mixed_branch(state, ctx)
    train.phase_target_contrast(state, ctx)
    train.phase_optimizer(state, ctx)
    return train.logged_values(ctx)


def _run(method, step, iters=(0, 1, 2, 3)):
    cfg = _cfg()
    torch.manual_seed(0)
    state = train.TrainState(cfg, method, DEV)
    amp = train.setup_device(state, cfg, DEV)
    assert amp is None  # CPU: the step's own disabled autocast
    batch = to_device(synthetic_batch(cfg, DEV), DEV, cfg.channels_last)
    marks, logs, debugs = [], [], []
    state.clock = marks.append
    for t in iters:
        torch.manual_seed(10 + t)  # as the runner seeds each iteration
        debug = {}
        logs.append(step(state, batch, t, debug))
        debugs.append(debug)
    state.clock = None
    return state, logs, debugs, marks


def _optim_tensors(opt):
    return [v for s in opt.state_dict()["state"].values() for v in s.values()]


@pytest.mark.parametrize("method", ["confeti", "selftrain", "style", "contrast", "source_only"])
def test_the_phases_in_order_are_train_step(method):
    ref, ref_logs, ref_debug, ref_marks = _run(
        method, lambda s, b, t, d: train.train_step(s, b, t, debug=d)
    )
    new, new_logs, new_debug, new_marks = _run(method, _by_hand)

    assert LOSSES[method] <= set(ref_logs[-1]), sorted(ref_logs[-1])  # every branch ran
    assert new_logs == ref_logs  # exact floats, same keys in the same order
    assert new_marks == ref_marks and len(ref_marks) == 4 * 10  # the same phases, in order
    ref_sd, new_sd = ref.state_dict(), new.state_dict()
    assert list(ref_sd) == list(new_sd)
    for k in ref_sd:  # weights of every model, BN statistics, the prototype memory
        assert torch.equal(ref_sd[k], new_sd[k]), k
    assert torch.equal(ref.protos.protos, new.protos.protos)
    assert torch.equal(ref.protos.counts, new.protos.counts)
    assert (float(ref.protos.counts.sum()) > 0) == ref.uses_protos  # the memory was updated
    a, b = _optim_tensors(ref.optimizer), _optim_tensors(new.optimizer)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))
    if ref.style is not None:
        for name, opt in ref.style.optimizers.items():
            a, b = _optim_tensors(opt), _optim_tensors(new.style.optimizers[name])
            assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b)), name
    for d_ref, d_new in zip(ref_debug, new_debug):
        assert list(d_ref) == list(d_new)
        assert all(torch.equal(d_ref[k], d_new[k]) for k in d_ref)


def test_each_phase_writes_what_the_next_reads():
    """The context after each phase of a late CONFETI iteration: what is filled, and when."""
    cfg = _cfg()
    torch.manual_seed(0)
    state = train.TrainState(cfg, "confeti", DEV)
    batch = synthetic_batch(cfg, DEV)
    train.train_step(state, batch, 0)  # fills the prototypes
    ctx = train.begin_step(state, batch, 2)
    assert ctx.protos_ready and ctx.x_s2t is None and not ctx.logs
    train.phase_ema(state, ctx)
    train.phase_stylize(state, ctx)
    b, _, h, w = batch["x_s"].shape
    assert ctx.x_s2t.shape == (b, 3, h, w) and ctx.x_s2t.requires_grad  # G trains: graph kept
    assert not ctx.x_src.requires_grad and ctx.src_keys is not None
    train.phase_pseudo_labels(state, ctx)
    assert ctx.y_t_hat.shape == (b, h, w) and ctx.q.dim() == 0 and "pseudo_q" in ctx.logs
    train.phase_class_mix(state, ctx)
    assert ctx.mixing and ctx.x_m.shape == (b, 3, h, w)
    pasted = ctx.m > 0
    assert torch.equal(ctx.y_m[pasted], batch["y_s"][pasted])
    assert torch.equal(ctx.y_m[~pasted], ctx.y_t_hat[~pasted])
    before = state.protos.protos.clone()
    train.phase_prototype_update(state, ctx)
    assert not torch.equal(before, state.protos.protos)
    train.phase_semantic_consistency(state, ctx)
    assert ctx.psc is not None and ctx.psc.requires_grad
    assert all(p.grad is None for p in state.student.parameters())  # nothing backpropagated yet
    train.phase_cut_step(state, ctx)
    assert {"loss_D", "loss_G"} <= set(ctx.logs)
    assert all(p.grad is None for p in state.student.parameters())  # L_psc reached G only
    train.phase_source_branch(state, ctx)
    assert all(p.grad is not None for p in state.student.seg.head.parameters())


def test_run_curves_mark_the_pre_training_and_plot_the_eval_rows():
    """Notebook 04's figure of a run (plots.plot_run_curves): phase 0 shaded on every panel,
    the eval rows of metrics.jsonl as a "val mIoU" panel, only when there are eval rows."""
    from matplotlib.figure import Figure

    from confeti.plots import plot_run_curves

    rows = [{"iter": i, "phase": "style_pretrain", "loss_G": 1.0 / i} for i in (2, 4)]
    rows += [{"iter": i, "phase": "train", "loss_G": 0.2, "seg_src": 1.0 / i} for i in (6, 8)]
    rows += [{"iter": 8, "phase": "eval", "miou": 12.5}]
    fig = plot_run_curves({"run": rows}, pretrain_iters=4)
    assert isinstance(fig, Figure)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"seg_src", "loss_G", "val mIoU"}
    assert all(len(ax.patches) == 1 for ax in panels.values())  # the shaded span
    (line,) = panels["val mIoU"].get_lines()
    assert list(line.get_xdata()) == [8] and list(line.get_ydata()) == [12.5]
    plain = plot_run_curves({"run": rows[:-1]})
    titled = [ax for ax in plain.axes if ax.get_title()]
    assert "val mIoU" not in {ax.get_title() for ax in titled}
    assert all(len(ax.patches) == 0 for ax in titled)
