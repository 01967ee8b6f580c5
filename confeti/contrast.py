"""Pixel-to-prototype contrast, its regulariser, and the prototypical semantic consistency.

Taught in notebooks/03_feature_alignment.ipynb (contrast) and 02_pixel_alignment.ipynb
(consistency).

Pixel-to-prototype contrast (docs/method.md §7), on L2-normalised pixel embeddings v~_n with
label y_n:

    L_CE  = w * mean_{n in S} -log[ exp(v~_n . P_{y_n} / tau) / sum_k exp(v~_n . P_k / tau) ]
    L_reg = w_reg * (sum_k log pi_k) / (C ln C),  pi = softmax_k(v_bar . P_k / tau),
            v_bar = mean of all valid v~_n (SePiCo's regulariser, kept with the official sign)

Prototypical semantic consistency (docs/method.md §5): the generator must keep every pixel's
similarity profile to the prototypes: L_psc = w * MSE(r(p(f(G(x_s)))) P^T, sg[p(f(x_s)) P^T]).

Shape: emb (B, D, h, w), labels (B, H, W), protos (C, D) -> scalar losses.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .labels import IGNORE_INDEX, resize_labels


def pixel_prototype_contrast(
    emb,
    labels,
    protos,
    tau: float = 0.1,
    num_samples: int = 4096,
    weight: float = 0.5,
    reg_weight: float = 2.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{"ce": L_CE, "reg": L_reg}`` with their weights applied (see the module docstring).

    emb: un-normalised pixel embeddings v (the projection head's output); labels: train ids,
    255 = ignore, resized to (h, w) nearest; protos: P, detached here (never receives gradient).
    The CE uses a random subset S of min(num_samples, N) valid pixels (``torch.randperm`` with
    ``generator``, without replacement); the regulariser uses all N valid pixels, as the official
    code. No valid pixel: both terms are ``emb.sum() * 0`` (zero, still in the graph).
    Shape: emb (B, D, h, w), labels (B, H, W), protos (C, D) -> {"ce": (), "reg": ()}.
    """
    with torch.autocast(emb.device.type, enabled=False):  # logits / tau = 0.1: never in bf16
        return _contrast_fp32(emb.float(), labels, protos.detach().float(), tau, num_samples,
                              weight, reg_weight, generator)  # fmt: skip


def _contrast_fp32(emb, labels, protos, tau, num_samples, weight, reg_weight, generator):
    """The body of ``pixel_prototype_contrast``, in fp32 with autocast off."""
    b, d, h, w = emb.shape
    c = protos.shape[0]
    lab = resize_labels(labels, (h, w)).reshape(-1)  # (B*h*w,) nearest, as the official code
    v = F.normalize(emb.permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # (B*h*w, D)
    valid = torch.nonzero((lab != IGNORE_INDEX) & (lab >= 0) & (lab < c)).squeeze(1)
    if len(valid) == 0:
        zero = emb.sum() * 0
        return {"ce": zero, "reg": zero}
    v, lab = v[valid], lab[valid]
    gen_device = generator.device if generator is not None else v.device  # drawn where v is
    pick = torch.randperm(len(v), generator=generator, device=gen_device)[:num_samples]
    pick = pick.to(v.device)  # S: min(num_samples, N) pixels without replacement
    logits = v[pick] @ protos.t() / tau  # (S, C) = v~_n . P_k / tau
    ce = weight * F.cross_entropy(logits, lab[pick])  # mean_n -log softmax_k(...)[y_n]
    # Sign note (exactly SePiCo's / the official code's sign): sum_k log pi_k is largest
    # (= -C ln C) at the uniform pi, so *minimising* L_reg pushes the batch-mean embedding away
    # from uniform similarity to the prototypes; its value is <= -reg_weight (= at uniform).
    v_bar = v.mean(0)  # over all valid pixels, not renormalised
    log_pi = F.log_softmax(v_bar @ protos.t() / tau, dim=0)  # (C,)
    reg = reg_weight * log_pi.sum() / (c * math.log(c))
    return {"ce": ce, "reg": reg}


def make_adapter(dim: int) -> nn.Module:
    """The learnable 1x1 adapter r (the official ``reg_proj``): D -> D, with bias.

    Shape: (B, D, h, w) -> (B, D, h, w).
    """
    return nn.Conv2d(dim, dim, 1, bias=True)


def semantic_consistency(
    emb_src,
    emb_s2t,
    protos,
    adapter: nn.Module,
    judge: str = "student",
    tau: float = 0.1,
    weight: float = 0.1,
) -> torch.Tensor:
    """L_psc: the stylized source's similarity maps must match the raw source's.

    judge="student" (paper code): S_src = sg[emb_src] P^T, S_s2t = r(emb_s2t) P^T on the raw
    (un-normalised) projections, no temperature; L = weight * mean_{b,c,h,w} (S_s2t - S_src)^2.
    judge="teacher" (follow-up code, CONFETII): ``emb_src`` comes from the EMA teacher (the caller
    passes it); r(emb_s2t) and emb_src are L2-normalised per pixel (after the adapter) and the
    similarities divided by tau, which bounds the scale of the MSE.
    ``emb_src`` is detached here; gradient flows through ``emb_s2t`` (to G, when the caller runs
    the segmentor under ``frozen``) and into the adapter r.
    Shape: emb_src, emb_s2t (B, D, h, w), protos (C, D) -> scalar.
    """
    protos = protos.detach().float()
    src, s2t = emb_src.detach().float(), adapter(emb_s2t).float()
    if judge == "teacher":
        src, s2t = F.normalize(src, dim=1), F.normalize(s2t, dim=1)
        scale = 1.0 / tau
    elif judge == "student":
        scale = 1.0
    else:
        raise ValueError(f"judge must be 'student' or 'teacher', got {judge!r}")
    with torch.autocast(src.device.type, enabled=False):  # similarities in fp32
        sim_src = torch.einsum("bdhw,cd->bchw", src, protos) * scale  # (B, C, h, w)
        sim_s2t = torch.einsum("bdhw,cd->bchw", s2t, protos) * scale
        return weight * F.mse_loss(sim_s2t, sim_src)


@contextmanager
def frozen(*modules: nn.Module):
    """Turn ``requires_grad`` off for the modules' parameters, restoring the exact flags after.

    Gradient still flows *through* the modules to their inputs (here: to G via x_s2t), but
    none accumulates in their weights. Flags are restored exactly, even after an exception.
    """
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@contextmanager
def bn_stats_frozen(*modules: nn.Module):
    """BatchNorm layers keep normalising with batch statistics but do not update their running
    statistics: momentum 0 gives running <- 1 * running + 0 * batch, exactly unchanged.

    Restores every layer's momentum after, even after an exception.
    """
    bns = [m for mod in modules if mod is not None for m in mod.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # fmt: skip
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
