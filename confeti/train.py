"""The CONFETI iteration: one function, ``train_step``, that reads top to bottom in the order of
the official code (docs/method.md §8), and the models it works on.

Taught in notebooks/04_joint_training.ipynb. Every method of the ablation is this same step with
parts switched off (``Parts``): ``source_only`` trains on raw source; ``fda`` on source images
given a target image's low-frequency amplitude (a fixed translation, no G); ``style`` adds the CUT
generator G (x_s -> x_s2t) and its consistency loss; ``contrast`` adds the CAM head, prototypes and
the pixel-to-prototype contrast on source and target; ``selftrain`` adds the EMA teacher,
pseudo-labels and ClassMix (DACS/DAFormer); ``confeti`` is all of them.

Gradient routing (docs/method.md §9), enforced here and tested in tests/test_train.py:

| loss | student backbone | seg head | CAM | proj | adapter | G | D | F |
| L_seg_src (x_s2t detached)   | x | x |   |   |   |   |   |   |
| L_cam_src, L_cam_mix         | x |   | x |   |   |   |   |   |
| L_pc_src / mix / tgt         | x |   |   | x |   |   |   |   |
| L_psc (segmentor frozen)     |   |   |   |   | x | x |   |   |
| L_D                          |   |   |   |   |   |   | x |   |
| L_G (GAN + PatchNCE)         |   |   |   |   |   | x |   | x |
| L_seg_mix (pixel weights)    | x | x |   |   |   |   |   |   |
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import METHODS, Config
from .contrast import (
    bn_stats_frozen,
    frozen,
    make_adapter,
    pixel_prototype_contrast,
    semantic_consistency,
)
from .deeplab import DeepLabV2
from .fda import fda_transfer
from .labels import IGNORE_INDEX, THING_CLASSES
from .prototypes import CAMHead, ProjectionHead, PrototypeMemory, cam_loss
from .selftrain import (
    class_mix_masks,
    ema_update,
    feature_distance,
    mix,
    mix_weights,
    pseudo_label,
    strong_augment,
)
from .stylize import StyleTransfer


@dataclass(frozen=True)
class Parts:
    """Which parts of CONFETI a method switches on."""

    style: bool = False  # pixel-level alignment: train on G(x_s)
    contrast: bool = False  # feature-level alignment: CAM head + prototypes + contrast
    selftrain: bool = False  # EMA teacher + pseudo-labels + ClassMix
    oracle: bool = False  # train on labelled target (upper bound)
    fda: bool = False  # a fixed translation instead of G: Fourier domain adaptation


def parts_of(method: str) -> Parts:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return Parts(
        style="style" in method or method == "confeti",
        contrast="contrast" in method or method == "confeti",
        selftrain="selftrain" in method or method == "confeti",
        oracle=method == "oracle",
        fda=method == "fda",
    )


class Segmentor(nn.Module):
    """DeepLabV2 plus the two auxiliary heads on its stage-4 features.

    Shape: x (B, 3, H, W) -> logits (B, C, H/8, W/8), feats (B, F, H/8, W/8).
    ``cam`` (C maps) and ``proj`` (D-dim embeddings) read ``feats``.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.seg = DeepLabV2(
            num_classes=cfg.num_classes,
            backbone=cfg.backbone,
            aspp_dilations=cfg.aspp_dilations,
            pretrained=cfg.pretrained,
            width=cfg.backbone_width,
        )
        self.cam = CAMHead(self.seg.feat_channels, cfg.num_classes)
        self.proj = ProjectionHead(self.seg.feat_channels, cfg.proto_dim)

    def forward(self, x):
        return self.seg(x)

    def features(self, x):
        """Stage-4 features only (no ASPP classifier): for passes whose logits go unused."""
        return self.seg.backbone(x)


