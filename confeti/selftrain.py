"""Self-training base inherited from DACS / DAFormer (docs/method.md §3).

An EMA **teacher** labels the target; its confident share q weights the pseudo-labels; **ClassMix**
pastes half of the source classes onto the target; a **strong augmentation** (colour jitter, blur)
perturbs the mixed image; the **ImageNet feature distance** keeps the student's features of "thing"
classes close to those of an ImageNet network. Pure torch (no kornia); every random draw comes from
an optional ``torch.Generator``, so a seed reproduces it.

Taught in notebooks/04_joint_training.ipynb.

Shape: images (B, 3, H, W) ImageNet-normalised; labels (B, H, W) int64 train ids, 255 = ignore;
masks and pixel weights (B, H, W) float; features (B, C, h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import denormalize, normalize
from .labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES
from .prototypes import class_presence


# ---- EMA teacher (docs/method.md §3.1) ------------------------------------------------------
@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, iteration: int, alpha: float) -> float:
    """Mean teacher: φ ← α_t φ + (1 − α_t) θ with the warm-up α_t = min(1 − 1/(t+1), α).

    At t = 0, α_t = 0 and the teacher becomes an exact copy of the student. Only **parameters**
    are averaged, as in the official code; buffers (BN running statistics) are neither averaged
    nor copied: the teacher pseudo-labels in train mode, so it uses batch statistics anyway.

    Shape: two modules with the same parameter list. Returns α_t.
    """
    alpha_t = min(1.0 - 1.0 / (iteration + 1), alpha)  # α_t = min(1 − 1/(t+1), α)
    phis, thetas = list(teacher.parameters()), [p.detach() for p in student.parameters()]
    if len(phis) != len(thetas):
        raise ValueError(f"teacher has {len(phis)} parameters, student {len(thetas)}")
    if alpha_t == 0.0:
        torch._foreach_copy_(phis, thetas)  # α_0 = 0: φ ← θ (also clears NaN in φ, unlike 0·φ)
    else:  # one fused op per line over all tensors
        torch._foreach_mul_(phis, alpha_t)
        torch._foreach_add_(phis, [t.to(p.dtype) for p, t in zip(phis, thetas)], alpha=1 - alpha_t)
    return alpha_t


# ---- pseudo-labels (docs/method.md §3.2) -----------------------------------------------------
@torch.no_grad()
def pseudo_label(
    logits: torch.Tensor, threshold: float = 0.968, ignore_top: int = 15, ignore_bottom: int = 120
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits -> hard pseudo-labels ŷ, pixel weights and the quality q.

    ŷ = argmax_c softmax(logits); q = |{pixels of the whole batch with max_c p ≥ threshold}| / |pixels|
    (one scalar, as DACS); weights = q everywhere except the top ``ignore_top`` and bottom
    ``ignore_bottom`` rows of each crop, which get 0 (0 rows = no band).

    Shape: logits (B, C, H, W) -> labels (B, H, W) long, weights (B, H, W) float, q () tensor.
    """
    probs = torch.softmax(logits.float(), dim=1)  # (B, C, H, W)
    conf, labels = probs.max(dim=1)  # (B, H, W) each
    q = (conf >= threshold).float().mean()  # q = mean[max_c p ≥ τ_p], a tensor: no host sync
    weights = q.expand_as(conf).clone()  # w = q
    if ignore_top > 0:
        weights[:, :ignore_top, :] = 0.0
    if ignore_bottom > 0:
        weights[:, -ignore_bottom:, :] = 0.0
    return labels, weights, q


