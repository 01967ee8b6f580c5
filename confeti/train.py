"""The CONFETI iteration and the models it works on. ``train_step`` is a short recipe that reads
top to bottom in the order of the official code (docs/method.md §8): eleven phase functions,
``phase_ema`` -> ``phase_stylize`` -> ``phase_pseudo_labels`` -> ``phase_class_mix`` ->
``phase_prototype_update`` -> ``phase_semantic_consistency`` -> ``phase_cut_step`` ->
``phase_source_branch`` -> ``phase_mixed_branch`` -> ``phase_target_contrast`` ->
``phase_optimizer``, which hand each other their tensors in a ``StepContext``. Calling
``begin_step``, the phases in that order and ``logged_values`` is ``train_step``, bit for bit
(tests/test_phases.py).

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
from dataclasses import dataclass, field

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


@dataclass
class StepContext:
    """What the phases of one iteration hand each other (docs/method.md §8).

    ``begin_step`` fills the inputs; each ``phase_*`` function reads what the earlier ones wrote
    and adds its own outputs; ``logged_values`` turns ``logs`` into floats at the end. A field a
    method does not use stays None (``mixing`` False).

    Shape (B images per domain, an H x W crop): x_s, x_t, x_s2t, x_src, x_m (B, 3, H, W) float;
    y_s, y_t_hat, y_m (B, H, W) long train ids (255 = ignore); w_t, t_conf, m, w_m (B, H, W)
    float; q () float tensor; psc and every ``logs`` value () tensors.
    """

    t: int  # the iteration within the training phase (the gates count from 0)
    autocast: contextlib.AbstractContextManager  # the mixed-precision context (off on CPU)
    x_s: torch.Tensor  # source images (for the oracle: the labelled target)
    y_s: torch.Tensor  # their labels
    x_t: torch.Tensor  # target images, unlabelled
    protos_ready: bool  # the prototypes held something before this iteration's update
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    x_s2t: torch.Tensor | None = None  # G(x_s) (graph to G while G trains), FDA(x_s) or x_s
    x_src: torch.Tensor | None = None  # x_s2t detached, fp32: what the segmentor trains on
    src_keys: list | None = None  # G's encoder outputs on x_s: the PatchNCE keys of the CUT step
    y_t_hat: torch.Tensor | None = None  # the teacher's pseudo-labels on x_t
    w_t: torch.Tensor | None = None  # their pixel weights (q, 0 in the ignored bands)
    q: torch.Tensor | None = None  # share of target pixels the teacher is confident about
    t_conf: torch.Tensor | None = None  # the teacher's max_c p per target pixel
    mixing: bool = False  # the mixed branch runs this iteration (selftrain, t >= mix_start)
    m: torch.Tensor | None = None  # ClassMix mask, 1 = pasted source pixel
    x_m: torch.Tensor | None = None  # mixed image, after the strong augmentation
    y_m: torch.Tensor | None = None  # mixed label: y_s where m = 1, y_t_hat elsewhere
    w_m: torch.Tensor | None = None  # mixed pixel weights: 1 where m = 1, w_t elsewhere
    psc: torch.Tensor | None = None  # L_psc, backpropagated inside the CUT step


def train_step(
    state: TrainState, batch: dict, t: int, amp=None, debug: dict | None = None
) -> dict[str, float]:
    """One iteration t of the chosen method. ``batch``: x_s, y_s, x_t (and y_t for the oracle).

    Pass a dict as ``debug`` to receive this iteration's intermediate images (x_s2t, pseudo-label,
    ClassMix mask, mixed image/label/weights) -- the official debug figure, rebuilt.

    A recipe of phases in the order of docs/method.md §8 (each function says what it computes;
    notebook 04 calls them one by one). The official code runs the consistency and the CUT step
    after the source branch; see ``phase_semantic_consistency``.
    """
    ctx = begin_step(state, batch, t, amp)
    phase_ema(state, ctx)  # 1. EMA teacher
    phase_stylize(state, ctx)  # 2. x_s2t = G(x_s)
    phase_pseudo_labels(state, ctx)  # 3. teacher on x_t: y_t_hat, w_t, q
    phase_class_mix(state, ctx)  # 4. x_m, y_m, w_m
    if debug is not None:
        debug.update(debug_images(state, ctx))
    phase_prototype_update(state, ctx)  # 5. EMA of the class prototypes P (no gradient)
    phase_semantic_consistency(state, ctx)  # 6. L_psc, the segmentor frozen
    phase_cut_step(state, ctx)  # 7. D step, then G + F step (+ L_psc)
    phase_source_branch(state, ctx)  # 8. CE + CAM + contrast (+ FD) on x_src, one backward
    phase_mixed_branch(state, ctx)  # 9. weighted CE + CAM + contrast on x_m
    phase_target_contrast(state, ctx)  # 10. q L_pc on x_t
    phase_optimizer(state, ctx)  # 11. one AdamW step, then the LR schedule
    return logged_values(ctx)


def begin_step(state: TrainState, batch: dict, t: int, amp=None) -> StepContext:
    """The context of iteration t: the batch (the oracle trains on the labelled target with the
    same loop), no gradient left from the previous iteration, and whether the prototypes are
    ready (``protos_ready``: they hold something, read before this iteration's update).

    Shape: batch x_s, x_t (B, 3, H, W), y_s (and y_t) (B, H, W).
    """
    x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
    if state.parts.oracle:
        x_s, y_s = batch["x_t"], batch["y_t"]
    state.optimizer.zero_grad(set_to_none=True)
    return StepContext(
        t=t,
        autocast=amp if amp is not None else torch.autocast("cpu", enabled=False),
        x_s=x_s,
        y_s=y_s,
        x_t=x_t,
        protos_ready=state.uses_protos and bool(state.protos.counts.sum() > 0),
    )


def phase_ema(state: TrainState, ctx: StepContext) -> None:
    """Step 1, the EMA teacher: φ ← α_t φ + (1 − α_t) θ, α_t = min(1 − 1/(t+1), α) (``ema_update``).

    Only where a teacher exists (selftrain, contrast). Its time counts into the "stylize" phase.
    Shape: the teacher's and the student's parameters, in place.
    """
    if state.teacher is not None:
        ema_update(state.teacher, state.student, ctx.t, state.cfg.ema_alpha)


def phase_stylize(state: TrainState, ctx: StepContext) -> None:
    """Step 2, stylize the source: x_s2t = G(x_s), with the graph to G only while G trains
    (it is needed by L_psc and the CUT step), and G's encoder outputs on x_s (``src_keys``, the
    PatchNCE keys). ``fda``: x_s2t = FDA(x_s, a random target image), a fixed translation; no
    style part: x_s2t = x_s. x_src = sg[x_s2t] in fp32: segmentation never reaches G.

    Shape: x_s (B, 3, H, W) -> x_s2t, x_src (B, 3, H, W).
    """
    p, x_s, x_t = state.parts, ctx.x_s, ctx.x_t
    if p.style:
        if state.train_style:
            with ctx.autocast:
                ctx.x_s2t, ctx.src_keys = state.style.translate_with_keys(x_s)
        else:
            with torch.no_grad(), ctx.autocast:
                ctx.x_s2t = state.style.translate(x_s)
    elif p.fda:  # a fixed translation: the low-frequency amplitude of a random target image
        ctx.x_s2t = fda_transfer(
            x_s, x_t[torch.randperm(x_t.shape[0], device=x_t.device)], state.cfg.fda_beta
        )
    else:
        ctx.x_s2t = x_s
    ctx.x_src = ctx.x_s2t.detach().float()  # x_src = sg[x_s2t]
    _mark(state, "stylize")


def phase_pseudo_labels(state: TrainState, ctx: StepContext) -> None:
    """Step 3, the teacher's pseudo-labels on the target (``pseudo_label``):
    ŷ_t = argmax_c p_φ(x_t), q = mean[max_c p ≥ threshold], w_t = q (0 in the ignored top and
    bottom bands); t_conf = max_c p per pixel. Logs ``pseudo_q``. Only where a teacher exists.

    Shape: x_t (B, 3, H, W) -> teacher logits (B, C, h, w), upsampled to (B, C, H, W) ->
    y_t_hat (B, H, W) long, w_t and t_conf (B, H, W), q ().
    """
    cfg = state.cfg
    if state.teacher is not None:
        with torch.no_grad(), ctx.autocast:
            t_logits, _ = state.teacher(ctx.x_t)
        t_logits = F.interpolate(t_logits.float(), size=ctx.x_t.shape[-2:], mode="bilinear")
        ctx.y_t_hat, ctx.w_t, ctx.q = pseudo_label(
            t_logits, cfg.pseudo_threshold, cfg.pseudo_ignore_top, cfg.pseudo_ignore_bottom
        )
        ctx.t_conf = torch.softmax(t_logits, dim=1).amax(dim=1)  # (B, H, W) max_c p
        ctx.logs["pseudo_q"] = ctx.q
    _mark(state, "pseudo_labels")


def phase_class_mix(state: TrainState, ctx: StepContext) -> None:
    """Step 4, ClassMix of the (stylized, detached) source onto the target, from ``mix_start``
    on (the gate holds self-training back at first): M = half of each source image's classes
    (``class_mix_masks``), x_m = aug(x_src ⊙ M + x_t ⊙ (1 − M)) with colour jitter and blur
    (``strong_augment``), y_m = y_s ⊙ M + ŷ_t ⊙ (1 − M), w_m = M + w_t ⊙ (1 − M).

    Shape: x_src, x_t (B, 3, H, W), y_s, y_t_hat, w_t (B, H, W) -> m, w_m (B, H, W) float,
    x_m (B, 3, H, W), y_m (B, H, W) long.
    """
    cfg = state.cfg
    ctx.mixing = state.parts.selftrain and ctx.t >= cfg.mix_start
    if ctx.mixing:
        ctx.m = class_mix_masks(ctx.y_s, num_classes=cfg.num_classes)  # 1 = pasted source
        ctx.x_m = strong_augment(
            mix(ctx.x_src, ctx.x_t, ctx.m),
            jitter_p=cfg.color_jitter_p,
            strength=cfg.color_jitter_strength,
            blur_p=cfg.blur_p,
        )
        ctx.y_m = mix(ctx.y_s, ctx.y_t_hat, ctx.m)
        ctx.w_m = mix_weights(ctx.m, ctx.w_t)  # 1 on pasted source pixels, q elsewhere
    _mark(state, "class_mix")


def debug_images(state: TrainState, ctx: StepContext) -> dict[str, torch.Tensor]:
    """The intermediate images of ``train_step(debug=...)``, after ClassMix: x_s, x_s2t (the
    detached x_src), x_t, y_s; with a teacher y_t_hat, w_t, t_conf; when mixing the mask and
    x_m, y_m, w_m. Shape: as in ``StepContext``."""
    out = dict(x_s=ctx.x_s, x_s2t=ctx.x_src, x_t=ctx.x_t, y_s=ctx.y_s)
    if state.teacher is not None:
        out.update(y_t_hat=ctx.y_t_hat, w_t=ctx.w_t, t_conf=ctx.t_conf)
    if ctx.mixing:
        out.update(mask=ctx.m, x_m=ctx.x_m, y_m=ctx.y_m, w_m=ctx.w_m)
    return out


def phase_prototype_update(state: TrainState, ctx: StepContext) -> None:
    """Step 5, the class prototypes from teacher embeddings, without gradient (the student
    where there is no teacher): P_c ← m P_c + (1 − m) mean of the top-k embeddings of class c
    (``PrototypeMemory.update``). When mixing: embeddings of x_m with labels y_m, weighted by
    the teacher's CAM where the CAM head trains (contrast); during the warm-up (t ≤
    ``proto_warmup_iters``) only the pasted source pixels, uniform weights. Without mixing:
    x_src with y_s, plus x_t with the confident pseudo-labels (t_conf ≥ threshold) after the
    warm-up (contrast). One update per iteration.

    Shape: x_m or x_src/x_t (N, 3, H, W) -> embeddings (N, D, h, w), labels (N, H, W) ->
    prototypes (C, D).
    """
    if not state.uses_protos:
        _mark(state, "prototype_update")
        return
    cfg, p = state.cfg, state.parts
    warm = ctx.t <= cfg.proto_warmup_iters
    teacher = state.teacher if state.teacher is not None else state.student
    with torch.no_grad(), ctx.autocast:
        if ctx.mixing:
            f_m = teacher.features(ctx.x_m)
            # CAM weights only where the CAM head is trained (the contrast part)
            cam = None if warm or not p.contrast else F.relu(teacher.cam(f_m)).float()
            state.protos.update(
                teacher.proj(f_m).float(), ctx.y_m, weights=cam, mask=(ctx.m > 0) if warm else None
            )
        else:  # no mix: source GT, plus confident target pseudo-labels after the warm-up
            x_p, y_p = ctx.x_src, ctx.y_s
            if p.contrast and not warm and state.teacher is not None:
                confident = ctx.t_conf >= cfg.pseudo_threshold  # per pixel, (B, H, W)
                x_p = torch.cat([ctx.x_src, ctx.x_t])
                y_p = torch.cat([ctx.y_s, ctx.y_t_hat.masked_fill(~confident, IGNORE_INDEX)])
            f_p = teacher.features(x_p)
            state.protos.update(teacher.proj(f_p).float(), y_p)  # one update per iteration
    _mark(state, "prototype_update")


def phase_semantic_consistency(state: TrainState, ctx: StepContext) -> None:
    """Step 6, the prototypical semantic consistency: the segmentor judges G, its weights and
    BatchNorm statistics frozen (``semantic_consistency``, ``frozen``, ``bn_stats_frozen``):
    λ_psc L_psc, L_psc = mean (r(e(x_s2t)) Pᵀ − sg[e(x_s)] Pᵀ)², e = proj ∘ backbone, r the
    adapter (``psc_judge="teacher"``: e(x_s) from the teacher, both sides L2-normalised and
    divided by τ). Only while G trains and the prototypes are ready; the gradient flows through
    the frozen segmentor into G and the adapter, inside the CUT step's backward. Logs ``psc``
    (= λ_psc L_psc, as ``ctx.psc``).

    The official code runs this and the CUT step after the source branch. Here they come
    before the segmentor's branches: G's graphs are freed before the segmentor's are built,
    which lowers the peak memory; nothing they use changes in between, so only the order of
    the random draws differs (patch positions, contrast samples). ``grad_checkpoint``: the
    student pass over x_s2t is recomputed in the CUT step's backward, as frozen as here.

    Shape: x_s, x_s2t (B, 3, H, W) -> embeddings (B, D, h, w), prototypes (C, D) -> psc ().
    """
    cfg = state.cfg
    if state.train_style and ctx.protos_ready and cfg.psc_weight > 0:
        s = state.student
        judge = state.teacher if (cfg.psc_judge == "teacher" and state.teacher) else s
        # frozen weights, and frozen BatchNorm statistics: these passes judge G, they must not
        # move the running statistics that evaluation uses (raw source is not a training input)
        with ctx.autocast, frozen(s.seg, s.proj), bn_stats_frozen(s, judge):
            with torch.no_grad():
                emb_src = judge.proj(judge.features(ctx.x_s))
            if cfg.grad_checkpoint:  # recomputed in the CUT step's backward, as frozen as here
                emb_s2t = torch.utils.checkpoint.checkpoint(
                    lambda x: s.proj(s.features(x)), ctx.x_s2t, use_reentrant=False,
                    context_fn=lambda: (contextlib.nullcontext(), _judging_again(s)),
                )  # fmt: skip
            else:
                emb_s2t = s.proj(s.features(ctx.x_s2t))
            ctx.psc = semantic_consistency(
                emb_src.float(),
                emb_s2t.float(),
                state.protos.get(),
                state.adapter,
                judge=cfg.psc_judge,
                tau=cfg.tau,
                weight=cfg.psc_weight,
            )
        ctx.logs["psc"] = ctx.psc
    _mark(state, "semantic_consistency")


def phase_cut_step(state: TrainState, ctx: StepContext) -> None:
    """Step 7, the CUT step while G trains: D on (x_s2t, x_t) with LSGAN
    (``StyleTransfer.d_step``), then G + F on L_G = λ_GAN L_GAN + λ_NCE · ½[L_NCE(x_s, x_s2t) +
    L_NCE(x_t, G(x_t))] + λ_psc L_psc (``g_step``: one backward, then G and F step; the
    gradient L_psc leaves in the adapter waits for step 11). Logs ``loss_D``, ``loss_G`` (without
    L_psc) and its parts ``loss_G_gan``, ``loss_nce`` (= λ_NCE · ½[...]).

    Shape: x_s, x_t, x_s2t (B, 3, H, W) -> scalars.
    """
    if state.train_style:
        with ctx.autocast:
            scaler = getattr(state, "scaler", None)
            ctx.logs.update(_tensors(state.style.d_step(ctx.x_s2t, ctx.x_t, scaler=scaler)))
            g = state.style.g_step(
                ctx.x_s,
                ctx.x_t,
                ctx.x_s2t,
                extra_loss=ctx.psc,
                scaler=scaler,
                src_feats=ctx.src_keys,
            )
            ctx.logs.update(_tensors(g))
    _mark(state, "cut_steps")


def phase_source_branch(state: TrainState, ctx: StepContext) -> None:
    """Step 8, the source branch on x_src = sg[x_s2t], one backward:
    L_s = CE(f_θ(x_src), y_s) + λ_cam L_cam (contrast) + L_pc + L_reg (contrast, after
    ``contrast_start`` once the prototypes are ready) + λ_fd L_fd (the ImageNet feature distance
    on thing classes; needs a pretrained backbone). One backward frees the source graph here
    instead of holding it until a second. Logs ``seg_src``, ``cam_src``, ``pc_src``, ``reg_src``,
    ``fd``.

    Shape: x_src (B, 3, H, W) -> logits (B, C, h, w), features (B, F, h, w); y_s (B, H, W).
    """
    cfg, p, logs = state.cfg, state.parts, ctx.logs
    with ctx.autocast:
        logits_s, f_src = state.student(ctx.x_src)
        loss_src = logs["seg_src"] = seg_ce(logits_s.float(), ctx.y_s)
        if p.contrast:
            logs["cam_src"] = cfg.cam_weight * cam_loss(
                state.student.cam(f_src).float(), ctx.y_s, cfg.num_classes
            )
            loss_src = loss_src + logs["cam_src"]
            if ctx.t > cfg.contrast_start and ctx.protos_ready:
                pc = _contrast(state, f_src.float(), ctx.y_s)
                logs["pc_src"], logs["reg_src"] = pc["ce"], pc["reg"]
                loss_src = loss_src + pc["ce"] + pc["reg"]
    if cfg.fd_weight > 0 and state.imnet is not None:
        with torch.no_grad(), ctx.autocast:
            f_in = state.imnet.features(ctx.x_s)  # the backbone only: its ASPP head is unused
        logs["fd"] = cfg.fd_weight * feature_distance(
            f_src.float(), f_in.float(), ctx.y_s, THING_CLASSES, cfg.fd_ratio, cfg.num_classes
        )
        loss_src = loss_src + logs["fd"]
    _backward(state, loss_src, logs)
    _mark(state, "student_source")


def phase_mixed_branch(state: TrainState, ctx: StepContext) -> None:
    """Step 9, the mixed branch when mixing: L_m = mean(w_m ⊙ CE(f_θ(x_m), y_m)) + λ_cam L_cam
    (contrast, after ``cam_mix_start``) + L_pc + L_reg (contrast, from ``contrast_start`` once
    the prototypes are ready), one backward. Logs ``seg_mix``, ``cam_mix``, ``pc_mix``,
    ``reg_mix``.

    Shape: x_m (B, 3, H, W) -> logits (B, C, h, w), features (B, F, h, w); y_m, w_m (B, H, W).
    """
    cfg, p, logs = state.cfg, state.parts, ctx.logs
    if ctx.mixing:
        with ctx.autocast:
            logits_m, f_mix = state.student(ctx.x_m)
            loss_mix = logs["seg_mix"] = seg_ce(logits_m.float(), ctx.y_m, ctx.w_m)
            if p.contrast and ctx.t > cfg.cam_mix_start:
                logs["cam_mix"] = cfg.cam_weight * cam_loss(
                    state.student.cam(f_mix).float(), ctx.y_m, cfg.num_classes
                )
                loss_mix = loss_mix + logs["cam_mix"]
            if p.contrast and ctx.t >= cfg.contrast_start and ctx.protos_ready:
                pc = _contrast(state, f_mix.float(), ctx.y_m)
                logs["pc_mix"], logs["reg_mix"] = pc["ce"], pc["reg"]
                loss_mix = loss_mix + pc["ce"] + pc["reg"]
        _backward(state, loss_mix, logs)
    _mark(state, "student_mixed")


def phase_target_contrast(state: TrainState, ctx: StepContext) -> None:
    """Step 10, the target contrast with the pseudo-labels, scaled by their quality:
    q · (L_pc + L_reg)(f_θ(x_t), ŷ_t), after ``contrast_start`` once the prototypes are ready;
    where G trains (stage 1 / single stage) or for ``contrast`` alone, one backward. Logs
    ``pc_tgt``, ``reg_tgt``.

    Shape: x_t (B, 3, H, W) -> features (B, F, h, w); y_t_hat (B, H, W).
    """
    p = state.parts
    tgt_contrast = (
        p.contrast and state.cfg.target_contrast and (state.train_style or not p.selftrain)
    )
    if tgt_contrast and ctx.t > state.cfg.contrast_start and ctx.protos_ready:
        with ctx.autocast:
            f_tgt = state.student.features(ctx.x_t)
            pc = _contrast(state, f_tgt.float(), ctx.y_t_hat, scale=ctx.q)
        ctx.logs["pc_tgt"], ctx.logs["reg_tgt"] = pc["ce"], pc["reg"]
        _backward(state, pc["ce"] + pc["reg"], ctx.logs)
    _mark(state, "target_contrast")


def phase_optimizer(state: TrainState, ctx: StepContext) -> None:
    """Step 11, one optimizer step for everything the losses above reached (under torchrun
    after the gradients are averaged over ranks; with fp16 through the GradScaler), then the
    learning rate of iteration t + 1 (``set_lr``)."""
    _step(state)
    set_lr(state.optimizer, state.cfg, ctx.t + 1)
    _mark(state, "optimizer")


def logged_values(ctx: StepContext) -> dict[str, float]:
    """Every logged loss as a float, in the order they were logged: one device-to-host
    transfer for all of them."""
    values = torch.stack(
        [torch.as_tensor(v).detach().float().reshape(()) for v in ctx.logs.values()]
    )
    return dict(zip(ctx.logs, values.tolist()))


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
