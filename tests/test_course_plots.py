"""The course figures of notebooks 02 and 03: each returns a Figure and draws what it is given
(panel titles, bar heights, kept-pixel positions, heat-map scaling)."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from confeti import plots
from confeti.labels import CLASSES


def _images(n=3, h=16, w=32, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_translation_grid_has_one_titled_column_per_entry():
    cols = {"source": _images(), "FDA": _images(seed=1), "CUT": _images(seed=2), "target": _images(4, seed=3)}  # fmt: skip
    fig = plots.plot_translation_grid(cols, n=2)
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axes[0]] == list(cols)
    assert np.allclose(axes[1, 2].images[0].get_array(), plots.to_image(cols["CUT"][1]))
    plt.close(fig)


def test_class_colour_compare_bars_are_the_distances_to_the_reference():
    g = np.random.default_rng(0)
    target = g.uniform(size=(19, 3))
    target[5] = np.nan  # a class absent from the target
    stats = {"source": g.uniform(size=(19, 3)), "FDA": g.uniform(size=(19, 3)), "target": target}
    fig = plots.plot_class_colour_compare(stats, reference="target")
    assert isinstance(fig, Figure)
    bars = fig.axes[1].containers
    assert len(bars) == 2  # one bar set per non-reference entry
    for name, container in zip(("source", "FDA"), bars):
        heights = np.array([r.get_height() for r in container])
        expected = np.linalg.norm(stats[name] - target, axis=1)
        assert np.allclose(heights, expected, equal_nan=True)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels[1].startswith("FDA → target") and f"{np.nanmean(expected):.3f}" in labels[1]
    plt.close(fig)


def test_cam_maps_share_one_scale_at_label_resolution():
    cams = torch.tensor([[[0.5, -1.0], [2.0, 1.0]], [[-3.0, -1.0], [-2.0, -0.5]], [[4.0, 0.0], [0.0, 0.0]]])  # fmt: skip
    labels = torch.full((4, 6), 255)
    labels[:2] = 0  # class 0 on the top half; class 13 absent; class 2 bottom-left
    labels[2:, :3] = 2
    fig = plots.plot_cam_maps(cams, _images(1, 4, 6)[0], classes=[0, 13, 2], labels=labels)
    assert isinstance(fig, Figure)
    maps = fig.axes[:8]  # 2 rows x 4 (image/labels + 3 classes), then the two colorbars
    top, bottom = maps[1:4], maps[5:8]
    # the weights the prototype update uses: ReLU, then bilinear to the label map (class_sums)
    w = torch.nn.functional.interpolate(cams.relu()[None], size=(4, 6), mode="bilinear", align_corners=False)[0]  # fmt: skip
    for ax, wk in zip(top, w):
        assert np.allclose(np.asarray(ax.images[0].get_array()), wk.numpy(), atol=1e-6)
    clims = {ax.images[0].get_clim() for ax in top}
    assert clims == {(0.0, float(w.max()))}  # ONE colour scale for every class, not each own max
    dev = (w - w.mean(0)).numpy()
    for ax, dk in zip(bottom, dev):
        assert np.allclose(np.asarray(ax.images[0].get_array()), dk, atol=1e-6)
    span = float(np.abs(dev).max())
    assert {ax.images[0].get_clim() for ax in bottom} == {(-span, span)}  # one symmetric scale
    assert top[0].get_title().startswith(f"w {CLASSES[0]} (max {float(w[0].max()):.1f})")
    inside, outside = float(w[0][:2].mean()), float(w[0][2:].mean())
    assert f"mean in {inside:.1f} | out {outside:.1f}" in top[0].get_title()
    assert np.allclose(np.asarray(top[1].images[0].get_array()), 0.0)  # all negative -> 0
    assert "one colour scale" in fig._suptitle.get_text()
    plt.close(fig)


def test_topk_pixels_marks_exactly_the_kept_pixels():
    labels = torch.full((8, 12), 255)
    labels[:4] = 0
    labels[4:, :6] = 13
    picked = torch.zeros(2, 8, 12, dtype=torch.bool)
    picked[0, 1, 2] = picked[0, 3, 11] = True
    picked[1, 6, 0] = True
    fig = plots.plot_topk_pixels(_images(1, 8, 12)[0], labels, picked, classes=[0, 13])
    assert isinstance(fig, Figure)
    ax0, ax1 = fig.axes
    assert ax0.get_title() == f"{CLASSES[0]}: 2 of 48 px"
    assert ax1.get_title() == f"{CLASSES[13]}: 1 of 24 px"
    (dots,) = [c for c in ax0.collections if isinstance(c, PathCollection)]
    assert sorted(map(tuple, dots.get_offsets().tolist())) == [(2.0, 1.0), (11.0, 3.0)]  # (x, y)
    tint = np.asarray(ax1.images[1].get_array())
    assert tint[5, 1, 3] > 0 and tint[1, 1, 3] == 0  # only class 13's pixels are tinted
    plt.close(fig)


@pytest.mark.parametrize("n", [1, 5])
def test_translation_grid_never_asks_for_more_rows_than_images(n):
    fig = plots.plot_translation_grid({"a": _images(2), "b": _images(3)}, n=n)
    assert len(fig.axes) == 2 * min(n, 2)
    plt.close(fig)
