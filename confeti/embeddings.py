"""Pixel embeddings and prototypes, sampled per class, for t-SNE and alignment scores.

Taught in notebooks/05_prototype_tsne.ipynb. The official code ships no t-SNE; this is ours:

1. ``sample_embeddings``: run a trained student over source, stylized-source and target images,
   take the L2-normalised projected stage-4 embeddings (the space the contrast works in), and keep
   at most ``per_class`` pixels per class per domain (labels only choose and colour the pixels:
   the target's ground truth is never used for training). Deterministic under ``seed``.
2. ``run_tsne``: scikit-learn t-SNE (PCA init, fixed seed) on pixels and prototypes together, so
   each prototype lands among its pixels.
3. ``alignment``: numbers that back the picture: the mean cosine between each class's source and
   target centroid, the per-class centroid distance, and a k-NN domain-mixing score (the fraction
   of a target pixel's k nearest neighbours of the same class that come from the source).

Shape: embeddings (N, D) float32, labels (N,) int, domains (N,) str.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX, resize_labels


@dataclass
class Embeddings:
    emb: np.ndarray  # (N, D) unit-norm pixel embeddings
    labels: np.ndarray  # (N,) train ids
    domains: np.ndarray  # (N,) "source" | "stylized" | "target"
    protos: np.ndarray  # (C, D) prototypes (zero rows = never observed)


@torch.no_grad()
def pixel_embeddings(
    student, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm projected features and their nearest-resized labels, flattened.

    Shape: x (B, 3, H, W), y (B, H, W) -> (B*h*w, D), (B*h*w,)
    """
    _, feats = student(x)
    emb = F.normalize(student.proj(feats).float(), dim=1)  # (B, D, h, w)
    lab = resize_labels(y, emb.shape[-2:])  # (B, h, w)
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]), lab.reshape(-1)


def sample_embeddings(
    state, domains: dict, per_class: int = 300, seed: int = 0, batch_size: int = 8
) -> Embeddings:
    """``domains``: name -> (images (N, 3, H, W), labels (N, H, W)); "stylized" is made from
    "source" with the run's generator when the run has one."""
    student = state.student
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    rng = np.random.default_rng(seed)
    items = dict(domains)
    if getattr(state, "style", None) is not None and "source" in items:
        xs, ys = items["source"]
        with torch.no_grad():
            xs2t = torch.cat(
                [
                    state.style.translate(xs[i : i + batch_size].to(device)).cpu()
                    for i in range(0, len(xs), batch_size)
                ]
            )
        items["stylized"] = (xs2t, ys)
    out_e, out_l, out_d = [], [], []
    for name, (xs, ys) in items.items():
        embs, labs = [], []
        for i in range(0, len(xs), batch_size):
            e, lab = pixel_embeddings(
                student, xs[i : i + batch_size].to(device), ys[i : i + batch_size].to(device)
            )
            embs.append(e.cpu())
            labs.append(lab.cpu())
        e, lab = torch.cat(embs).numpy(), torch.cat(labs).numpy()
        for k in np.unique(lab):
            if k == IGNORE_INDEX:
                continue
            idx = np.flatnonzero(lab == k)
            take = rng.choice(idx, size=min(per_class, len(idx)), replace=False)
            out_e.append(e[np.sort(take)])
            out_l.append(np.full(len(take), k))
            out_d.append(np.full(len(take), name))
    student.train(was_training)
    return Embeddings(
        emb=np.concatenate(out_e).astype(np.float32),
        labels=np.concatenate(out_l),
        domains=np.concatenate(out_d),
        protos=state.protos.get().cpu().numpy(),
    )


def run_tsne(
    e: Embeddings, perplexity: float = 30.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of pixels and the observed prototypes together -> (pixels (N,2), protos (C,2)).

    Unobserved (zero) prototypes get NaN coordinates.
    """
    from sklearn.manifold import TSNE

    seen = np.linalg.norm(e.protos, axis=1) > 0
    pts = np.concatenate([e.emb, e.protos[seen]])
    perplexity = min(perplexity, (len(pts) - 1) / 3)
    xy = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500
    ).fit_transform(pts)
    protos_xy = np.full((len(e.protos), 2), np.nan)
    protos_xy[seen] = xy[len(e.emb) :]
    return xy[: len(e.emb)], protos_xy


def centroids(e: Embeddings, domain: str, num_classes: int = 19) -> np.ndarray:
    """(C, D) unit-norm class centroids of one domain; NaN rows for absent classes."""
    out = np.full((num_classes, e.emb.shape[1]), np.nan)
    for k in range(num_classes):
        sel = (e.domains == domain) & (e.labels == k)
        if sel.any():
            c = e.emb[sel].mean(0)
            out[k] = c / max(np.linalg.norm(c), 1e-12)
    return out


def alignment(e: Embeddings, source: str = "source", target: str = "target", k: int = 10) -> dict:
    """Source-target alignment numbers (higher cosine / mixing and lower distance = more aligned).

    cos_k = <c_k^s, c_k^t> for unit centroids;  dist_k = ||c_k^s - c_k^t||;
    mixing = mean over target pixels of (#source among its k same-class neighbours) / k.
    """
    cs, ct = centroids(e, source), centroids(e, target)
    both = ~np.isnan(cs).any(1) & ~np.isnan(ct).any(1)
    cos = np.where(both, np.nansum(cs * ct, axis=1), np.nan)
    dist = np.where(both, np.linalg.norm(np.nan_to_num(cs - ct), axis=1), np.nan)
    mix = []
    for c in np.flatnonzero(both):
        sel = np.flatnonzero(((e.domains == source) | (e.domains == target)) & (e.labels == c))
        if len(sel) <= k:
            continue
        pts, dom = e.emb[sel], e.domains[sel]
        sims = pts @ pts.T
        np.fill_diagonal(sims, -np.inf)
        nn = np.argsort(-sims, axis=1)[:, :k]
        is_t = dom == target
        mix.append(((dom[nn[is_t]] == source).mean(1)).mean())
    return {
        "mean_cosine": float(np.nanmean(cos)) if both.any() else float("nan"),
        "per_class_cosine": cos.tolist(),
        "per_class_distance": dist.tolist(),
        "knn_mixing": float(np.mean(mix)) if mix else float("nan"),
    }
