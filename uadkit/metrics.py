"""Evaluation metrics for image anomaly detection.

An anomaly detector gives every test image a *score* (higher = more anomalous)
and, usually, every pixel a score too (an *anomaly map*). The ground truth is a
*label* per image (0 normal, 1 anomalous) and a binary *mask* per image (1 on
the defect). The metrics below compare the two.

Image level
    :func:`image_auroc`, :func:`average_precision`, :func:`f1_max`,
    :func:`roc_curve` (for plotting).
Pixel level
    :func:`pixel_auroc`, :func:`aupro` and :func:`pro_curve` (for plotting),
    :func:`iou` and :func:`dice` at a fixed threshold.
Comparing results
    :func:`relative_error_reduction`.

Conventions
-----------
* Inputs may be numpy arrays, anything ``np.asarray`` accepts, or torch
  tensors (on any device; they are copied to the CPU).
* Image scores and labels have the same shape (normally ``(N,)``).
* Anomaly maps are ``N×H×W`` or ``N×1×H×W``; masks are either of the two
  shapes as well (a single ``H×W`` map is treated as ``N = 1``).
* Labels and masks must be binary: values in {0, 1} (or bool).
* Every metric is computed *exactly*: ties between scores are handled as in
  scikit-learn (a tie counts one half in the AUROC), and curves use every
  distinct score as a threshold.
* Bad input raises ``ValueError`` with a message that says what is wrong:
  empty input, NaN or inf scores, shapes that do not match, labels that are
  not binary, or only one class present (most metrics are undefined then).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "average_precision",
    "f1_max",
    "roc_curve",
    "pixel_auroc",
    "aupro",
    "pro_curve",
    "iou",
    "dice",
    "relative_error_reduction",
]


# --------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy array, a list or a torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _number(x: Any, name: str) -> float:
    """A finite float from a Python, numpy or 0-d torch number, or ``ValueError``."""
    a = _to_numpy(x)
    if a.ndim != 0 or not (a.dtype == bool or np.issubdtype(a.dtype, np.number)) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be a single real number, got {x!r}")
    value = float(a)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _squeeze_channel(a: np.ndarray) -> np.ndarray:
    """``N×1×H×W`` -> ``N×H×W``; ``H×W`` -> ``1×H×W``; others unchanged."""
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim == 2:
        return a[None]
    return a


def _check(
    scores: Any,
    targets: Any,
    *,
    names: tuple[str, str] = ("scores", "labels"),
    maps: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (scores, ground truth) pair; return ``(scores, targets)``.

    ``scores`` comes back as a numeric array, ``targets`` as a bool array of the
    same shape. With ``maps=False`` both are flattened to 1-D; with
    ``maps=True`` both are ``N×H×W``. Raises ``ValueError`` for: empty input,
    non-numeric or non-finite scores, shapes that differ, targets that are not
    binary, and targets with only one class present.
    """
    s_name, t_name = names
    s, t = _to_numpy(scores), _to_numpy(targets)
    s_shape, t_shape = s.shape, t.shape

    if s.size == 0 or t.size == 0:
        raise ValueError(f"empty input: {s_name} has shape {s_shape} and {t_name} has shape {t_shape}")

    if maps:
        s, t = _squeeze_channel(s), _squeeze_channel(t)
        if s.ndim != 3:
            raise ValueError(f"{s_name} must be N×H×W or N×1×H×W, got shape {s_shape}")
    if s.shape != t.shape:
        raise ValueError(
            f"{s_name} and {t_name} must have the same shape, "
            f"got {s_name} {s_shape} and {t_name} {t_shape}"
        )

    if s.dtype == bool:
        s = s.astype(np.float32)
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise ValueError(f"{s_name} must be real numbers, got dtype {s.dtype}")
    finite = np.isfinite(s)
    if not finite.all():
        bad = s.size - int(np.count_nonzero(finite))
        raise ValueError(f"{s_name} contain NaN or inf ({bad} of {s.size} values are not finite)")

    if t.dtype != bool:
        if not (np.issubdtype(t.dtype, np.number)):
            raise ValueError(f"{t_name} must be binary (0/1 or bool), got dtype {t.dtype}")
        is_binary = (t == 0) | (t == 1)
        if not is_binary.all():
            examples = np.unique(t[~is_binary])[:5].tolist()
            raise ValueError(
                f"{t_name} must be binary (values 0 and 1 or bool), found other values such as {examples}"
            )
        t = t == 1

    n_pos = int(np.count_nonzero(t))
    if n_pos == 0 or n_pos == t.size:
        which = "all 1 (anomalous)" if n_pos else "all 0 (normal)"
        raise ValueError(
            f"only one class present in {t_name} ({which}); the metric needs both "
            f"normal and anomalous {'pixels' if maps else 'samples'}"
        )

    if not maps:
        s, t = s.reshape(-1), t.reshape(-1)
    return s, t