# ---- ClassMix (docs/method.md §3.3) ----------------------------------------------------------
def class_mix_masks(
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """ClassMix masks: per image, ⌈n/2⌉ of its own n classes, drawn without replacement.

    M_i = 1 where y_i ∈ chosen classes. This fixes a quirk of the official code (DACS/DAFormer
    draw from ``torch.unique`` of the whole batch, so an image may get a class it lacks, or 255):
    here the draw is from the classes of image i only, never 255. An image with no valid class
    gets an all-zero mask. Vectorised over the batch, no host synchronisation: every class gets a
    uniform random score, and an image keeps the ⌈n/2⌉ of its present classes that score lowest
    (a uniform subset of that size).

    Shape: labels (B, H, W) long -> masks (B, H, W) float in {0, 1}.
    """
    b, c = labels.shape[0], num_classes
    present = class_presence(labels, c).bool()  # (B, C) z_{b,k}
    dev = generator.device if generator is not None else labels.device
    scores = torch.rand(b, c, generator=generator, device=dev).to(labels.device)  # (B, C)
    scores = scores.masked_fill(~present, 2.0)  # absent classes rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # rank of each class within its image
    half = (present.sum(1) + 1) // 2  # ⌈n/2⌉
    chosen = present & (ranks < half[:, None])  # (B, C)
    valid = (labels >= 0) & (labels < c)
    picked = chosen.gather(1, labels.clamp(0, c - 1).flatten(1)).view_as(labels)
    return (picked & valid).float()


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste ``a`` onto ``b`` where mask = 1: a ⊙ M + b ⊙ (1 − M).

    Works for images (mask broadcast over channels), labels (integer dtype kept) and weight maps.
    Shape: a, b (B, 3, H, W) or (B, H, W); mask (B, H, W) -> like a.
    """
    if a.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)  # (B, 1, H, W): broadcast over channels
    if not a.is_floating_point():
        return torch.where(mask.bool(), a, b)  # exact, keeps the integer dtype
    mask = mask.to(a.dtype)
    return a * mask + b * (1 - mask)  # a ⊙ M + b ⊙ (1 − M)


def mix_weights(mask: torch.Tensor, pseudo_weights: torch.Tensor) -> torch.Tensor:
    """Pixel weights of the mixed image: w_m = M·1 + (1 − M)·w (pasted source pixels weigh 1).

    Shape: mask, pseudo_weights (B, H, W) -> (B, H, W).
    """
    return mix(torch.ones_like(pseudo_weights), pseudo_weights, mask)


# ---- strong augmentation: colour jitter + Gaussian blur (docs/method.md §3.4) ----------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma. Shape: (B, 3, H, W) in [0, 1] -> (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV, all three in [0, 1] (hue as a fraction of the turn).

    Shape: (B, 3, H, W) -> (B, 3, H, W).
    """
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(dim=1)  # v = max(r, g, b)
    delta = maxc - x.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # h·6 = (g − b)/Δ mod 6 if max = r; (b − r)/Δ + 2 if max = g; (r − g)/Δ + 4 if max = b
    h = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4], dim=1)
    h = h.gather(1, argmax.unsqueeze(1)).squeeze(1) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))  # grey pixels: hue 0
    s = delta / maxc.clamp_min(1e-12)  # s = Δ / v (0 for black, where Δ = 0 too)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] -> RGB in [0, 1]: c_n = v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6.

    with n = 5, 3, 1 for r, g, b. Shape: (B, 3, H, W) -> (B, 3, H, W).
    """
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # (B, 1, H, W) each
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + 6 * h) % 6  # (B, 3, H, W)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Colour jitter in the torchvision/kornia convention, fixed order b, c, s, h; clamp after each.

    brightness x·b; contrast x·c + mean(gray(x))·(1 − c) (mean per image); saturation
    x·s + gray(x)·(1 − s); hue: shift H by ``hue`` turns in HSV (RGB <-> HSV written here).
    Factors 1, 1, 1, 0 are the identity. Shape: (B, 3, H, W) in [0, 1] -> same.
    """
    x = (x * brightness).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x * contrast + mean * (1 - contrast)).clamp(0, 1)
    x = (x * saturation + _gray(x) * (1 - saturation)).clamp(0, 1)
    if hue != 0:
        hsv = rgb_to_hsv(x)
        hsv = torch.cat([(hsv[:, :1] + hue) % 1.0, hsv[:, 1:]], dim=1)  # H ← (H + h) mod 1
        x = hsv_to_rgb(hsv).clamp(0, 1)
    return x


