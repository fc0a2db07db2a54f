"""The book's figures and tables: anomaly-map grids, ROC and PRO curves, score histograms, 2-D embeddings,
and results tables shown as tables.

Every plotting function draws into ``ax`` when given one (else a new figure) and returns
the figure, with a title, axis labels and a legend, so it reads well in the book.
``use_book_style()`` sets the fonts and sizes the chapters' figures and tables share;
``show_table(df, title)`` displays a DataFrame as an HTML table with its title as caption.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["use_book_style", "show_table", "Table", "overlay_grid", "roc_curves", "pro_curve_plot", "score_histograms", "embed_2d", "embedding_plot"]


# The book's text column is about 690 px wide at a 1280-px window. A figure of PAGE_WIDTH inches at 100 dpi
# (800 px) is shown at 86 % of its size there, so a 10-pt label reads as about 9 pt: 10 pt is the
# smallest font a chapter's figure uses.
PAGE_WIDTH = 8.0


def use_book_style() -> None:
    """Fonts of at least 10 pt and 100 dpi for matplotlib (at most ``PAGE_WIDTH`` inches wide, a figure
    keeps its labels at about 9 pt or more in the book's column), and pandas tables printed whole (no
    column or width cut-off)."""
    import matplotlib as mpl
    import pandas as pd

    mpl.rcParams.update({"figure.dpi": 100, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 10,
                         "legend.title_fontsize": 10, "figure.titlesize": 12})
    pd.set_option("display.max_columns", None)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", None)


class Table:
    """A DataFrame with a title, displayed as an HTML table captioned by the title (in the book and in
    Jupyter) and as the title over ``DataFrame.to_string()`` in plain text (a terminal, and the text the
    book's regression checks compare). ``**fmt``: ``DataFrame.to_string``/``to_html`` options
    (``float_format``, ``index``, ...)."""

    def __init__(self, df, title: str | None = None, **fmt):
        self.df, self.title, self.fmt = df, title, fmt

    def __repr__(self) -> str:
        text = self.df.to_string(**self.fmt)
        return f"{self.title}\n{text}" if self.title else text

    def _repr_html_(self) -> str:
        from html import escape

        html = self.df.to_html(border=0, classes="dataframe uadkit-table", **self.fmt)
        if self.title:
            head, _, rest = html.partition(">")  # after the opening <table ...>
            html = f"{head}>\n  <caption>{escape(self.title)}</caption>{rest}"
        return html


def show_table(df, title: str | None = None, **fmt) -> None:
    """Display ``df`` as a captioned table (see ``Table``)."""
    from IPython.display import display

    display(Table(df, title, **fmt))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _axes(ax, figsize=(5, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def overlay_grid(images, masks, maps, *, scores=None, titles: Sequence[str] = ("image", "ground truth", "anomaly map"),
                 suptitle: str | None = None, vmax: float | None = None, columns: Sequence[str] | None = None):
    """Columns = samples (at most 4); rows = image / ground-truth mask / anomaly map over the image.

    ``images`` N×3×H×W, ``masks`` and ``maps`` N×1×H×W. The colour scale of the maps is shared by
    all samples (0 to ``vmax``, default the largest value shown), so they compare; its colourbar sits
    beside the row of maps. ``columns``: a heading per sample (default: its score, when given).
    """
    images, masks, maps = _np(images), _np(masks)[:, 0], _np(maps)[:, 0]
    n = len(images)
    if not 1 <= n <= 4:
        raise ValueError(f"overlay_grid shows 1 to 4 samples per figure (readable at page width), got {n}")
    vmax = float(maps.max()) if vmax is None else vmax
    size = min(1.9, (PAGE_WIDTH - 1.6) / n)  # inches per panel; room for row labels and the colourbar
    fig, axes = plt.subplots(3, n, figsize=(1.6 + size * n, 0.9 + 3 * size), squeeze=False, layout="constrained")
    for i in range(n):
        rgb = images[i].transpose(1, 2, 0)
        axes[0, i].imshow(rgb)
        axes[1, i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[2, i].imshow(rgb)
        im = axes[2, i].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
        if columns is not None:
            axes[0, i].set_title(columns[i], fontsize=10)
        elif scores is not None:
            axes[0, i].set_title(f"score {float(_np(scores)[i]):.3g}", fontsize=10)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[:, 0], titles):
        ax.set_ylabel(title)
    fig.colorbar(im, ax=axes[2, :].tolist(), label="anomaly score", shrink=0.9)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def roc_curves(curves: dict, *, ax=None, title: str = "ROC curve"):
    """One ROC curve per entry ``name -> (scores, labels)``; the legend gives each AUROC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _axes(ax)
    for name, (scores, labels) in curves.items():
        scores, labels = _np(scores).ravel(), _np(labels).ravel()
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return fig


def pro_curve_plot(fpr, pro, *, fpr_limit: float = 0.3, label: str = "PRO", ax=None, title: str = "PRO curve"):
    """Per-region overlap against false positive rate; the area used by AUPRO is shaded."""
    fpr, pro = _np(fpr), _np(pro)
    fig, ax = _axes(ax)
    ax.plot(fpr, pro, label=label)
    keep = fpr <= fpr_limit
    ax.fill_between(fpr[keep], pro[keep], alpha=0.25, label=f"area up to FPR = {fpr_limit}")
    ax.axvline(fpr_limit, ls=":", color="grey")
    ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return fig


def score_histograms(scores, labels, *, ax=None, bins: int = 30, title: str = "Image scores"):
    """Overlaid histograms of the scores of normal and anomalous samples."""
    scores, labels = _np(scores).ravel(), _np(labels).ravel()
    fig, ax = _axes(ax)
    edges = np.histogram_bin_edges(scores, bins=bins)
    ax.hist(scores[labels == 0], bins=edges, alpha=0.6, label=f"normal (n={int((labels == 0).sum())})")
    ax.hist(scores[labels == 1], bins=edges, alpha=0.6, label=f"anomalous (n={int((labels == 1).sum())})")
    ax.set(xlabel="anomaly score", ylabel="count", title=title)
    ax.legend()
    return fig


def embed_2d(vectors, *, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """N×D vectors → N×2 with t-SNE or UMAP (seeded)."""
    x = _np(vectors).astype(np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30, (len(x) - 1) / 3)).fit_transform(x)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x)
    raise ValueError(f"method must be 'tsne' or 'umap', got {method!r}")


def embedding_plot(xy, *, scores, labels, ax=None, title: str = "2-D embedding"):
    """Colour = predicted anomaly score; circle = normal, triangle = anomaly."""
    xy, scores, labels = _np(xy), _np(scores).ravel(), _np(labels).ravel()
    fig, ax = _axes(ax, figsize=(5.5, 4.5))
    norm = plt.Normalize(scores.min(), scores.max())
    for value, marker, name in ((0, "o", "normal"), (1, "^", "anomaly")):
        sel = labels == value
        sc = ax.scatter(xy[sel, 0], xy[sel, 1], c=scores[sel], cmap="coolwarm", norm=norm, marker=marker, s=18,
                        edgecolors="k", linewidths=0.2, label=name)
    fig.colorbar(sc, ax=ax, label="predicted anomaly score")
    ax.set(xlabel="dimension 1", ylabel="dimension 2", title=title)
    ax.legend(loc="best")
    return fig
