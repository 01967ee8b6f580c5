"""Class prototypes: the projection and CAM heads, and the prototype memory (EMA of centroids).

Taught in notebooks/03_feature_alignment.ipynb.

A prototype P_k is the unit-norm mean embedding of class k. CONFETI estimates it from the EMA
teacher's projected features of the **ClassMix image** (stylized-source pixels with ground truth
+ target pixels with pseudo-labels), so each prototype carries "category-wise cross-domain
information"; the teacher's CAM ranks pixels so only the top-k most class-discriminative ones
of each class count (docs/method.md §6.2, §6.3):

    mu_k = sum_{i in top-k(w)} w_i v_i / sum w_i,    P_k <- m_k P_k + (1 - m_k) mu_k / ||mu_k||

Deviations from the official code (docs/deviations.md rows 4 and 5):

- Resolution: as the official code (``ori_size=True``), the top-k is taken over the pixels of the
  label map with the CAM upsampled to it; the official code upsamples the whole 512-d feature map
  to the crop (~1 GB for two 512x512 crops), here only the k selected pixels per class are
  interpolated (the same numbers). ``resolution="feature"`` is the cheap variant: labels resized
  to the feature grid, top-k over its cells (on the toy, at most 512 cells per batch).
- Warm-up (no weights): a plain mean over every pixel of the class (the follow-up code's
  warm-up); the official v1 code takes the top-32 of uniform weights, i.e. arbitrary pixels.
- Momentum ramp: m_k = min(1 - 1/(n_k + 1), momentum) with n_k = number of earlier updates of
  class k, so m_k = 0, 1/2, 2/3, ... until it reaches ``momentum`` (a running mean at first).
  The official step size min(1 - 1/(n + 1), 0.001) is already 0.001 from the second update on,
  i.e. the official ramp is a no-op (``ramp=False`` reproduces it: replace, then constant m).
- ``counts`` is a buffer, so it is saved in checkpoints (the official counter is not, and a
  resumed run treats its next update as a first observation that replaces the prototype).
- Distributed: the per-class sums sum_i w_i v_i and sum_i w_i are all-reduced before the EMA, so
  every rank holds identical prototypes; the top-k selection is per rank (k pixels per class per
  rank enter the sum).

Shape: emb (B, D, h, w), labels (B, H, W), weights (B, C, h, w), mask (B, H, W) -> protos (C, D).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .labels import IGNORE_INDEX, resize_labels


class ProjectionHead(nn.Module):
    """1x1 convolution F -> D without bias (the official ``conv_proj``); output not normalised."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, 1, bias=False)

    def forward(self, feats):
        return self.conv(feats)  # (B, D, h, w)


class CAMHead(nn.Module):
    """1x1 convolution F -> C without bias: class activation maps (pre-ReLU)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, feats):
        return self.conv(feats)  # (B, C, h, w)


def class_presence(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """z_{b,k} = 1 iff class k occurs in image b. Shape: (B, H, W) -> (B, C) float."""
    valid = labels.flatten(1)
    valid = valid.masked_fill((valid < 0) | (valid >= num_classes), num_classes)  # ignore bin
    present = valid.new_zeros(valid.shape[0], num_classes + 1, dtype=torch.float32)
    present.scatter_(1, valid, 1.0)  # z_{b, y_i} = 1 for every pixel i of image b
    return present[:, :num_classes]


def cam_loss(
    cam_logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Multi-label BCE of the globally pooled CAM: BCE-with-logits(GAP(cam), z), mean over B x C.

    z_{b,k} = 1 iff class k appears in image b's labels (``ignore_index`` never counts).
    Shape: cam_logits (B, C, h, w), labels (B, H, W) at any resolution -> scalar.
    """
    labels = labels.masked_fill(labels == ignore_index, -1)  # -1: out of range, dropped below
    pooled = cam_logits.float().mean(dim=(2, 3))  # (B, C) global average pooling
    return F.binary_cross_entropy_with_logits(pooled, class_presence(labels, num_classes))