# --------------------------------------------------------------------------
# the shared machinery: one sort, cumulative sums, keep the last of each tie
# --------------------------------------------------------------------------
def _last_of_ties(sorted_values: np.ndarray) -> np.ndarray:
    """Indices of the last element of every run of equal values in a sorted array."""
    return np.flatnonzero(np.append(sorted_values[1:] != sorted_values[:-1], True))


_SMALL_EXACT = (np.float16, np.int8, np.uint8, np.int16, np.uint16)


def _exact_float32(s: np.ndarray) -> np.ndarray | None:
    """``s`` as float32 if that loses nothing, else ``None``."""
    if s.dtype == np.float32:
        return s
    if s.dtype in _SMALL_EXACT:
        return s.astype(np.float32)
    if s.dtype == np.float64:
        f = s.astype(np.float32)
        if np.array_equal(f, s):  # e.g. float32 maps that were cast to float64
            return f
    return None


def _sort_scores(s: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort 1-D scores ascending and carry an integer ``payload`` (0 <= payload < 2**32) along.

    Returns ``(keys, payload_sorted)``: ``keys`` is sorted and two keys are
    equal exactly when the two scores are equal, which is all the metrics need.

    This is an ``argsort`` followed by two gathers. For float32 scores (and
    anything that converts to float32 exactly) it is done faster and without
    random memory access: the float's bits are turned into an int32 with the
    same order, shifted into the high half of an int64 whose low half holds
    the payload, and the int64s are sorted directly.
    """
    f = _exact_float32(s)
    if f is None:
        order = np.argsort(s, kind="quicksort")
        return s[order], payload[order]
    bits = (f + np.float32(0)).view(np.int32)  # adding +0 turns -0.0 into +0.0
    # Positive floats order like their bits as integers; negative floats order
    # in reverse, so flip their 31 low bits (they stay negative).
    bits = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))
    key = (bits.astype(np.int64) << 32) | payload.astype(np.int64)
    key.sort()
    return key >> 32, key & 0xFFFFFFFF


def _count_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _auroc(s: np.ndarray, t: np.ndarray) -> float:
    """Exact AUROC of 1-D scores ``s`` for bool targets ``t`` (Mann–Whitney U).

    AUROC = P(score of a random positive > score of a random negative), a tie
    counting 1/2. One ascending sort; per group of tied scores count the
    positives ``p_g`` and negatives ``n_g``; then
    ``U = sum_g p_g * (negatives below g + n_g / 2)`` and AUROC = U / (P N).
    All counts are integers, so the only rounding is the final division.
    """
    keys, t_sorted = _sort_scores(s, t.view(np.uint8))
    ends = _last_of_ties(keys)
    pos_cum = np.cumsum(t_sorted, dtype=_count_dtype(t.size))[ends].astype(np.int64)
    neg_cum = (ends + 1) - pos_cum
    pos_g = np.diff(pos_cum, prepend=0)
    neg_g = np.diff(neg_cum, prepend=0)
    neg_below = neg_cum - neg_g
    twice_u = 2 * int(np.dot(pos_g, neg_below)) + int(np.dot(pos_g, neg_g))
    n_pos, n_neg = int(pos_cum[-1]), int(neg_cum[-1])
    return twice_u / (2 * n_pos * n_neg)


def _pr_counts(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct score ``v`` (descending): ``v``, TP and FP when predicting ``s >= v``."""
    order = np.argsort(s, kind="quicksort")[::-1]
    s_sorted, t_sorted = s[order], t[order]
    ends = _last_of_ties(s_sorted)
    tps = np.cumsum(t_sorted, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return s_sorted[ends], tps, fps


# --------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------
def image_auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of image scores (AUROC, "I-AUROC").

    The ROC curve plots the true-positive rate (anomalous images flagged)
    against the false-positive rate (normal images flagged) as the threshold
    sweeps over all scores. Its area equals the probability that a randomly
    chosen anomalous image scores higher than a randomly chosen normal one
    (ties count 1/2): 1.0 is a perfect ranking, 0.5 is chance. It does not
    depend on any threshold and only on the *order* of the scores.

    Parameters
    ----------
    scores : array of shape (N,)
        Anomaly scores, higher = more anomalous.
    labels : array of shape (N,)
        0 normal, 1 anomalous. Both classes must be present.
    """
    s, t = _check(scores, labels)
    return _auroc(s, t)


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision (AP), the area under the precision–recall curve.

    With threshold ``v`` every sample with ``score >= v`` is flagged;
    precision = TP / (TP + FP), recall = TP / P. Sweeping ``v`` over the
    distinct scores from high to low,
    ``AP = sum_k (R_k - R_{k-1}) * P_k``
    (the step-wise sum of scikit-learn's ``average_precision_score``, no
    interpolation). Unlike the AUROC it is sensitive to the share of
    anomalies: a random ranking scores about that share, not 0.5.
    """
    s, t = _check(scores, labels)
    _, tps, fps = _pr_counts(s, t)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max(scores: Any, labels: Any, *, return_threshold: bool = False):
    """The best F1 score over all thresholds ("F1-max").

    F1 = 2 · precision · recall / (precision + recall) = 2 TP / (2 TP + FP + FN),
    the harmonic mean of precision and recall at one threshold. F1-max takes
    the best threshold among all distinct scores (every point of the
    precision–recall curve), so it is an optimistic, "oracle threshold" number.

    Returns a float, or ``(f1, threshold)`` with ``return_threshold=True``
    (flag ``score >= threshold``).
    """
    s, t = _check(scores, labels)
    thresholds, tps, fps = _pr_counts(s, t)
    # 2 TP / (2 TP + FP + FN) with FN = P - TP; the denominator is >= P > 0.
    f1 = 2 * tps / (tps + fps + tps[-1])
    k = int(np.argmax(f1))
    if return_threshold:
        return float(f1[k]), float(thresholds[k])
    return float(f1[k])


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve, for plotting: ``(fpr, tpr, thresholds)``.

    A thin wrapper around :func:`sklearn.metrics.roc_curve` with this module's
    input checks. Works for image scores or, flattened, for pixels.
    """
    from sklearn.metrics import roc_curve as _sk_roc_curve

    s, t = _check(scores, labels)
    fpr, tpr, thresholds = _sk_roc_curve(t, s)
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------
def pixel_auroc(maps: Any, masks: Any) -> float:
    """AUROC over pixels ("P-AUROC"): all pixels of all images pooled.

    Each pixel is a sample, its map value the score and its mask value the
    label; the result is :func:`image_auroc` of these samples. Because defects
    cover few pixels and large defects contribute many pixels, this metric is
    dominated by large defects and is often close to 1; see :func:`aupro` for
    a metric that weighs every defect equally.

    Parameters
    ----------
    maps : array N×H×W or N×1×H×W
        Anomaly maps.
    masks : array of the same shape (or with / without the channel axis)
        Binary ground truth. Both classes must occur somewhere in the set.
    """
    s, t = _check(maps, masks, names=("maps", "masks"), maps=True)
    return _auroc(s.reshape(-1), t.reshape(-1))


def _pro_curve(
    s: np.ndarray, t: np.ndarray, fpr_limit: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve of checked ``N×H×W`` maps ``s`` and bool masks ``t``.

    With ``fpr_limit`` the curve is cut short: it holds every point with
    ``FPR <= fpr_limit`` and at least one point beyond (for interpolation), and
    only the pixels that can reach those points are sorted. The points it
    holds are exactly those of the full curve.
    """
    # 8-connected components, per image: a 3×3×3 structure whose only ones lie
    # in the middle plane connects pixels within an image, never across images.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(t, structure=structure)
    regions = regions.reshape(-1)
    scores = s.reshape(-1)
    sizes = np.bincount(regions, minlength=n_regions + 1)
    n_normal = int(sizes[0])

    # each pixel of region r adds 1 / (size_r * n_regions) to the PRO
    pro_step = np.zeros(n_regions + 1, dtype=np.float64)
    pro_step[1:] = 1.0 / (sizes[1:] * float(n_regions))

    # Cutting short: a threshold whose FPR is <= fpr_limit flags at most
    # floor(fpr_limit * n_normal) normal pixels plus every region pixel. Keep
    # all pixels scoring >= the m-th highest score, with m one more than that:
    # whole runs of ties are kept, and the last kept point has FPR > fpr_limit.
    complete = True
    if fpr_limit is not None:
        m = int(np.floor(fpr_limit * n_normal)) + (scores.size - n_normal) + 1
        if m < scores.size:
            cut = np.partition(scores, scores.size - m)[scores.size - m]
            keep = scores >= cut
            scores, regions = scores[keep], regions[keep]
            complete = False

    # one sort of the pixels, highest score first, carrying each pixel's region
    keys, regions_sorted = _sort_scores(scores, regions)
    keys, regions_sorted = keys[::-1], regions_sorted[::-1]
    ends = _last_of_ties(keys)  # threshold = score at each of these indices

    # Among the top (end + 1) pixels, k are in a region and end + 1 - k are normal.
    in_region = regions_sorted != 0
    k = np.cumsum(in_region, dtype=_count_dtype(in_region.size))[ends]
    fpr = (ends + 1 - k) / n_normal
    # PRO after the first k region pixels (in score order) = the sum of their
    # contributions 1 / (size_r * n_regions); a cumulative sum over region pixels only.
    pro_cum = np.concatenate(([0.0], np.cumsum(pro_step[regions_sorted[in_region]])))
    pro = pro_cum[k]

    np.clip(pro, None, 1.0, out=pro)  # the rounding of the cumulative sum
    if complete:
        # the last threshold is the lowest score: every pixel is flagged, the
        # curve ends at (1, 1); pin it there.
        pro[-1] = 1.0
        fpr[-1] = 1.0
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` on ``[x[0], x_max]`` (``x`` non-decreasing, ``x[0] <= x_max``).

    If ``x_max`` falls between two points, ``y`` is linearly interpolated there.
    """
    j = int(np.searchsorted(x, x_max, side="right"))  # x[:j] <= x_max < x[j:]
    xs, ys = x[:j], y[:j]
    if j < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_curve(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap (PRO) curve, for plotting: ``(fpr, pro)``.

    One point per distinct map value ``v`` (from high to low), where pixels
    with ``map >= v`` are predicted anomalous, preceded by ``(0, 0)``; the
    curve ends at ``(1, 1)``. See :func:`aupro` for the definitions.
    """
    s, t = _check(maps, masks, names=("maps", "masks"), maps=True)
    return _pro_curve(s, t)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` ("AUPRO").

    The MVTec AD definition (Bergmann et al., IJCV 2021):

    * The *regions* are the 8-connected components of the ground-truth masks,
      found per image. Two defects in one image are two regions.
    * For a threshold ``v`` (predict ``map >= v``):
      ``PRO(v)`` = mean over all regions of the fraction of the region that is
      predicted, and ``FPR(v)`` = fraction of *all* anomaly-free pixels of the
      set (normal images and the normal part of anomalous images) that are
      predicted.
    * The curve ``(FPR(v), PRO(v))`` over every distinct map value, starting at
      ``(0, 0)``, is integrated with the trapezoid rule from FPR 0 to
      ``fpr_limit`` (the PRO at ``fpr_limit`` is linearly interpolated) and the
      area is divided by ``fpr_limit``, so 1.0 is perfect.

    Unlike :func:`pixel_auroc`, every defect counts the same whatever its
    size, and only the low-FPR part of the curve matters (at FPR 0.3 a
    segmentation is already useless in practice). A map that is constant
    scores ``fpr_limit / 2`` (the curve is the diagonal).

    The curve is computed exactly from one sort of all pixels: each pixel of
    region ``r`` adds ``1 / (size_r · n_regions)`` to the PRO and each normal
    pixel adds ``1 / n_normal`` to the FPR; cumulative sums in descending
    score order give the curve, keeping the last index of every run of equal
    scores. Only the pixels that can be flagged at FPR <= ``fpr_limit`` are
    sorted (an ``np.partition`` finds them), which gives the same area.

    Parameters
    ----------
    maps : array N×H×W or N×1×H×W
    masks : binary array of the same shape
    fpr_limit : float in (0, 1]
    """
    limit = _number(fpr_limit, "fpr_limit")
    if not 0 < limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    s, t = _check(maps, masks, names=("maps", "masks"), maps=True)
    fpr, pro = _pro_curve(s, t, fpr_limit=limit)
    return _trapezoid_up_to(fpr, pro, limit) / limit


def _binarise(maps: Any, masks: Any, threshold: float) -> tuple[int, int, int]:
    """Pooled counts ``(|pred ∩ gt|, |pred|, |gt|)`` for ``pred = maps >= threshold``."""
    threshold = _number(threshold, "threshold")
    s, t = _check(maps, masks, names=("maps", "masks"), maps=True)
    pred = s >= threshold
    return int(np.count_nonzero(pred & t)), int(np.count_nonzero(pred)), int(np.count_nonzero(t))


def iou(maps: Any, masks: Any, threshold: float) -> float:
    """Intersection over union of the binarised maps and the masks.

    Pixels with ``map >= threshold`` are predicted anomalous. The counts are
    *pooled over all pixels of the set* (one big image), not averaged per
    image: ``IoU = |pred ∩ gt| / |pred ∪ gt|``. 1.0 is a perfect segmentation.
    """
    inter, n_pred, n_gt = _binarise(maps, masks, threshold)
    return inter / (n_pred + n_gt - inter)  # n_gt > 0, so the union is not empty


def dice(maps: Any, masks: Any, threshold: float) -> float:
    """Dice coefficient (pixel F1) of the binarised maps and the masks.

    Pixels with ``map >= threshold`` are predicted anomalous. The counts are
    *pooled over all pixels of the set*, not averaged per image:
    ``Dice = 2 |pred ∩ gt| / (|pred| + |gt|)``. It relates to the IoU by
    ``Dice = 2 IoU / (1 + IoU)``.
    """
    inter, n_pred, n_gt = _binarise(maps, masks, threshold)
    return 2 * inter / (n_pred + n_gt)


# --------------------------------------------------------------------------
# comparing results
# --------------------------------------------------------------------------
def relative_error_reduction(a1: float, a2: float) -> float:
    """Relative reduction of the error when a metric goes from ``a1`` to ``a2``.

    For a metric where 1 (or 100 %) is perfect, the error is ``1 - a``, and
    ``((1 - a1) - (1 - a2)) / (1 - a1)`` is the share of the baseline's error
    that the new method removes: 0.90 -> 0.95 removes half the error (0.5),
    just as 0.98 -> 0.99 does, although the absolute gain differs.
    Negative values mean the error grew.

    ``a1`` is the baseline, ``a2`` the new value. Both are in [0, 1] or both in
    percent: if either is above 1, both are read as percent (error =
    100 - a). Raises ``ValueError`` if the baseline is perfect (no error to
    reduce) or a value is out of range.
    """
    a1, a2 = _number(a1, "a1"), _number(a2, "a2")
    perfect = 100.0 if max(a1, a2) > 1 else 1.0
    for name, a in (("a1", a1), ("a2", a2)):
        if not 0 <= a <= perfect:
            raise ValueError(f"{name} = {a} is outside [0, {perfect:g}]")
    e1, e2 = perfect - a1, perfect - a2
    if e1 == 0:
        raise ValueError(
            f"the baseline a1 = {a1:g} is perfect (error 0); the relative reduction is undefined"
        )
    return (e1 - e2) / e1
