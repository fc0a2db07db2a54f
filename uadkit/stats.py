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

__all__ = ["mean_sd", "format_mean_sd", "seed_interval", "paired_bootstrap", "paired_bootstrap_pixels", "verdict", "claim",
           "seed_claim", "claims_table", "HOLDS", "CONTRADICTED", "INCONCLUSIVE"]

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


def _as_sets(a, b, target):
    """``a``, ``b``, ``target`` as equal-length lists of test sets (one set when given arrays)."""
    if isinstance(target, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) == len(target)):
            raise ValueError("with a list of test sets, a, b and target must be lists of the same length")
        sets = list(zip(a, b, target))
    else:
        sets = [(a, b, target)]
    out = []
    for sa, sb, st in sets:
        sa, sb, st = np.asarray(sa), np.asarray(sb), np.asarray(st)
        if len(sa) != len(st) or len(sb) != len(st):
            raise ValueError(f"a, b and target must hold the same images: {len(sa)}, {len(sb)}, {len(st)}")
        out.append((sa, sb, st))
    return out


def _draws(strata: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """``n_boot`` × N image indices, each row a draw with replacement within every stratum."""
    n = len(strata)
    idx = np.empty((n_boot, n), dtype=np.int64)
    col = 0
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        idx[:, col:col + len(members)] = rng.choice(members, size=(n_boot, len(members)), replace=True)
        col += len(members)
    return idx


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def paired_bootstrap(metric: Callable, a, b, target, *, strata=None, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over test images of ``metric(a, target) − metric(b, target)``.

    ``a`` and ``b`` are two methods' outputs on the same test images (image scores ``N``, or maps
    ``N×1×H×W``), ``target`` their labels or masks, all indexed by image along the first axis.
    Each of ``n_boot`` draws picks N images with replacement (within each stratum of ``strata``,
    default: the labels when ``target`` is one label per image, so every draw keeps both classes)
    and scores both methods on that same draw. Lists of arrays are several test sets (categories):
    each draw resamples every set and the difference is that of the means over sets.
    Returns ``(difference on the full sets, low, high)``, the percentile interval at ``level``.
    """
    _check_boot(n_boot, level)
    sets = _as_sets(a, b, target)
    if strata is not None and len(sets) > 1:
        raise ValueError("strata are for a single test set; several sets are stratified by their labels")
    rng = np.random.default_rng(seed)
    full = float(np.mean([metric(sa, st) - metric(sb, st) for sa, sb, st in sets]))
    diffs = np.zeros(n_boot)
    for sa, sb, st in sets:
        groups = strata if strata is not None else st if st.ndim == 1 else np.zeros(len(st))
        for k, idx in enumerate(_draws(np.asarray(groups), n_boot, rng)):
            diffs[k] += (metric(sa[idx], st[idx]) - metric(sb[idx], st[idx])) / len(sets)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return full, float(low), float(high)


def _pixel_histograms(maps: np.ndarray, masks: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the counts of its normal and of its anomalous pixels in ``bins`` quantile bins of
    all its set's pixel scores (ties share a bin): two N × bins arrays."""
    s = maps.reshape(len(maps), -1).astype(np.float64)
    y = masks.reshape(len(masks), -1) > 0.5
    edges = np.quantile(s, np.linspace(0, 1, bins + 1)[1:-1])
    code = np.searchsorted(edges, s, side="right")  # N × pixels, in 0..bins-1
    offset = (np.arange(len(s)) * bins)[:, None]
    neg = np.bincount((code + offset)[~y], minlength=len(s) * bins).reshape(len(s), bins)
    pos = np.bincount((code + offset)[y], minlength=len(s) * bins).reshape(len(s), bins)
    return neg.astype(np.float64), pos.astype(np.float64)  # float: the draws' sums go through BLAS


def _auroc_from_counts(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of each row of binned counts: P(anomalous > normal) + ½ P(same bin)."""
    below = np.cumsum(neg, axis=-1) - neg
    return ((pos * below).sum(-1) + 0.5 * (pos * neg).sum(-1)) / (pos.sum(-1) * neg.sum(-1))


def paired_bootstrap_pixels(maps_a, maps_b, masks, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                            bins: int = 4096) -> tuple[float, float, float]:
    """:func:`paired_bootstrap` of the pixel AUROC difference (maps ``N×1×H×W``, masks alike; lists
    of arrays for several test sets), with whole images drawn, stratified by whether an image
    holds a defect. A draw's AUROC is computed from per-image counts in ``bins`` quantile bins of
    the scores, which differs from the exact AUROC by at most the share of pixel pairs that fall in
    one bin (≈ 1/bins); the reported difference on the full sets is exact."""
    from .metrics import pixel_auroc

    _check_boot(n_boot, level)
    sets = _as_sets(maps_a, maps_b, masks)
    rng = np.random.default_rng(seed)
    full = float(np.mean([pixel_auroc(sa, st) - pixel_auroc(sb, st) for sa, sb, st in sets]))
    diffs = np.zeros(n_boot)
    for sa, sb, st in sets:
        (neg_a, pos_a), (neg_b, pos_b) = _pixel_histograms(sa, st, bins), _pixel_histograms(sb, st, bins)
        defective = st.reshape(len(st), -1).max(1) > 0.5
        weights = np.stack([np.bincount(idx, minlength=len(st)) for idx in _draws(defective, n_boot, rng)]).astype(np.float64)
        diffs += (_auroc_from_counts(weights @ neg_a, weights @ pos_a)
                  - _auroc_from_counts(weights @ neg_b, weights @ pos_b)) / len(sets)
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


SEEDS_COLUMN = "this run (A vs B, mean ± sd over seeds)"


def seed_claim(text: str, paper: str, a: Sequence[float], b: Sequence[float], *, claimed: str = "greater",
               level: float = 0.95, scale: float = 1.0, decimals: int = 3) -> dict:
    """One row of a claims table from trainings with several seeds: ``a[i]`` and ``b[i]`` are the
    numbers of methods A and B (e.g. a mean AUROC over categories) when both were trained with the
    i-th seed. The interval is the t-interval of the per-seed differences (:func:`seed_interval`),
    so it covers training noise; the row also shows each method's mean ± sd over the seeds."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b need one number per seed each, got {a.size} and {b.size}")
    row = claim(text, paper, seed_interval(a - b, level=level), how=f"t-interval over {a.size} seeds",
                claimed=claimed, scale=scale, decimals=decimals)
    row[SEEDS_COLUMN] = (f"{format_mean_sd(a, scale=scale, decimals=decimals)} vs "
                         f"{format_mean_sd(b, scale=scale, decimals=decimals)}")
    row["seeds"] = int(a.size)
    return row


def claims_table(rows: list[dict]):
    """The claims as a DataFrame indexed by claim, showing the columns a reader needs (the raw
    ``difference``/``low``/``high`` numbers stay in ``rows`` for :func:`uadkit.repro.record`).
    Rows made by :func:`seed_claim` add each method's mean ± sd over the seeds ("—" elsewhere)."""
    import pandas as pd

    shown = ["paper", "this run (difference, interval)", "interval", "verdict"]
    df = pd.DataFrame(rows).set_index("claim")
    if SEEDS_COLUMN in df.columns:
        df[SEEDS_COLUMN] = df[SEEDS_COLUMN].fillna("—")
        shown.insert(1, SEEDS_COLUMN)
    return df[shown]