class PrototypeMemory(nn.Module):
    """C x D prototypes, rows unit-norm (zero while a class is unseen), EMA-updated.

    Buffers: ``protos`` (C, D) float, zeros at start; ``counts`` (C,) long, updates per class.
    Shape: update(emb (B, D, h, w), labels (B, H, W), weights (B, C, h, w), mask (B, H, W)).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.999,
        top_k: int = 32,
        ramp: bool = True,
        resolution: str = "label",
    ):
        super().__init__()
        if resolution not in ("label", "feature"):
            raise ValueError(f"resolution must be 'label' or 'feature', got {resolution!r}")
        self.num_classes, self.momentum, self.top_k, self.ramp = num_classes, momentum, top_k, ramp
        self.resolution = resolution
        self.register_buffer("protos", torch.zeros(num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    def get(self) -> torch.Tensor:
        """The prototypes, detached: the contrast never sends gradient into them."""
        return self.protos.detach().clone()

    @torch.no_grad()
    def class_sums(self, emb, labels, weights=None, mask=None):
        """Per class, the weighted sum of its top-k pixels and the sum of their weights.

        ``resolution="label"`` (the official estimator): the pixels are those of the label map
        (H, W); the weights are the CAM bilinearly upsampled to (H, W), the top-k pixels of each
        class by weight are kept, and their embeddings are the features bilinearly upsampled at
        exactly those pixels (``sample_bilinear``: the same numbers as upsampling the whole
        feature map first, without its memory). ``resolution="feature"`` (cheap): labels and
        mask resized (nearest) to the feature grid (h, w) and the top-k taken over its cells.
        ``weights=None`` (the warm-up): every pixel of the class counts, w_i = 1 (a plain mean,
        as the follow-up code's warm-up). Ignore (255) and masked-out pixels are dropped.
        Shape: -> sums (C, D) = sum_i w_i v_i, totals (C,) = sum_i w_i, pixels (C,) long.
        """
        b, d, h, w = emb.shape
        size = tuple(labels.shape[-2:]) if self.resolution == "label" else (h, w)
        lab = resize_labels(labels, size).reshape(-1)  # (N,) N = B*H*W (or B*h*w)
        if mask is not None:
            keep = resize_labels(mask.long(), size).reshape(-1).bool()
            lab = torch.where(keep, lab, torch.full_like(lab, IGNORE_INDEX))
        valid = (lab >= 0) & (lab < self.num_classes)
        c = self.num_classes
        if weights is None:  # plain mean: sum_i v_i over every pixel of class k
            idx = torch.nonzero(valid).squeeze(1)
            sums = emb.new_zeros(c, d, dtype=torch.float32)
            for part in idx.split(1 << 16):  # chunks: never the whole upsampled map at once
                sums.index_add_(0, lab[part], sample_bilinear(emb, part, size))
            totals = torch.bincount(lab[idx], minlength=c)[:c].float()
            return sums, totals, totals.long()
        wts = weights.float()
        if tuple(wts.shape[-2:]) != size:  # the CAM at label resolution
            wts = F.interpolate(wts, size=size, mode="bilinear", align_corners=False)
        wts = wts.permute(1, 0, 2, 3).reshape(c, -1)  # (C, N)
        own = valid[None] & (lab[None] == torch.arange(c, device=lab.device)[:, None])  # (C, N)
        score = torch.where(own, wts, torch.full_like(wts, -1.0))  # -1: not a pixel of class k
        k = min(self.top_k, score.shape[1])
        top, idx = torch.topk(score, k, dim=1)  # (C, k) the k largest weights of each class
        used = top > 0  # a real pixel of the class with a positive weight
        wk = torch.where(used, top, torch.zeros_like(top))  # (C, k)
        v = sample_bilinear(emb, idx.reshape(-1), size).view(c, k, d)  # (C, k, D)
        sums = (wk[..., None] * v).sum(1)  # sum_i w_i v_i
        return sums, wk.sum(1), used.sum(1)

    @torch.no_grad()
    def update(self, emb, labels, weights=None, mask=None) -> dict[int, int]:
        """One EMA update from a batch; returns {class: pixels used on this rank} of the updated.

        emb: un-normalised embeddings (B, D, h, w); labels (B, H, W) train ids, 255 = ignore;
        weights: None or non-negative (B, C, h, w) (e.g. ReLU of the teacher's CAM);
        mask: None or bool (B, H, W), False pixels are dropped (warm-up: pasted source only).
        A class whose weights sum to 0 is skipped (its count does not grow).
        """
        sums, totals, pixels = self.class_sums(emb, labels, weights, mask)
        if dist.is_available() and dist.is_initialized():  # every rank: the same prototypes
            dist.all_reduce(sums)
            dist.all_reduce(totals)
        seen = totals > 0  # (C,) the classes this batch updates
        mu = F.normalize(sums / totals.clamp_min(1e-12)[:, None], dim=1)  # mu^_k = mu_k / ||mu_k||
        n = self.counts.double()  # updates so far; m_k = min(1 - 1/(n_k + 1), momentum)
        m = torch.clamp(1 - 1 / (n + 1), max=self.momentum) if self.ramp else torch.full_like(n, self.momentum)  # fmt: skip
        m = torch.where(n == 0, torch.zeros_like(m), m).to(self.protos.dtype)[:, None]
        new = m * self.protos + (1 - m) * mu.to(self.protos.dtype)  # P_k <- m_k P_k + (1-m_k) mu^_k
        self.protos.copy_(torch.where(seen[:, None], new, self.protos))  # n_k = 0: P_k <- mu^_k
        self.counts += seen.long()
        self.protos.copy_(F.normalize(self.protos, dim=1))  # unit rows; zero rows stay zero
        flags, used = torch.stack([seen.long(), pixels.to(seen.device)]).tolist()  # one sync
        return {k: u for k, (f, u) in enumerate(zip(flags, used)) if f}


def sample_bilinear(emb: torch.Tensor, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Rows of ``F.interpolate(emb, size, mode="bilinear")`` at flat pixel indices only.

    Pixel (y, x) of the (H, W) grid reads the feature map at y_src = (y + 1/2) h/H - 1/2 (clamped
    at 0, as PyTorch's upsampling): v = sum of the 4 neighbours, weights (1-a)(1-b), ..., a b.
    ``size == (h, w)``: the cells themselves. Shape: emb (B, D, h, w), index (n,) into B*H*W -> (n, D).
    """
    b, d, h, w = emb.shape
    flat = emb.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
    H, W = size
    if (H, W) == (h, w):
        return flat[index]
    img, rem = index // (H * W), index % (H * W)
    ys = ((rem // W).float() + 0.5) * (h / H) - 0.5
    xs = ((rem % W).float() + 0.5) * (w / W) - 0.5
    ys, xs = ys.clamp_min(0), xs.clamp_min(0)
    y0, x0 = ys.floor().long(), xs.floor().long()
    a, bb = (ys - y0)[:, None], (xs - x0)[:, None]  # fractional offsets
    y1, x1 = (y0 + 1).clamp_max(h - 1), (x0 + 1).clamp_max(w - 1)
    base = img * (h * w)

    def at(y, x):
        return flat[base + y * w + x]

    return (1 - a) * ((1 - bb) * at(y0, x0) + bb * at(y0, x1)) + a * ((1 - bb) * at(y1, x0) + bb * at(y1, x1))  # fmt: skip


def similarity(emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity v~ . P_k of every pixel to every prototype (zero rows give 0).

    Shape: emb (B, D, h, w), protos (C, D) -> (B, C, h, w).
    """
    return torch.einsum("bdhw,cd->bchw", F.normalize(emb.float(), dim=1), protos.float())
