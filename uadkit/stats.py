"""How sure a number is: spreads over seeds, paired bootstrap intervals, and three-valued verdicts.

A small-data run of a method gives one AUROC; another seed, or the same seed on another CPU, gives
a different one. Before a chapter says "A beats B" it asks how large that difference is next to
its noise, in one of two ways:

* **over seeds** (:func:`mean_sd`, :func:`seed_interval`): train each method with seeds 0, 1, 2, …
  and look at the per-seed differences; this covers training noise (initialisation, batches);
* **over test images** (:func:`paired_bootstrap`): one trained pair of models, the test images
  drawn again with replacement, both methods scored on the *same* draw (AUROCs on one test set
  are paired); this covers the luck of which test images there are, not training noise.

A claim then gets one of three verdicts (:func:`verdict`): it *holds* when the whole interval of
the difference lies on the side the paper claims, it is *contradicted* when the whole interval
lies on the other side, and it is *inconclusive* when the interval includes zero.
:func:`claims_table` puts such rows together.

>>> mean_sd([0.81, 0.84, 0.80])
(0.8166666666666667, 0.020816659994661344)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["mean_sd", "format_mean_sd", "seed_interval", "paired_bootstrap", "verdict", "claim",
           "claims_table", "HOLDS", "CONTRADICTED", "INCONCLUSIVE"]

HOLDS, CONTRADICTED, INCONCLUSIVE = "holds", "contradicted", "inconclusive"


def _values(values: Sequence[float], name: str = "values") -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or infinite numbers: {v.tolist()}")
    return v


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0.0 for a single value)."""
    v = _values(values)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_sd(values: Sequence[float], *, scale: float = 1.0, decimals: int = 2) -> str:
    """``"0.82 ± 0.02"``: the mean ± sd of ``values`` × ``scale`` (100 for percent)."""
    m, s = mean_sd(np.asarray(values, dtype=float) * scale)
    return f"{m:.{decimals}f} ± {s:.{decimals}f}"


def _t_quantile(p: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, dof))


def seed_interval(differences: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and ``level`` t-interval of per-seed paired differences (method A − method B, each
    seed's A and B trained with that seed): ``(mean, low, high)``. Needs at least two seeds."""
    d = _values(differences, "differences")
    if d.size < 2:
        raise ValueError("an interval over seeds needs at least two seeds")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, s = float(d.mean()), float(d.std(ddof=1))
    half = _t_quantile(0.5 + level / 2, d.size - 1) * s / math.sqrt(d.size)
    return m, m - half, m + half


def paired_bootstrap(metric: Callable, a, b, target, *, strata=None, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over test images of ``metric(a, target) − metric(b, target)``.

    ``a`` and ``b`` are two methods' outputs on the same test images (image scores ``N``, or maps
    ``N×1×H×W``), ``target`` their labels or masks, all indexed by image along the first axis.
    Each of ``n_boot`` draws picks N images with replacement (within each stratum of ``strata``,
    default: the labels when ``target`` is one label per image, so every draw keeps both classes)
    and scores both methods on that same draw. Returns ``(difference on the full set, low, high)``
    with the percentile interval at ``level``.
    """
    a, b, target = np.asarray(a), np.asarray(b), np.asarray(target)
    n = len(target)
    if len(a) != n or len(b) != n:
        raise ValueError(f"a, b and target must hold the same images: {len(a)}, {len(b)}, {n}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100 for a {level:.0%} interval, got {n_boot}")
    if strata is None and target.ndim == 1:
        strata = target
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == s)
                                                     for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    full = float(metric(a, target) - metric(b, target))
    diffs = np.empty(n_boot)
    for k in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        diffs[k] = metric(a[idx], target[idx]) - metric(b[idx], target[idx])
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return full, float(low), float(high)


def verdict(low: float, high: float, *, claimed: str = "greater") -> str:
    """The verdict on a claimed difference (A − B) from its interval ``[low, high]``.

    ``claimed="greater"``: the paper says A > B; ``"less"``: A < B. *holds* if the whole interval
    lies on the claimed side of zero, *contradicted* if it lies wholly on the other side,
    *inconclusive* if it includes zero."""
    if claimed not in ("greater", "less"):
        raise ValueError(f"claimed must be 'greater' or 'less', got {claimed!r}")
    if not low <= high:
        raise ValueError(f"low must not exceed high: [{low}, {high}]")
    if low > 0:
        return HOLDS if claimed == "greater" else CONTRADICTED
    if high < 0:
        return HOLDS if claimed == "less" else CONTRADICTED
    return INCONCLUSIVE


def claim(text: str, paper: str, difference: tuple[float, float, float], *, how: str, claimed: str = "greater",
          scale: float = 1.0, decimals: int = 3) -> dict:
    """One row of a claims table: the paper's claim in words, the paper's numbers as printed,
    this run's difference with its interval (``(mean, low, high)`` from :func:`seed_interval` or
    :func:`paired_bootstrap`), how the interval was made, and the verdict."""
    m, lo, hi = (float(x) * scale for x in difference)
    return {"claim": text, "paper": paper,
            "this run (difference, interval)": f"{m:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]",
            "interval": how, "verdict": verdict(lo, hi, claimed=claimed),
            "difference": m, "low": lo, "high": hi}


def claims_table(rows: list[dict]):
    """The claims as a DataFrame indexed by claim, showing the columns a reader needs (the raw
    ``difference``/``low``/``high`` numbers stay in ``rows`` for :func:`uadkit.repro.record`)."""
    import pandas as pd

    shown = ["paper", "this run (difference, interval)", "interval", "verdict"]
    return pd.DataFrame(rows).set_index("claim")[shown]