class TrainState(nn.Module):
    """Everything one run trains or tracks; its ``state_dict`` is the model part of a checkpoint."""

    def __init__(self, cfg: Config, method: str, device: torch.device):
        super().__init__()
        self.cfg, self.method, self.parts = cfg, method, parts_of(method)
        p = self.parts
        self.student = Segmentor(cfg)
        self.teacher = copy.deepcopy(self.student) if (p.selftrain or p.contrast) else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.protos = PrototypeMemory(
            cfg.num_classes,
            cfg.proto_dim,
            momentum=cfg.proto_momentum,
            top_k=cfg.proto_top_k,
            resolution=cfg.proto_resolution,
        )
        self.adapter = make_adapter(cfg.proto_dim) if p.style else None  # the official reg_proj
        self.style = (
            StyleTransfer(
                ngf=cfg.ngf,
                n_blocks=cfg.n_blocks,
                ndf=cfg.ndf,
                d_layers=cfg.d_layers,
                nce_layers=cfg.nce_layers,
                num_patches=cfg.num_patches,
                nce_tau=cfg.nce_tau,
                lambda_gan=cfg.lambda_gan,
                lambda_nce=cfg.lambda_nce,
                lr=cfg.cut_lr,
                grad_checkpoint=cfg.grad_checkpoint,
            )
            if p.style
            else None
        )
        self.train_style = p.style and cfg.style_joint  # G keeps learning (stage 1 / single stage)
        # frozen ImageNet-initialised copy for the feature distance; kept out of the state_dict
        self._imnet: list[nn.Module] = []
        if cfg.fd_weight > 0 and cfg.pretrained is not None:
            self._imnet.append(copy.deepcopy(self.student).eval().requires_grad_(False).to(device))
        self.to(device)
        self.optimizer = make_optimizer(self, cfg)

    @property
    def imnet(self) -> nn.Module | None:
        return self._imnet[0] if self._imnet else None

    @property
    def uses_protos(self) -> bool:
        return self.parts.contrast or self.train_style


def set_memory_format(state: TrainState, cfg: Config) -> None:
    """channels_last (NHWC: faster convolutions in oneDNN on CPU and cuDNN on GPU) for every
    model of the run: the segmentor copies, the adapter, G/D/F and the frozen ImageNet copy
    (kept out of the module tree, so converted here). G and D stay NHWC although
    ``F.instance_norm`` makes its input contiguous (a copy to NCHW at each norm, one back at the
    next convolution): their thin convolutions gain more in NHWC than the copies cost (README,
    Performance). ``StyleTransfer`` converts its inputs to G's layout and returns G's output in
    the caller's, so either layout works."""
    if not cfg.channels_last:
        return
    state.to(memory_format=torch.channels_last)
    for module in state._imnet:
        module.to(memory_format=torch.channels_last)
    if state.style is not None:
        state.style.set_memory_format(torch.channels_last)


def _keep_freed_memory() -> None:
    """CPU runs on glibc: keep freed heap memory for the next iteration (trim threshold 1 GiB)
    and take tensors up to 32 MiB from the heap instead of fresh mmaps, so an iteration's
    activations are not page-faulted in again every time (the toy ``style`` iteration: ~10k
    faults and 12-18 ms of system time each). ``MALLOC_TRIM_THRESHOLD_`` or
    ``MALLOC_MMAP_THRESHOLD_`` in the environment win; elsewhere a no-op."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or any(
        k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest on 64-bit)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass


def setup_device(state: TrainState, cfg: Config, device: torch.device):
    """Device settings in one place: the memory format (``set_memory_format``), cuDNN
    autotuning, and on CUDA autocast (bf16 where supported, else fp16 with a GradScaler on
    ``state.scaler``). Returns the autocast context for ``train_step`` (None on CPU). Batches
    should match: ``runner.to_device(..., channels_last=True)``."""
    set_memory_format(state, cfg)
    if device.type != "cuda":
        _keep_freed_memory()
        return None
    torch.backends.cudnn.benchmark = True
    if not cfg.amp:
        return None
    dtype = torch.bfloat16 if bf16_native(device) else torch.float16
    if dtype == torch.float16:
        state.scaler = torch.amp.GradScaler("cuda")
    return torch.autocast("cuda", dtype=dtype)


def bf16_native(device: torch.device) -> bool:
    """bf16 tensor cores (compute capability >= 8: Ampere and later). ``is_bf16_supported()``
    also says True on a V100, T4 or 2080 Ti, where bf16 is emulated and slow: fp16 there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def make_optimizer(state: TrainState, cfg: Config) -> torch.optim.Optimizer:
    """AdamW: backbone at lr, every head (seg head, CAM, proj, adapter) at lr x head_lr_mult."""
    s = state.student
    heads = [*s.seg.head.parameters(), *s.cam.parameters(), *s.proj.parameters()]
    if state.adapter is not None:
        heads += list(state.adapter.parameters())
    groups = [
        {"params": list(s.seg.backbone.parameters()), "lr_mult": 1.0},
        {"params": heads, "lr_mult": cfg.head_lr_mult},
    ]
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, foreach=True
    )  # foreach: one fused op per step over all tensors (the default only on CUDA)
    set_lr(opt, cfg, 0)
    return opt


