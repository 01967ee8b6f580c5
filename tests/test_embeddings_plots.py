"""The t-SNE sampler (class budget, determinism, spaces, alignment scores), every figure
function (colours, legends, axis labels, class names) and ``confeti.figures`` on finished runs."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.text import Text

from confeti import plots
from confeti.config import smoke
from confeti.embeddings import Embeddings, alignment, centroids, run_tsne, sample_embeddings
from confeti.labels import CLASSES, SHORT_NAMES
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
    e = sample_embeddings(state, _domains(), per_class=8, seed=0, space="projection")
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


# ---- spaces and scores ---------------------------------------------------------------------
def test_spaces_backbone_by_default_projection_with_prototypes(state):
    back = sample_embeddings(state, _domains(), per_class=5, seed=0)
    proj = sample_embeddings(state, _domains(), per_class=5, seed=0, space="projection")
    assert back.space == "backbone" and proj.space == "projection"
    assert back.emb.shape[1] == state.student.seg.feat_channels
    assert proj.emb.shape[1] == smoke().proto_dim
    assert back.protos.shape == (0, back.emb.shape[1])  # no prototypes in the backbone space
    assert proj.protos.shape == (19, smoke().proto_dim)
    assert np.allclose(np.linalg.norm(back.emb, axis=1), 1, atol=1e-5)
    assert np.array_equal(back.labels, proj.labels)  # the same pixels in both spaces
    xy, pxy = run_tsne(back, perplexity=5, seed=0)
    assert xy.shape == (len(back.emb), 2) and pxy.shape == (0, 2)
    with pytest.raises(ValueError, match="space"):
        sample_embeddings(state, _domains(), per_class=5, space="logits")


def test_margin_and_the_fully_mixed_reference():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    lab, dom = np.array([0, 0, 1, 1] * 2), np.array(["source"] * 4 + ["target"] * 4)
    same = alignment(Embeddings(np.concatenate([a, a]), lab, dom, np.eye(19, 2)), k=1)
    assert same["per_class_margin"][0] == pytest.approx(1.0)  # own 1, nearest other 0
    swapped = alignment(Embeddings(np.concatenate([a, a[:, ::-1]]), lab, dom, np.eye(19, 2)), k=1)
    assert swapped["mean_margin"] == pytest.approx(-1.0)  # nearer the other class
    # 2 source + 2 target pixels per class: a domain-blind neighbour is a source one 2/3 of the time
    assert same["knn_mixing_chance"] == pytest.approx(2 / 3)
    # two separate islands per class: the neighbour of a target pixel is always a target pixel
    apart = np.concatenate([a + [0.0, 0.01], a * [1.0, -1.0] + [0.0, -0.01]])
    apart /= np.linalg.norm(apart, axis=1, keepdims=True)
    cut = alignment(Embeddings(apart, lab, dom, np.eye(19, 2)), k=1)
    assert cut["knn_mixing"] == pytest.approx(0.0)


def test_short_names_fit_and_are_used_in_the_ablation_table():
    from confeti.ablation import markdown_table

    assert len(SHORT_NAMES) == len(CLASSES) == 19 and len(set(SHORT_NAMES)) == 19
    assert max(map(len, SHORT_NAMES)) <= 8
    res = {"confeti": {"miou_mean": 1.0, "miou_std": 0.0, "seeds": 1, "seconds_mean": 1.0,
                       "iou_mean": {c: 1.0 for c in CLASSES}}}  # fmt: skip
    header = [ln for ln in markdown_table(res).splitlines() if ln.startswith("| method | road")]
    assert header == ["| method | " + " | ".join(SHORT_NAMES) + " |"]


# ---- figure functions: what they promise -----------------------------------------------------
def _legend_labels(legend):
    return [t.get_text() for t in legend.get_texts()]


def test_training_curves_one_colour_per_method_and_one_legend():
    runs = {
        "source_only": [{"iter": i, "seg_src": 1.0, "phase": "train"} for i in range(5)],
        "confeti": [{"iter": i, "seg_src": 2.0, "psc": 0.1, "pseudo_q": 0.5} for i in range(5)],
        "my run": [{"iter": i, "seg_src": 3.0, "psc": 0.2} for i in range(5)],
    }
    fig = plots.plot_training_curves(runs)
    drawn = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in drawn] == ["seg_src", "psc", "pseudo_q"]
    colors = plots.method_colors(runs)
    assert colors["source_only"] == plots.METHOD_COLORS["source_only"]
    assert colors["confeti"] == plots.METHOD_COLORS["confeti"]
    assert colors["my run"] not in plots.METHOD_COLORS.values()
    for ax in drawn:  # the same run has the same colour in every panel (no colour-cycle restart)
        assert ax.get_ylabel()
        for line in ax.lines:
            assert to_hex(line.get_color()) == colors[line.get_label()]
        assert ax.get_legend() is None
    assert len(fig.legends) == 1 and _legend_labels(fig.legends[0]) == list(runs)
    assert plots.method_colors(["CONFETI", "source-only"]) == {
        "CONFETI": plots.METHOD_COLORS["confeti"],
        "source-only": plots.METHOD_COLORS["source_only"],
    }
    plt.close(fig)


def _ablation_res(methods):
    return {
        m: {"miou_mean": 30.0, "miou_std": 1.0, "seeds": 3, "seconds_mean": 10.0,
            "iou_mean": {c: 30.0 for c in CLASSES}}
        for m in methods
    }  # fmt: skip


def test_bars_take_the_method_colours_and_the_short_class_names():
    fig = plots.plot_ablation(_ablation_res(["source_only", "style", "confeti"]))
    bars = [to_hex(b.get_facecolor()) for b in fig.axes[0].patches]
    assert bars == [plots.METHOD_COLORS[m] for m in ("source_only", "style", "confeti")]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == list(SHORT_NAMES)
    plt.close(fig)
    res = _ablation_res(["selftrain", "confeti"])
    res["confeti"]["runs"] = [{"miou": 45.0}, {"miou": 47.0}]
    fig = plots.plot_ablation(res)  # one dot per seed, on the method's row
    dots = [ln for ln in fig.axes[0].lines if ln.get_marker() == "o"]
    assert [list(d.get_xdata()) for d in dots] == [[], [45.0, 47.0]]
    assert list(dots[1].get_ydata()) == [1, 1]
    plt.close(fig)
    fig = plots.plot_per_class_iou({"selftrain": {c: 10.0 for c in CLASSES}, "oracle": {}})
    ax = fig.axes[0]
    assert {to_hex(b.get_facecolor()) for b in ax.patches[:19]} == {
        plots.METHOD_COLORS["selftrain"]
    }
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SHORT_NAMES)
    plt.close(fig)
    fig = plots.plot_centroid_distance([1.0] * 19, [0.5] * 19, ("source-only", "CONFETI"))
    ax = fig.axes[0]
    assert to_hex(ax.patches[0].get_facecolor()) == plots.METHOD_COLORS["source_only"]
    assert to_hex(ax.patches[19].get_facecolor()) == plots.METHOD_COLORS["confeti"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SHORT_NAMES)
    plt.close(fig)


def test_label_map_figures_carry_a_legend_of_the_classes_present():
    x = torch.randn(2, 3, 16, 32)
    y = torch.zeros(2, 16, 32, dtype=torch.long)
    y[:, :4] = 10  # sky
    y[:, -2:] = 255  # ignore: drawn black, listed last
    pred = torch.full((2, 16, 32), 13)  # car
    fig = plots.plot_qualitative(x, y, {"confeti": pred}, n=2)
    assert _legend_labels(fig.legends[-1]) == ["road", "sky", "car", "ignore"]
    plt.close(fig)
    fig = plots.plot_domain_samples(x, y, x, pred, n=2)
    assert _legend_labels(fig.legends[-1]) == ["road", "sky", "car", "ignore"]
    plt.close(fig)
    fig = plots.plot_train_step({"x": x, "ŷ": pred, "w": torch.rand(2, 16, 32)}, suptitle="t = 5")
    assert _legend_labels(fig.legends[-1]) == ["car"] and fig._suptitle.get_text() == "t = 5"
    plt.close(fig)


def test_tsne_legend_lists_what_is_drawn_and_labels_the_prototypes():
    g = np.random.default_rng(0)
    lab = np.array([0, 13] * 10)
    xy = g.normal(size=(20, 2))
    no_sty = np.array(["source", "target"] * 10)
    pxy = np.full((19, 2), np.nan)
    pxy[13] = (0.0, 0.0)  # one prototype: car
    fig = plots.plot_tsne({"a": (xy, lab, no_sty, np.zeros((0, 2)))})
    assert _legend_labels(fig.axes[0].get_legend()) == ["source", "target"]  # no stylized, no ★
    assert _legend_labels(fig.legends[-1]) == ["road", "car"]  # the class colours
    assert all(h.get_markersize() >= 6 for h in fig.axes[0].get_legend().legend_handles)
    plt.close(fig)
    fig = plots.plot_tsne({"a": (xy, lab, no_sty, np.zeros((0, 2))), "b": (xy, lab, no_sty, pxy)},
                          {"b": "score line"}, note="what the scores mean")  # fmt: skip
    assert _legend_labels(fig.axes[0].get_legend()) == ["source", "target"]  # a draws no ★
    assert _legend_labels(fig.axes[1].get_legend()) == ["source", "target", "prototype"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["car"]  # the star is labelled
    assert fig.axes[1].get_xlabel() == "score line"
    assert "what the scores mean" in [t.get_text() for t in fig.texts]
    markers = {c.get_paths()[0].vertices.shape for c in fig.axes[0].collections}
    assert len(markers) == 2  # source and target are drawn with different marker shapes
    plt.close(fig)


def test_tsne_each_panel_legend_lists_its_own_markers_and_star_labels_do_not_overlap():
    g = np.random.default_rng(1)
    lab = np.tile(np.arange(19), 6)
    xy = g.normal(size=(len(lab), 2))
    three = np.array(["source", "stylized", "target"] * 38)
    two = np.where(three == "stylized", "source", three)
    pxy = np.full((19, 2), np.nan)
    pxy[[2, 4, 5, 7, 11]] = (0.2, 0.1)  # five prototypes on one spot (person, building, ...)
    pxy[[1, 9]] = [(1.0, 1.5), (1.05, 1.52)]  # sidewalk and terrain almost on one spot
    pxy[[10, 6]] = [(-1.0, -1.0), (-0.98, -1.03)]  # sky and traffic light
    fig = plots.plot_tsne({"a": (xy, lab, two, np.zeros((0, 2))), "b": (xy, lab, three, pxy)})
    assert _legend_labels(fig.axes[0].get_legend()) == ["source", "target"]
    assert _legend_labels(fig.axes[1].get_legend()) == ["source", "stylized", "target", "prototype"]  # fmt: skip
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t) for t in fig.axes[1].texts]  # the name, not its leader
    assert len(boxes) == 9
    for i, a in enumerate(boxes):  # no two prototype names overlap
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
    plt.close(fig)


def test_prototype_alignment_draws_margins_in_distinguishable_styles():
    hist = {"iter": [0, 10, 20], **{c: [0.1, 0.2, None] for c in CLASSES}}
    fig = plots.plot_prototype_alignment(hist)
    ax = fig.axes[0]
    assert "margin" in ax.get_ylabel() and "margin" in ax.get_title()
    classes = [ln for ln in ax.lines if ln.get_label() != "mean"]
    assert [ln.get_label() for ln in classes] == list(SHORT_NAMES)
    styles = {(to_hex(ln.get_color()), ln.get_linestyle()) for ln in classes}
    assert len(styles) == 19  # no two classes share colour and line style
    assert sorted(t.get_text() for t in ax.texts) == sorted([*SHORT_NAMES, "mean"])  # end labels
    ys = sorted(t.get_position()[1] for t in ax.texts)
    assert min(np.diff(ys)) > 0  # moved apart: equal end values do not print on top of each other
    by_label = {ln.get_label(): ln for ln in ax.lines}
    for k, name in enumerate(SHORT_NAMES):  # the class's palette colour, as in every figure
        assert to_hex(by_label[name].get_color()) == to_hex(plots.class_color(k))
    for t in ax.texts:  # the leader shows the line's colour and dash; the name is readable
        ln = by_label[t.get_text()]
        assert to_hex(t.arrow_patch.get_edgecolor()) == to_hex(ln.get_color())
        assert t.arrow_patch.get_linestyle() == ln.get_linestyle()
        assert _contrast_on_white(t.get_color()) >= 4.5
    plt.close(fig)


def _contrast_on_white(color):
    rgb = np.array(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return 1.05 / (float(lin @ [0.2126, 0.7152, 0.0722]) + 0.05)


def test_class_frequencies_tick_names_are_black_over_palette_swatches():
    f = np.full(19, 1 / 19)
    fig = plots.plot_class_frequencies(f, f)
    ax = fig.axes[0]
    ticks = ax.get_xticklabels()
    assert [t.get_text() for t in ticks] == list(CLASSES)
    assert all(_contrast_on_white(t.get_color()) >= 4.5 for t in ticks)  # no yellow on white
    (swatches,) = [c for c in ax.collections if len(c.get_offsets()) == 19]
    assert [to_hex(c) for c in swatches.get_facecolors()] == [to_hex(plots.class_color(k)) for k in range(19)]  # fmt: skip
    plt.close(fig)


def test_readable_color_darkens_only_what_is_too_light():
    assert _contrast_on_white(plots.readable_color(plots.class_color(7))) >= 4.5  # traffic sign
    assert plots.readable_color("#000080") == pytest.approx(to_rgb("#000080"))  # already dark


# ---- confeti.figures on finished runs ---------------------------------------------------------
def test_write_figures_from_finished_runs(toy, tmp_path):
    from confeti import figures
    from confeti.runner import train

    cfg = smoke()
    for m in ("source_only", "confeti"):
        train(cfg, m, toy, tmp_path / "runs" / m, progress=False)
    (tmp_path / "runs" / "style").mkdir()  # an unfinished run (no eval.json) is not drawn
    out = tmp_path / "figures"
    written = figures.write_figures(tmp_path / "runs", toy, out)
    expected = {"method.png", "qualitative.png", "per_class_iou.png", "training_curves.png",
                "stylization.png", "tsne.png", "centroid_distance.png", "train_step.png"}  # fmt: skip
    assert set(written) == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected | {"alignment_scores.json"})
    scores = json.loads((out / "alignment_scores.json").read_text())
    assert set(scores["source_only"]) == {"backbone", "k"}
    assert set(scores["confeti"]) == {"backbone", "projection", "k"}
    for key in ("mean_cosine", "mean_margin", "knn_mixing", "knn_mixing_chance"):
        assert key in scores["confeti"]["backbone"]
    fig = figures.train_step_figure(tmp_path / "runs" / "confeti", toy)
    total = cfg.style_pretrain_iters + cfg.iters
    assert f"{cfg.iters:,} iterations" in fig._suptitle.get_text()  # which state drew it
    assert f"t = {cfg.iters:,} (iteration {total + 1:,}" in fig._suptitle.get_text()
    plt.close(fig)


def test_paired_difference_plot_draws_the_mean_per_class_and_a_dot_per_seed():
    diff = {"seeds": [0, 1], "miou": [-1.0, -1.6],
            "iou": {c: [2.0, 4.0] for c in CLASSES}}  # fmt: skip
    diff["iou"]["bicycle"] = [-17.0, -13.0]
    fig = plots.plot_paired_difference(diff, "confeti", "selftrain")
    ax = fig.axes[0]
    heights = [b.get_height() for b in ax.patches]
    assert heights[CLASSES.index("bicycle")] == -15.0 and heights[0] == 3.0
    # a gain is drawn in CONFETI's colour, a loss in selftrain's
    assert to_hex(ax.patches[0].get_facecolor()) == plots.METHOD_COLORS["confeti"]
    assert to_hex(ax.patches[CLASSES.index("bicycle")].get_facecolor()) == plots.METHOD_COLORS["selftrain"]  # fmt: skip
    dots = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert len(dots) == 2 and list(dots[1].get_ydata())[CLASSES.index("bicycle")] == -13.0
    assert "-1.0, -1.6" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SHORT_NAMES)
    plt.close(fig)
