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
    """Samples across (at most 4), image / mask / map down, one colour bar beside the maps, and a figure
    no wider than the book's column (so its fonts are not shrunk)."""
    fig = viz.overlay_grid(torch.rand(3, 3, 16, 16), torch.zeros(3, 1, 16, 16), torch.rand(3, 1, 16, 16),
                           scores=np.arange(3.0))
    panels, bar = fig.axes[:9], fig.axes[-1]
    assert len(fig.axes) == 10 and [panels[3 * r].get_ylabel() for r in range(3)] == ["image", "ground truth",
                                                                                      "anomaly map"]
    assert panels[1].get_title() == "score 1"
    assert bar.get_ylabel() == "anomaly score"
    assert fig.get_figwidth() <= viz.PAGE_WIDTH
    with pytest.raises(ValueError, match="1 to 4 samples"):
        viz.overlay_grid(torch.rand(5, 3, 8, 8), torch.zeros(5, 1, 8, 8), torch.rand(5, 1, 8, 8))


def test_a_table_shows_its_title_as_caption_and_in_plain_text():
    import pandas as pd

    t = viz.Table(pd.DataFrame({"AUROC": [0.91]}, index=["mini/brick"]), "ADTR <this run>", float_format="{:.3f}".format)
    assert repr(t).splitlines() == ["ADTR <this run>", "            AUROC", "mini/brick  0.910"]
    html = t._repr_html_()
    assert html.startswith("<table") and "<caption>ADTR &lt;this run&gt;</caption>" in html and "0.910" in html


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


def test_book_style_fonts_stay_readable_in_the_column():
    """At most PAGE_WIDTH inches wide at 100 dpi, a figure is shown at about 86 % in the book's 690-px column:
    its smallest font, 10 pt, still reads as about 9 pt there."""
    import matplotlib as mpl

    with mpl.rc_context():
        viz.use_book_style()
        sizes = [mpl.rcParams[k] for k in ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize",
                                            "ytick.labelsize", "legend.fontsize", "figure.titlesize")]
        assert min(float(s) for s in sizes) >= 10 and mpl.rcParams["figure.dpi"] == 100
        assert 10 * 100 / 72 * (690 / (viz.PAGE_WIDTH * 100)) * 0.75 >= 8.9  # the 10-pt font in CSS points
