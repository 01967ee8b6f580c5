"""The t-SNE sampler (class budget, determinism, alignment scores) and every figure function."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from confeti import plots
from confeti.config import smoke
from confeti.embeddings import Embeddings, alignment, centroids, run_tsne, sample_embeddings
from confeti.labels import CLASSES
from confeti.train import TrainState


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    s = TrainState(smoke(), "confeti", torch.device("cpu"))
    s.protos.update(torch.randn(2, smoke().proto_dim, 4, 8), torch.randint(0, 19, (2, 4, 8)))
    return s


def _domains(n=4, h=32, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, h, w, generator=g)
    y = torch.randint(0, 4, (n, h, w), generator=g)
    y[:, :4] = 255
    return {"source": (x, y), "target": (x.flip(-1), y.flip(-1))}


def test_sampler_respects_the_budget_and_is_deterministic(state):
    e1 = sample_embeddings(state, _domains(), per_class=5, seed=3)
    e2 = sample_embeddings(state, _domains(), per_class=5, seed=3)
    e3 = sample_embeddings(state, _domains(), per_class=5, seed=4)
    assert np.array_equal(e1.emb, e2.emb) and np.array_equal(e1.labels, e2.labels)
    assert not np.array_equal(e1.emb, e3.emb)
    assert set(e1.domains) == {"source", "stylized", "target"}  # G makes the stylized domain
    for d in ("source", "stylized", "target"):
        for k in range(4):
            assert ((e1.domains == d) & (e1.labels == k)).sum() <= 5
    assert 255 not in e1.labels
    assert np.allclose(np.linalg.norm(e1.emb, axis=1), 1, atol=1e-5)


def test_alignment_scores_on_hand_made_embeddings():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    e = Embeddings(
        emb=np.concatenate([a, a]),
        labels=np.array([0, 0, 1, 1] * 2),
        domains=np.array(["source"] * 4 + ["target"] * 4),
        protos=np.eye(19, 2),
    )
    scores = alignment(e, k=1)
    assert scores["mean_cosine"] == pytest.approx(1.0)
    assert scores["per_class_distance"][0] == pytest.approx(0.0)
    c = centroids(e, "source")
    assert np.isnan(c[5]).all() and c[0] == pytest.approx([1.0, 0.0])
    moved = Embeddings(
        emb=np.concatenate([a, a[:, ::-1]]), labels=e.labels, domains=e.domains, protos=e.protos
    )
    assert alignment(moved, k=1)["mean_cosine"] == pytest.approx(0.0)


def test_tsne_places_pixels_and_seen_prototypes(state):
    e = sample_embeddings(state, _domains(), per_class=8, seed=0)
    xy, pxy = run_tsne(e, perplexity=5, seed=0)
    assert xy.shape == (len(e.emb), 2) and pxy.shape == (19, 2)
    seen = np.linalg.norm(e.protos, axis=1) > 0
    assert np.isfinite(pxy[seen]).all() and np.isnan(pxy[~seen]).all()


def test_figure_functions_return_figures_with_the_expected_axes(state):
    x, y = _domains()["source"]
    fig = plots.plot_qualitative(x, y, {"a": y, "b": y}, n=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
    res = {
        m: {
            "miou_mean": 30.0,
            "miou_std": 1.0,
            "seeds": 3,
            "seconds_mean": 10.0,
            "iou_mean": {c: 30.0 for c in CLASSES},
        }
        for m in ("source_only", "confeti")
    }
    assert len(plots.plot_ablation(res).axes) == 2
    assert isinstance(plots.plot_results_table(res), Figure)
    assert len(plots.plot_per_class_iou({"a": {c: 10.0 for c in CLASSES}}).axes) == 1
    rows = [{"iter": i, "seg_src": 1.0 / (i + 1), "phase": "train"} for i in range(5)]
    assert len(plots.plot_training_curves({"run": rows}).axes) >= 1
    e = sample_embeddings(state, _domains(), per_class=8, seed=0)
    xy, pxy = run_tsne(e, perplexity=5, seed=0)
    fig = plots.plot_tsne(
        {"a": (xy, e.labels, e.domains, pxy), "b": (xy, e.labels, e.domains, pxy)}
    )
    assert len(fig.axes) == 2
    assert len(plots.plot_centroid_distance([1.0] * 19, [0.5] * 19).axes) == 1
    d = {}
    from confeti.bench import synthetic_batch
    from confeti.train import train_step

    train_step(state, synthetic_batch(smoke(), torch.device("cpu")), 20, debug=d)
    assert isinstance(plots.plot_train_step(d), Figure)
    assert isinstance(plots.plot_stylization_grid(x, x, x, n=2), Figure)
