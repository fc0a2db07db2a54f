"""The book's figures: anomaly-map grids, ROC and PRO curves, score histograms, 2-D embeddings.

Every function draws into ``ax`` when given one (else a new figure) and returns
the figure, with a title, axis labels and a legend, so it reads well in the book.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["overlay_grid", "roc_curves", "pro_curve_plot", "score_histograms", "embed_2d", "embedding_plot"]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _axes(ax, figsize=(5, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def overlay_grid(images, masks, maps, *, scores=None, titles: Sequence[str] = ("image", "ground truth", "anomaly map"),
                 suptitle: str | None = None, vmax: float | None = None):
    """Rows = samples; columns = image / ground-truth mask / anomaly map over the image.

    ``images`` N×3×H×W, ``masks`` and ``maps`` N×1×H×W. The colour scale of the maps is
    shared by all rows (0 to ``vmax``, default the largest value shown), so rows compare.
    """
    images, masks, maps = _np(images), _np(masks)[:, 0], _np(maps)[:, 0]
    n = len(images)
    vmax = float(maps.max()) if vmax is None else vmax
    fig, axes = plt.subplots(n, 3, figsize=(7.2, 2.2 * n), squeeze=False, layout="constrained")
    for i in range(n):
        rgb = images[i].transpose(1, 2, 0)
        axes[i, 0].imshow(rgb)
        axes[i, 1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[i, 2].imshow(rgb)
        im = axes[i, 2].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
        if scores is not None:
            axes[i, 2].text(2, 2, f"score {float(_np(scores)[i]):.3g}", color="white", fontsize=8, va="top",
                            bbox=dict(facecolor="black", alpha=0.5, pad=1))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(0.9, 2.5 / n), label="anomaly score")
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
