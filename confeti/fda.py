"""Fourier domain adaptation (FDA, Yang & Soatto, CVPR 2020): a training-free translation.

The amplitude spectrum of an image carries its low-level "style" (colour cast, illumination,
contrast), the phase its content. FDA gives a source image the **low-frequency amplitude** of a
target image and keeps its own phase:

    A, P = |FFT(x_s)|, angle(FFT(x_s));    A_t = |FFT(x_t)|
    A[M_b] <- A_t[M_b],   M_b = the (2b+1) x (2b+1) lowest frequencies, b = floor(beta * min(H, W))
    x_s2t = IFFT(A * exp(i P))

No network, no training: it fixes what a fixed global transform can fix (colour, brightness,
global contrast) and nothing else (textures, shapes, object sizes, class frequencies). The
``fda`` ablation method trains the segmentor on x_s2t with no self-training: a method-agnostic
measure of how much of a domain gap is global appearance. Taught in notebooks/02.

Shape: images (B, 3, H, W) ImageNet-normalised -> (B, 3, H, W) ImageNet-normalised.
"""

from __future__ import annotations

import math

import torch

from .datasets import denormalize, normalize


def low_freq_window(height: int, width: int, beta: float) -> int:
    """b = floor(beta * min(H, W)): the half-width of the swapped square of frequencies."""
    return int(math.floor(beta * min(height, width)))


def fda_transfer(x_src: torch.Tensor, x_tgt: torch.Tensor, beta: float) -> torch.Tensor:
    """Source images with the target images' low-frequency amplitude (pairwise, per channel).

    Works on RGB in [0, 1] (the images are denormalised first) and clamps the result to it.
    ``beta = 0`` still swaps the mean colour (the zero frequency). Shape: see the module.
    """
    src, tgt = denormalize(x_src).float(), denormalize(x_tgt).float()
    h, w = src.shape[-2:]
    b = low_freq_window(h, w, beta)
    f_src = torch.fft.fft2(src)  # (B, 3, H, W) complex; frequency 0 at [0, 0]
    amp, phase = f_src.abs(), f_src.angle()
    amp_t = torch.fft.fft2(tgt).abs()
    # the lowest frequencies sit in the four corners of an unshifted spectrum
    rows = torch.cat([torch.arange(0, b + 1), torch.arange(h - b, h)]).unique()
    cols = torch.cat([torch.arange(0, b + 1), torch.arange(w - b, w)]).unique()
    sel = torch.zeros(h, w, dtype=torch.bool, device=src.device)
    sel[rows[:, None], cols[None, :]] = True  # M_b
    amp = torch.where(sel, amp_t, amp)  # A[M_b] <- A_t[M_b]
    out = torch.fft.ifft2(torch.polar(amp, phase)).real  # x_s2t = IFFT(A e^{iP})
    return normalize(out.clamp(0, 1)).to(x_src.dtype)
