"""Figures: each returns a Figure with a title, axis labels and, where it compares things, a legend."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from uadkit import metrics, viz  # noqa: E402

rng = np.random.default_rng(0)
labels = np.r_[np.zeros(30), np.ones(30)].astype(int)
scores = rng.normal(size=60) + labels


def test_overlay_grid():
    fig = viz.overlay_grid(torch.rand(3, 3, 16, 16), torch.zeros(3, 1, 16, 16), torch.rand(3, 1, 16, 16),
                           scores=np.arange(3.0))
    assert [a.get_title() for a in fig.axes[:3]] == ["image", "ground truth", "anomaly map"]
    assert fig.axes[-1].get_ylabel() == "anomaly score"  # the shared colour bar


def test_roc_and_pro_curves():
    fig = viz.roc_curves({"image": (scores, labels)})
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert f"{metrics.image_auroc(scores, labels):.3f}" in ax.get_legend().get_texts()[0].get_text()
    maps = rng.random((4, 16, 16))
    masks = np.zeros((4, 16, 16))
    masks[:, 4:8, 4:8] = 1
    fpr, pro = metrics.pro_curve(maps, masks)
    ax = viz.pro_curve_plot(fpr, pro, label="x").axes[0]
    assert ax.get_legend() is not None and "per-region" in ax.get_ylabel()


def test_histograms():
    ax = viz.score_histograms(scores, labels).axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["normal (n=30)", "anomalous (n=30)"] and ax.get_xlabel() == "anomaly score"


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_embedding(method):
    x = np.r_[rng.normal(0, 1, (30, 8)), rng.normal(4, 1, (30, 8))]
    xy = viz.embed_2d(x, method=method, seed=0)
    assert xy.shape == (60, 2) and np.isfinite(xy).all()
    assert np.allclose(xy, viz.embed_2d(x, method=method, seed=0), atol=1e-4)  # seeded → repeatable
    fig = viz.embedding_plot(xy, scores=scores, labels=labels, title="t")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["normal", "anomaly"] and fig.axes[0].get_title() == "t"
    with pytest.raises(ValueError):
        viz.embed_2d(x, method="pca")
