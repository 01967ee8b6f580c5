"""Class prototypes: the projection and CAM heads, and the prototype memory (EMA of centroids).

Taught in notebooks/03_feature_alignment.ipynb.

A prototype P_k is the unit-norm mean embedding of class k. CONFETI estimates it from the EMA
teacher's projected features of the **ClassMix image** (stylized-source pixels with ground truth
+ target pixels with pseudo-labels), so each prototype carries "category-wise cross-domain
information"; the teacher's CAM ranks pixels so only the top-k most class-discriminative ones
of each class count (spec §4):

    mu_k = sum_{i in top-k(w)} w_i v_i / sum w_i,    P_k <- m_k P_k + (1 - m_k) mu_k / ||mu_k||

Deviations from the official code (README "Deviations"):

- Resolution: centroids are taken at feature resolution (h, w): labels and mask are resized to
  it (nearest), the weights (CAM) are already at (h, w), instead of upsampling the 512-d features
  and the CAM to the full crop (``ori_size=True``, ~1 GB for two 512x512 crops); 64x cheaper.
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
    ):
        super().__init__()
        self.num_classes, self.momentum, self.top_k, self.ramp = num_classes, momentum, top_k, ramp
        self.register_buffer("protos", torch.zeros(num_classes, dim))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))

    def get(self) -> torch.Tensor:
        """The prototypes, detached: the contrast never sends gradient into them."""
        return self.protos.detach().clone()

    @torch.no_grad()
    def class_sums(self, emb, labels, weights=None, mask=None):
        """Per class, the weighted sum of its top-k pixels and the sum of their weights.

        Ignore (255) and masked-out (mask False) pixels are dropped; w_i = weights[k] at the
        pixels of class k (1 if ``weights`` is None); ties in w keep the first pixels in order.
        Shape: -> sums (C, D) = sum_i w_i v_i, totals (C,) = sum_i w_i, pixels (C,) long.
        """
        b, d, h, w = emb.shape
        lab = resize_labels(labels, (h, w)).reshape(-1)  # (B*h*w,)
        if mask is not None:
            keep = resize_labels(mask.long(), (h, w)).reshape(-1).bool()
            lab = torch.where(keep, lab, torch.full_like(lab, IGNORE_INDEX))
        v = emb.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        wts = (
            None
            if weights is None
            else weights.float().permute(0, 2, 3, 1).reshape(-1, self.num_classes)
        )
        sums = emb.new_zeros(self.num_classes, d, dtype=torch.float32)
        totals = emb.new_zeros(self.num_classes, dtype=torch.float32)
        pixels = torch.zeros(self.num_classes, dtype=torch.long)
        for k in torch.unique(lab).tolist():
            if k == IGNORE_INDEX or not 0 <= k < self.num_classes:
                continue
            idx = torch.nonzero(lab == k).squeeze(1)
            wk = torch.ones(len(idx), device=emb.device) if wts is None else wts[idx, k]
            if len(idx) > self.top_k:  # keep the k most class-discriminative pixels (stable ties)
                order = torch.sort(wk, descending=True, stable=True).indices[: self.top_k]
                idx, wk = idx[order], wk[order]
            sums[k] = (wk[:, None] * v[idx]).sum(0)  # sum_i w_i v_i
            totals[k] = wk.sum()  # sum_i w_i
            pixels[k] = len(idx)
        return sums, totals, pixels

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
        updated = {}
        for k in torch.nonzero(totals > 0).squeeze(1).tolist():
            mu = F.normalize(sums[k] / totals[k], dim=0)  # mu^_k = mu_k / ||mu_k||
            n = int(self.counts[k])
            if n == 0:
                self.protos[k] = mu  # the first observation replaces: P_k <- mu^_k
            else:  # P_k <- m_k P_k + (1 - m_k) mu^_k,  m_k = min(1 - 1/(n_k + 1), momentum)
                m = min(1 - 1 / (n + 1), self.momentum) if self.ramp else self.momentum
                self.protos[k] = m * self.protos[k] + (1 - m) * mu.to(self.protos.dtype)
            self.counts[k] += 1
            updated[k] = int(pixels[k])
        self.protos.copy_(F.normalize(self.protos, dim=1))  # unit rows; zero rows stay zero
        return updated


def similarity(emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity v~ . P_k of every pixel to every prototype (zero rows give 0).

    Shape: emb (B, D, h, w), protos (C, D) -> (B, C, h, w).
    """
    return torch.einsum("bdhw,cd->bchw", F.normalize(emb.float(), dim=1), protos.float())