def lr_at(cfg: Config, t: int) -> float:
    """Poly decay with linear warm-up (mmcv 'poly', warmup_ratio 1e-6), as the official schedule.

    lr_t = lr (1 - t/T)^p,  times (1 - (1 - t/T_w)(1 - 1e-6)) while t < T_w.
    """
    lr = cfg.lr * (1 - min(t, cfg.iters) / cfg.iters) ** cfg.poly_power
    if t < cfg.warmup_iters:
        lr *= 1 - (1 - t / cfg.warmup_iters) * (1 - 1e-6)
    return lr


def set_lr(opt: torch.optim.Optimizer, cfg: Config, t: int) -> None:
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, t) * g["lr_mult"]


def seg_ce(logits, labels, weights=None):
    """Cross-entropy at label resolution; ignore pixels excluded from the mean.

    With ``weights`` (B, H, W): mean of w * CE over all pixels (DACS's pixel-weighted loss).
    Shape: logits (B, C, h, w), labels (B, H, W).
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if weights is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights).mean()


def _contrast(state: TrainState, feats, labels, scale: float = 1.0) -> dict[str, torch.Tensor]:
    cfg = state.cfg
    out = pixel_prototype_contrast(
        state.student.proj(feats),
        labels,
        state.protos.get(),
        tau=cfg.tau,
        num_samples=cfg.contrast_samples,
        weight=cfg.contrast_weight,
        reg_weight=cfg.reg_weight,
    )
    return {k: v * scale for k, v in out.items()}


def train_step(
    state: TrainState, batch: dict, t: int, amp=None, debug: dict | None = None
) -> dict[str, float]:
    """One iteration t of the chosen method. ``batch``: x_s, y_s, x_t (and y_t for the oracle).

    Pass a dict as ``debug`` to receive this iteration's intermediate images (x_s2t, pseudo-label,
    ClassMix mask, mixed image/label/weights) -- the official debug figure, rebuilt.

    Order (docs/method.md §8): EMA -> stylize -> pseudo-labels -> ClassMix -> prototype update ->
    consistency -> CUT step -> source branch (+ feature distance, one backward) -> mixed branch
    -> target contrast -> optimizer step. (The official code runs consistency and the CUT step
    after the source branch; see step 6.)
    """
    cfg, p = state.cfg, state.parts
    autocast = amp if amp is not None else torch.autocast("cpu", enabled=False)
    x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
    if p.oracle:  # the upper bound trains on the labelled target with the same loop
        x_s, y_s = batch["x_t"], batch["y_t"]
    logs: dict[str, torch.Tensor] = {}
    state.optimizer.zero_grad(set_to_none=True)
    protos_ready = state.uses_protos and bool(state.protos.counts.sum() > 0)

    # 1. EMA teacher: phi <- alpha_t phi + (1 - alpha_t) theta
    if state.teacher is not None:
        ema_update(state.teacher, state.student, t, cfg.ema_alpha)

    # 2. stylize the source: x_s2t = G(x_s), graph to G kept only while G trains
    src_keys = None  # G's encoder outputs on x_s: the PatchNCE keys of the CUT step below
    if p.style:
        if state.train_style:
            with autocast:
                x_s2t, src_keys = state.style.translate_with_keys(x_s)
        else:
            with torch.no_grad(), autocast:
                x_s2t = state.style.translate(x_s)
    elif p.fda:  # a fixed translation: the low-frequency amplitude of a random target image
        x_s2t = fda_transfer(
            x_s, x_t[torch.randperm(x_t.shape[0], device=x_t.device)], cfg.fda_beta
        )
    else:
        x_s2t = x_s
    x_src = x_s2t.detach().float()  # segmentation never reaches G

    _mark(state, "stylize")

    # 3. pseudo-labels of the teacher on the target: y_t_hat, weights = q (quality)
    if state.teacher is not None:
        with torch.no_grad(), autocast:
            t_logits, _ = state.teacher(x_t)
        t_logits = F.interpolate(t_logits.float(), size=x_t.shape[-2:], mode="bilinear")
        y_t_hat, w_t, q = pseudo_label(
            t_logits, cfg.pseudo_threshold, cfg.pseudo_ignore_top, cfg.pseudo_ignore_bottom
        )
        t_conf = torch.softmax(t_logits, dim=1).amax(dim=1)  # (B, H, W) max_c p
        logs["pseudo_q"] = q

    _mark(state, "pseudo_labels")

    # 4. ClassMix of the (stylized, detached) source onto the target + strong augmentation
    mixing = p.selftrain and t >= cfg.mix_start  # the gate holds self-training back at first
    if mixing:
        m = class_mix_masks(y_s, num_classes=cfg.num_classes)  # (B, H, W) 1 = pasted source
        x_m = strong_augment(
            mix(x_src, x_t, m),
            jitter_p=cfg.color_jitter_p,
            strength=cfg.color_jitter_strength,
            blur_p=cfg.blur_p,
        )
        y_m = mix(y_s, y_t_hat, m)
        w_m = mix_weights(m, w_t)  # 1 on pasted source pixels, q elsewhere

    _mark(state, "class_mix")
    if debug is not None:
        debug.update(x_s=x_s, x_s2t=x_src, x_t=x_t, y_s=y_s)
        if state.teacher is not None:
            debug.update(y_t_hat=y_t_hat, w_t=w_t, t_conf=t_conf)
        if mixing:
            debug.update(mask=m, x_m=x_m, y_m=y_m, w_m=w_m)

    # 5. prototypes from teacher features (no grad); warm-up: pasted source GT, uniform weights
    if state.uses_protos:
        warm = t <= cfg.proto_warmup_iters
        teacher = state.teacher if state.teacher is not None else state.student
        with torch.no_grad(), autocast:
            if mixing:
                f_m = teacher.features(x_m)
                # CAM weights only where the CAM head is trained (the contrast part)
                cam = None if warm or not p.contrast else F.relu(teacher.cam(f_m)).float()
                state.protos.update(
                    teacher.proj(f_m).float(), y_m, weights=cam, mask=(m > 0) if warm else None
                )
            else:  # no mix: source GT, plus confident target pseudo-labels after the warm-up
                x_p, y_p = x_src, y_s
                if p.contrast and not warm and state.teacher is not None:
                    confident = t_conf >= cfg.pseudo_threshold  # per pixel, (B, H, W)
                    x_p = torch.cat([x_src, x_t])
                    y_p = torch.cat([y_s, y_t_hat.masked_fill(~confident, IGNORE_INDEX)])
                f_p = teacher.features(x_p)
                state.protos.update(teacher.proj(f_p).float(), y_p)  # one update per iteration

    _mark(state, "prototype_update")

    # 6. prototypical semantic consistency: the segmentor judges G; its weights stay frozen.
    # PSC and the CUT step come before the segmentor's branches (the official code runs them
    # after the source branch): G's graphs are freed before the segmentor's are built, which
    # lowers the peak memory; nothing they use changes in between, so only the order of the
    # random draws differs (patch positions, contrast samples)
    psc = None
    if state.train_style and protos_ready and cfg.psc_weight > 0:
        s = state.student
        judge = state.teacher if (cfg.psc_judge == "teacher" and state.teacher) else s
        # frozen weights, and frozen BatchNorm statistics: these passes judge G, they must not
        # move the running statistics that evaluation uses (raw source is not a training input)
        with autocast, frozen(s.seg, s.proj), bn_stats_frozen(s, judge):
            with torch.no_grad():
                emb_src = judge.proj(judge.features(x_s))
            if cfg.grad_checkpoint:  # recomputed in the CUT step's backward, as frozen as here
                emb_s2t = torch.utils.checkpoint.checkpoint(
                    lambda x: s.proj(s.features(x)), x_s2t, use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), _judging_again(s)),
                )  # fmt: skip
            else:
                emb_s2t = s.proj(s.features(x_s2t))
            psc = semantic_consistency(
                emb_src.float(),
                emb_s2t.float(),
                state.protos.get(),
                state.adapter,
                judge=cfg.psc_judge,
                tau=cfg.tau,
                weight=cfg.psc_weight,
            )
        logs["psc"] = psc

    _mark(state, "semantic_consistency")

    # 7. CUT step: D on (x_s2t, x_t), then G + F with GAN + PatchNCE (+ consistency)
    if state.train_style:
        with autocast:
            scaler = getattr(state, "scaler", None)
            logs.update(_tensors(state.style.d_step(x_s2t, x_t, scaler=scaler)))
            logs.update(
                _tensors(
                    state.style.g_step(
                        x_s, x_t, x_s2t, extra_loss=psc, scaler=scaler, src_feats=src_keys
                    )
                )
            )

    _mark(state, "cut_steps")

    # 8. source branch on x_s2t (detached): CE + CAM (+ contrast after the gate)
    with autocast:
        logits_s, f_src = state.student(x_src)
        loss_src = logs["seg_src"] = seg_ce(logits_s.float(), y_s)
        if p.contrast:
            logs["cam_src"] = cfg.cam_weight * cam_loss(
                state.student.cam(f_src).float(), y_s, cfg.num_classes
            )
            loss_src = loss_src + logs["cam_src"]
            if t > cfg.contrast_start and protos_ready:
                pc = _contrast(state, f_src.float(), y_s)
                logs["pc_src"], logs["reg_src"] = pc["ce"], pc["reg"]
                loss_src = loss_src + pc["ce"] + pc["reg"]
    # ImageNet feature distance on thing classes (needs a pretrained backbone), added to the
    # source loss: one backward frees the source graph here instead of holding it until a second
    if cfg.fd_weight > 0 and state.imnet is not None:
        with torch.no_grad(), autocast:
            f_in = state.imnet.features(x_s)  # the backbone only: its ASPP head is unused
        logs["fd"] = cfg.fd_weight * feature_distance(
            f_src.float(), f_in.float(), y_s, THING_CLASSES, cfg.fd_ratio, cfg.num_classes
        )
        loss_src = loss_src + logs["fd"]
    _backward(state, loss_src, logs)

    _mark(state, "student_source")

    # 9. mixed branch: pixel-weighted CE (+ CAM, contrast after their gates)
    if mixing:
        with autocast:
            logits_m, f_mix = state.student(x_m)
            loss_mix = logs["seg_mix"] = seg_ce(logits_m.float(), y_m, w_m)
            if p.contrast and t > cfg.cam_mix_start:
                logs["cam_mix"] = cfg.cam_weight * cam_loss(
                    state.student.cam(f_mix).float(), y_m, cfg.num_classes
                )
                loss_mix = loss_mix + logs["cam_mix"]
            if p.contrast and t >= cfg.contrast_start and protos_ready:
                pc = _contrast(state, f_mix.float(), y_m)
                logs["pc_mix"], logs["reg_mix"] = pc["ce"], pc["reg"]
                loss_mix = loss_mix + pc["ce"] + pc["reg"]
        _backward(state, loss_mix, logs)

    _mark(state, "student_mixed")

    # 10. target contrast with pseudo-labels, scaled by their quality q (stage 1 / contrast)
    tgt_contrast = p.contrast and (state.train_style or not p.selftrain)
    if tgt_contrast and t > cfg.contrast_start and protos_ready:
        with autocast:
            f_tgt = state.student.features(x_t)
            pc = _contrast(state, f_tgt.float(), y_t_hat, scale=q)
        logs["pc_tgt"], logs["reg_tgt"] = pc["ce"], pc["reg"]
        _backward(state, pc["ce"] + pc["reg"], logs)

    _mark(state, "target_contrast")

    # 11. one optimizer step for everything the losses above reached; then the LR schedule
    _step(state)
    set_lr(state.optimizer, cfg, t + 1)
    _mark(state, "optimizer")
    values = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in logs.values()])
    return dict(zip(logs, values.tolist()))  # one transfer for every logged value


@contextlib.contextmanager
def _judging_again(s: Segmentor):
    """The consistency pass's context for its recomputation (``grad_checkpoint``), which runs in
    the CUT step's backward: frozen weights and BatchNorm statistics, and the BatchNorm batch
    counters left as the pass left them (the recomputation is no second pass)."""
    counters = [m.num_batches_tracked for m in s.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None]  # fmt: skip
    counts = [c.clone() for c in counters]
    try:  # also when the recomputation stops early (once the backward has what it needs)
        with frozen(s.seg, s.proj), bn_stats_frozen(s):
            yield
    finally:
        for c, n in zip(counters, counts):
            c.copy_(n)


def _mark(state: TrainState, phase: str) -> None:
    """Benchmark hook: ``state.clock(phase)`` closes the timing of ``phase`` (no-op if unset)."""
    clock = getattr(state, "clock", None)
    if clock is not None:
        clock(phase)


def _tensors(d: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in d.items()}


def _nonfinite(logs: dict) -> str | None:
    """The name of the first non-finite tensor in ``logs``, or None: one host sync for all."""
    vals = [v for v in logs.values() if isinstance(v, torch.Tensor)]
    if not vals or bool(torch.stack([torch.isfinite(v.detach()).all() for v in vals]).all()):
        return None
    return next(k for k, v in logs.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all())  # fmt: skip


def _backward(state: TrainState, loss: torch.Tensor, logs: dict) -> None:
    """Backward of one branch; a NaN/Inf stops before the segmentor's weights change, naming the
    loss. Under torchrun the stop waits for ``_step``, where every rank learns of it together
    (a rank that stopped alone would leave the others waiting in the next all-reduce)."""
    bad = _nonfinite(logs)
    if bad is not None:
        msg = f"loss {bad!r} is {float(logs[bad])} (not finite)"
        if getattr(state, "sync_grads", None) is None:
            raise FloatingPointError(msg)
        state.nonfinite = getattr(state, "nonfinite", None) or msg
        return
    scaler = getattr(state, "scaler", None)
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _step(state: TrainState) -> None:
    sync = getattr(state, "sync_grads", None)
    if sync is not None:  # one all-reduced flag: any rank's non-finite loss stops every rank
        mine = getattr(state, "nonfinite", None)
        flag = torch.tensor([1.0 if mine else 0.0], device=state.protos.protos.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        state.nonfinite = None
        if flag.item() > 0:
            raise FloatingPointError(mine or "a loss on another rank is not finite")
        sync(state.student)
        if state.adapter is not None:
            sync(state.adapter)
    scaler = getattr(state, "scaler", None)
    if scaler is not None:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()


def check_finite(logs: dict[str, float], t: int) -> None:
    """Stop with a message that names the loss and the iteration (the checkpoint stays good)."""
    bad = [k for k, v in logs.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"loss {bad[0]!r} is {logs[bad[0]]} at iteration {t}")
