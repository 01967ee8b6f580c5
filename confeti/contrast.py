"""Pixel-to-prototype contrast, its regulariser, and the prototypical semantic consistency.

Taught in notebooks/03_feature_alignment.ipynb (contrast) and 02_pixel_alignment.ipynb
(consistency).

Pixel-to-prototype contrast (spec §5), on L2-normalised pixel embeddings v~_n with label y_n:

    L_CE  = w * mean_{n in S} -log[ exp(v~_n . P_{y_n} / tau) / sum_k exp(v~_n . P_k / tau) ]
    L_reg = w_reg * (sum_k log pi_k) / (C ln C),  pi = softmax_k(v_bar . P_k / tau),
            v_bar = mean of all valid v~_n (SePiCo's regulariser, kept with the official sign)

Prototypical semantic consistency (spec §6): the generator must keep every pixel's similarity
profile to the prototypes: L_psc = w * MSE(r(p(f(G(x_s)))) P^T, sg[p(f(x_s)) P^T]).

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
    """``{"ce": L_CE, "reg": L_reg}`` with their weights applied (see the module docstring)."""
    b, d, h, w = emb.shape
    c = protos.shape[0]
    protos = protos.detach().to(emb.dtype)  # prototypes never receive gradient
    lab = resize_labels(labels, (h, w)).reshape(-1)  # (B*h*w,) nearest, as the official code
    v = F.normalize(emb.permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # (B*h*w, D)
    valid = torch.nonzero((lab != IGNORE_INDEX) & (lab >= 0) & (lab < c)).squeeze(1)
    if len(valid) == 0:
        zero = emb.sum() * 0
        return {"ce": zero, "reg": zero}
    v, lab = v[valid], lab[valid]
    pick = torch.randperm(len(v), generator=generator, device="cpu")[:num_samples].to(v.device)
    logits = v[pick] @ protos.t() / tau  # (S, C)
    ce = weight * F.cross_entropy(logits, lab[pick])
    # Sign note: sum_k log pi_k is largest (= -C ln C) at the uniform pi, so *minimising* L_reg
    # pushes the batch-mean embedding away from uniform similarity; L_reg <= -reg_weight.
    v_bar = v.mean(0)  # over all valid pixels, not renormalised
    log_pi = F.log_softmax(v_bar @ protos.t() / tau, dim=0)  # (C,)
    reg = reg_weight * log_pi.sum() / (c * math.log(c))
    return {"ce": ce, "reg": reg}


def make_adapter(dim: int) -> nn.Module:
    """The learnable 1x1 adapter r (the official ``reg_proj``): D -> D, with bias."""
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

    judge="student" (paper code): raw projections, no temperature;
    judge="teacher" (follow-up code): EMA-teacher features, both sides L2-normalised, / tau.
    ``emb_src`` is detached here; gradient flows through ``emb_s2t`` (to G) and the adapter.
    """
    protos = protos.detach()
    src, s2t = emb_src.detach(), adapter(emb_s2t)
    if judge == "teacher":
        src, s2t = F.normalize(src, dim=1), F.normalize(s2t, dim=1)
        scale = 1.0 / tau
    elif judge == "student":
        scale = 1.0
    else:
        raise ValueError(f"judge must be 'student' or 'teacher', got {judge!r}")
    sim_src = torch.einsum("bdhw,cd->bchw", src, protos) * scale  # (B, C, h, w)
    sim_s2t = torch.einsum("bdhw,cd->bchw", s2t, protos) * scale
    return weight * F.mse_loss(sim_s2t, sim_src)


@contextmanager
def frozen(*modules: nn.Module):
    """Turn ``requires_grad`` off for the modules' parameters, restoring the exact flags after.

    Gradient still flows *through* the modules to their inputs (here: to G via x_s2t).
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
