"""Pixel embeddings and prototypes, sampled per class, for t-SNE and alignment scores.

Taught in notebooks/05_prototype_tsne.ipynb. The official code ships no t-SNE; this is ours:

1. ``sample_embeddings``: run a trained student over source, stylized-source and target images,
   take L2-normalised per-pixel features and keep at most ``per_class`` pixels per class per
   domain (labels only choose and colour the pixels: the target's ground truth is never used for
   training). Deterministic under ``seed``. Two spaces (``space``):

   - ``"backbone"`` (default): the backbone's stage-4 feature map, the input of every head (ASPP
     classifier, CAM, projection). Every method trains it, so two runs compare in the same space;
   - ``"projection"``: the projection head's embeddings, the space of the prototypes and of the
     pixel-to-prototype contrast. Only a method with the contrast trains this head: for the
     others it is the random 1x1 convolution of initialisation.
2. ``run_tsne``: scikit-learn t-SNE (PCA init, fixed seed) on pixels and prototypes together, so
   each prototype lands among its pixels (projection space only: there are no prototypes in the
   backbone space).
3. ``alignment``: numbers that back the picture: the mean cosine between each class's source and
   target centroid, the per-class centroid distance, the per-class margin (own-class centroid
   cosine minus the largest cross-class one) and a k-NN domain-mixing score (the share of source
   pixels among a target pixel's k nearest neighbours of the same class), with the value it
   takes when the two domains are fully mixed.

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
    protos: np.ndarray  # (C, D) prototypes (zero rows = never observed); (0, D) in "backbone"
    space: str = "projection"  # "backbone" | "projection"


SPACES = ("backbone", "projection")


@torch.no_grad()
def pixel_embeddings(
    student, x: torch.Tensor, y: torch.Tensor, space: str = "backbone"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm per-pixel features of ``space`` and their nearest-resized labels, flattened.

    Shape: x (B, 3, H, W), y (B, H, W) -> (B*h*w, D), (B*h*w,); D = backbone channels or proto_dim
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    feats = student.features(x)  # (B, F, h, w) stage-4 features, before every head
    if space == "projection":
        feats = student.proj(feats)  # (B, D, h, w)
    emb = F.normalize(feats.float(), dim=1)  # v / ||v||: cosine geometry in both spaces
    lab = resize_labels(y, emb.shape[-2:])  # (B, h, w)
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]), lab.reshape(-1)


def sample_embeddings(
    state,
    domains: dict,
    per_class: int = 300,
    seed: int = 0,
    batch_size: int = 8,
    space: str = "backbone",
) -> Embeddings:
    """``domains``: name -> (images (N, 3, H, W), labels (N, H, W)); "stylized" is made from
    "source" with the run's generator when the run has one. ``space``: "backbone" (default) or
    "projection" (see the module docstring); the prototypes come along in "projection" only."""
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
                student, xs[i : i + batch_size].to(device), ys[i : i + batch_size].to(device), space
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
    emb = np.concatenate(out_e).astype(np.float32)
    if space == "projection":
        protos = state.protos.get().cpu().numpy()
    else:  # the prototypes live in the projection space, not here
        protos = np.zeros((0, emb.shape[1]), dtype=np.float32)
    return Embeddings(
        emb=emb,
        labels=np.concatenate(out_l),
        domains=np.concatenate(out_d),
        protos=protos,
        space=space,
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
    """Source-target alignment numbers (higher cosine / margin / mixing and lower distance = more
    aligned), from unit class centroids c_k^d of domain d:

    cos_k = <c_k^s, c_k^t>;  dist_k = ||c_k^s - c_k^t||;
    margin_k = <c_k^t, c_k^s> - max_{j != k} <c_k^t, c_j^s>  (> 0: the target centroid of k is
    nearer the source centroid of k than that of any other class; the raw cosine alone can fall
    while alignment improves, when training spreads all classes apart);
    mixing = mean over classes of [mean over the class's target pixels of (#source among its k
    nearest neighbours, cosine, within the class's source and target pixels) / k].
    0 = the domains are separate islands; a target pixel among n_s source and n_t target pixels
    of its class whose neighbours ignore the domain gets n_s / (n_s + n_t - 1) on average:
    ``knn_mixing_chance`` is that value, averaged like ``knn_mixing`` (about 0.5 for balanced
    domains: the class budget of ``sample_embeddings`` makes n_s = n_t when both have enough pixels).
    """
    cs, ct = centroids(e, source), centroids(e, target)
    both = ~np.isnan(cs).any(1) & ~np.isnan(ct).any(1)
    cos = np.where(both, np.nansum(cs * ct, axis=1), np.nan)
    dist = np.where(both, np.linalg.norm(np.nan_to_num(cs - ct), axis=1), np.nan)
    has_s = ~np.isnan(cs).any(1)
    margin = np.full(len(cs), np.nan)
    for c in np.flatnonzero(both):
        others = has_s.copy()
        others[c] = False
        if others.any():
            margin[c] = cos[c] - float((cs[others] @ ct[c]).max())  # own minus nearest other
    mix, chance = [], []
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
        n_s, n_t = int((dom == source).sum()), int(is_t.sum())
        chance.append(n_s / (n_s + n_t - 1))
    nan = float("nan")
    return {
        "mean_cosine": float(np.nanmean(cos)) if both.any() else nan,
        "per_class_cosine": cos.tolist(),
        "per_class_distance": dist.tolist(),
        "mean_margin": float(np.nanmean(margin)) if np.isfinite(margin).any() else nan,
        "per_class_margin": margin.tolist(),
        "knn_mixing": float(np.mean(mix)) if mix else nan,
        "knn_mixing_chance": float(np.mean(chance)) if chance else nan,
        "k": k,
    }