def blur_kernel_size(height: int, width: int) -> int:
    """≈ 10 % of the shorter side, forced odd, at least 3 (51 for 512, 63 for 640, as DACS)."""
    k = math.ceil(0.1 * min(height, width))
    return max(3, k if k % 2 == 1 else k - 1)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: g(u) ∝ exp(−u² / 2σ²), Σ g = 1.

    Shape: (B, C, H, W) -> (B, C, H, W).
    """
    c, r = x.shape[1], kernel_size // 2
    u = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - r
    g = torch.exp(-(u**2) / (2 * sigma**2))
    rows = min(r, x.shape[-2] - 1)  # reflect padding needs pad < size (tiny images only)
    cols = min(r, x.shape[-1] - 1)
    g_v, g_h = g[r - rows : r + rows + 1], g[r - cols : r + cols + 1]  # truncated: renormalise
    x = F.pad(x, (cols, cols, rows, rows), mode="reflect")
    x = F.conv2d(x, (g_v / g_v.sum()).view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)  # vertical
    return F.conv2d(x, (g_h / g_h.sum()).view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    dev = generator.device if generator is not None else "cpu"
    return lo + (hi - lo) * torch.rand((), generator=generator, device=dev).item()


def strong_augment(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    jitter_p: float = 0.8,
    strength: float = 0.2,
    blur_p: float = 0.5,
) -> torch.Tensor:
    """DACS strong augmentation, drawn per image as the official code does.

    For each image: with probability ``jitter_p`` colour jitter with b, c, s ~ U(1 − s₀, 1 + s₀)
    and a hue shift ~ U(−s₀, s₀) turns (s₀ = ``strength``); then with probability ``blur_p`` a
    Gaussian blur with σ ~ U(0.15, 1.15) and a kernel of ≈ 10 % of the shorter side (odd).
    Works in [0, 1] RGB, clamps, and renormalises. All draws come from ``generator``.

    Shape: (B, 3, H, W) ImageNet-normalised -> (B, 3, H, W) ImageNet-normalised.
    """
    out = []
    for img in x.split(1):  # a new parameter set for every image
        do_jitter = _uniform(0, 1, generator) < jitter_p
        factors = [_uniform(1 - strength, 1 + strength, generator) for _ in range(3)]
        hue = _uniform(-strength, strength, generator)
        do_blur = _uniform(0, 1, generator) < blur_p
        sigma = _uniform(0.15, 1.15, generator)
        if do_jitter or do_blur:
            rgb = denormalize(img).clamp(0, 1)  # (1, 3, H, W) in [0, 1]
            if do_jitter:
                rgb = color_jitter(rgb, *factors, hue)
            if do_blur:
                rgb = gaussian_blur(rgb, sigma, blur_kernel_size(*rgb.shape[-2:])).clamp(0, 1)
            img = normalize(rgb)
        out.append(img)
    return torch.cat(out)


# ---- ImageNet feature distance (docs/method.md §3.6) -----------------------------------------
def thing_cell_mask(
    labels: torch.Tensor,
    size: tuple[int, int],
    thing_classes=THING_CLASSES,
    ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """Cells of a (h, w) grid whose majority class covers ≥ ``ratio`` of it and is a thing class.

    The one-hot of the labels (ignore as an extra class C) is average-pooled to (h, w), so each
    cell holds its class shares; cell = argmax share if max share ≥ ratio.
    Shape: labels (B, H, W) -> (B, h, w) bool.
    """
    y = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, num_classes), labels)
    onehot = F.one_hot(y, num_classes + 1).permute(0, 3, 1, 2).float()  # (B, C+1, H, W)
    shares = F.adaptive_avg_pool2d(onehot, size)  # (B, C+1, h, w)
    top, cls = shares.max(dim=1)  # (B, h, w) each
    things = torch.as_tensor(list(thing_classes), device=labels.device)
    return (top >= ratio) & torch.isin(cls, things)


def feature_distance(
    f_student: torch.Tensor,
    f_imnet: torch.Tensor,
    labels: torch.Tensor,
    thing_classes=THING_CLASSES,
    ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """DAFormer's ImageNet feature distance on thing classes (unweighted; λ_FD is the caller's).

    L_FD = mean over selected cells (i, j) of ‖f_s[:, i, j] − f_IN[:, i, j]‖₂, f_IN detached.
    If no cell qualifies the official code returns NaN (mean of nothing); here the guard returns
    ``f_student.sum() * 0``: zero, graph-connected, no NaN.

    Shape: f_student, f_imnet (B, C, h, w); labels (B, H, W) -> scalar.
    """
    mask = thing_cell_mask(labels, f_student.shape[-2:], thing_classes, ratio, num_classes)
    if not bool(mask.any()):
        return f_student.sum() * 0
    diff = (f_student - f_imnet.detach()).permute(0, 2, 3, 1)[mask]  # (N, C) selected cells
    return diff.norm(p=2, dim=1).mean()  # mean ‖f_s − f_IN‖₂
