"""Tests for uadkit.metrics: against scikit-learn, brute force, slow references and hand-derived values."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from uadkit import metrics as M

EXACT = 1e-12  # "equal to sklearn" up to the rounding of a float division / sum


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def image_data(seed: int, n: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.0 * labels
    if ties:
        scores = np.round(scores * 2) / 2  # only ~15 distinct values: many ties
    return scores, labels.astype(int)


def blob_data(seed: int, n: int = 6, h: int = 24, w: int = 24, step: float = 0.02):
    """Small maps with a few round blobs per anomalous image; values quantised to make ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        if i % 3 == 0:
            continue  # a normal image
        for _ in range(rng.integers(1, 4)):
            r = rng.integers(1, 4)
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    maps = np.round(maps / step) * step  # a few hundred distinct values, many ties
    return maps, masks


# --------------------------------------------------------------------------
# slow, obviously correct references
# --------------------------------------------------------------------------
def reference_pro_curve(maps, masks):
    """Loop over every distinct value as threshold; PRO and FPR straight from the definition."""
    regions = []  # (image index, boolean mask of one 8-connected region)
    for i in range(len(masks)):
        labelled, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, k + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        pred = maps >= threshold
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & reg).sum() / reg.sum() for i, reg in regions]))
    return np.array(fprs), np.array(pros)


def reference_area(fprs, pros, limit):
    """Trapezoids segment by segment, the last one cut at `limit` with a linearly interpolated PRO."""
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def brute_f1_max(scores, labels):
    best = 0.0
    for threshold in np.unique(scores):
        pred = scores >= threshold
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# --------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_and_ap_match_sklearn(seed, ties):
    scores, labels = image_data(seed, ties=ties)
    assert abs(M.image_auroc(scores, labels) - roc_auc_score(labels, scores)) < EXACT
    assert abs(M.average_precision(scores, labels) - average_precision_score(labels, scores)) < EXACT


def test_image_auroc_float32_ints_bool_and_signed_zero():
    scores, labels = image_data(3, ties=True)
    for s in (scores.astype(np.float32), (scores * 2).astype(np.int64), (scores * 2).astype(np.int8)):
        assert abs(M.image_auroc(s, labels.astype(bool)) - roc_auc_score(labels, s)) < EXACT
    # -0.0 and +0.0 are equal scores: a tie
    s = np.array([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0], dtype=np.float32)
    y = np.array([1, 0, 1, 0, 1, 0])
    assert abs(M.image_auroc(s, y) - roc_auc_score(y, s)) < EXACT


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    scores, labels = image_data(4)
    expected = roc_auc_score(labels, scores)
    assert abs(M.image_auroc(torch.tensor(scores), torch.tensor(labels)) - expected) < EXACT
    maps, masks = blob_data(4)
    assert M.aupro(torch.tensor(maps, requires_grad=True), torch.tensor(masks)) == M.aupro(maps, masks)


@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_matches_brute_force(ties):
    scores, labels = image_data(5, ties=ties)
    f1, threshold = M.f1_max(scores, labels, return_threshold=True)
    assert abs(f1 - brute_f1_max(scores, labels)) < EXACT
    assert abs(M.f1_max(scores, labels) - f1) == 0
    pred = scores >= threshold
    tp = np.sum(pred & (labels == 1))
    assert abs(2 * tp / (pred.sum() + labels.sum()) - f1) < EXACT
    # hand-derived: scores 3 2 1, labels 1 0 1 -> threshold 1 flags all: P = 2/3, R = 1, F1 = 0.8
    assert M.f1_max([3, 2, 1], [1, 0, 1]) == pytest.approx(0.8)


def test_roc_curve_wraps_sklearn():
    scores, labels = image_data(6)
    for ours, theirs in zip(M.roc_curve(scores, labels), sk_roc_curve(labels, scores)):
        np.testing.assert_array_equal(ours, theirs)


# --------------------------------------------------------------------------
# pixel AUROC
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_matches_sklearn_with_ties(dtype):
    maps, masks = blob_data(7, n=20, h=32, w=32, step=0.1)  # ~80 distinct values: heavy ties
    maps = maps.astype(dtype)  # float32 sorts packed keys; float64 (0.1 steps are inexact) argsorts
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(M.pixel_auroc(maps, masks) - expected) < EXACT
    # N×1×H×W for either argument
    assert abs(M.pixel_auroc(maps[:, None], masks) - expected) < EXACT
    assert abs(M.pixel_auroc(maps, masks[:, None].astype(bool)) - expected) < EXACT


def test_pixel_auroc_random_continuous():
    rng = np.random.default_rng(8)
    masks = rng.random((10, 16, 16)) < 0.1
    maps = rng.random((10, 16, 16)) + 0.3 * masks
    assert abs(M.pixel_auroc(maps, masks) - roc_auc_score(masks.ravel(), maps.ravel())) < EXACT


# --------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_slow_reference(seed, dtype):
    maps, masks = blob_data(seed)
    maps = maps.astype(dtype)
    ref_fpr, ref_pro = reference_pro_curve(maps, masks)
    assert len(ref_fpr) > 150  # a few hundred thresholds
    fpr, pro = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-9)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-9)
    for limit in (0.3, 0.05, 1.0):
        assert abs(M.aupro(maps, masks, fpr_limit=limit) - reference_area(ref_fpr, ref_pro, limit)) < 1e-6


def test_aupro_perfect_map_is_one():
    maps, masks = blob_data(9)
    rng = np.random.default_rng(9)
    perfect = 2.0 * masks + 0.5 * rng.random(masks.shape)  # every defect pixel above every normal one
    assert M.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map():
    # A constant map has one threshold: nothing flagged (0, 0), then everything
    # flagged (1, 1). The curve is the diagonal PRO = FPR, whose area on
    # [0, L] is L²/2; divided by L that is L / 2: 0.15 for L = 0.3, 0.5 for L = 1.
    _, masks = blob_data(10)
    constant = np.full(masks.shape, 0.7)
    assert M.aupro(constant, masks) == pytest.approx(0.15, abs=1e-12)
    assert M.aupro(constant, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    fpr, pro = M.pro_curve(constant, masks)
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(pro, [0, 1])


def test_aupro_inverted_map_is_zero():
    # every normal pixel scores above every defect pixel: the FPR reaches 1
    # before any region is touched, so PRO = 0 on [0, 0.3].
    maps, masks = blob_data(11)
    inverted = -maps - 10.0 * masks
    assert M.aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_each_region_weighs_the_same():
    # One 10×10 image, a 2×2 region A (4 px) and a 4×4 region B (16 px).
    # Map: A scores 1, normal pixels 0.5, B scores 0. Curve: (0, 0);
    # threshold 1 flags A only: PRO = (1 + 0) / 2 = 0.5, FPR = 0; threshold 0.5:
    # (1, 0.5); threshold 0: (1, 1). On [0, 0.3] the PRO is 0.5: AUPRO = 0.5,
    # although A is only 4 / 20 = 20 % of the defect pixels.
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1  # A
    masks[0, 5:9, 5:9] = 1  # B
    maps = np.full(masks.shape, 0.5)
    maps[0, 1:3, 1:3] = 1.0
    maps[0, 5:9, 5:9] = 0.0
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    # finding only the big region instead gives the same 0.5
    swapped = np.full(masks.shape, 0.5)
    swapped[0, 1:3, 1:3] = 0.0
    swapped[0, 5:9, 5:9] = 1.0
    assert M.aupro(swapped, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_8_connected():
    # Pixels a=(1,1) and b=(2,2) touch diagonally: one region {a, b}; c=(6,6) is
    # a second region. The map flags only a (score 1 > normal 0.5 > b, c = 0):
    # PRO = (1/2 + 0) / 2 = 0.25 at FPR 0 up to FPR 1, so AUPRO = 0.25.
    # (With 4-connectivity there would be three regions and 1/3.)
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 6, 6] = 1
    maps = np.full(masks.shape, 0.5)
    maps[0][masks[0] == 1] = 0.0
    maps[0, 1, 1] = 1.0
    assert M.aupro(maps, masks) == pytest.approx(0.25, abs=1e-12)


def test_aupro_counts_normal_pixels_of_anomalous_images_and_ties():
    # Two 4×4 images; image 0 has a 2×2 defect, image 1 is normal: 28 normal
    # pixels. The defect and one normal pixel of image 0 score 1, all else 0.
    # Only one threshold above 0, shared by the tie: (0, 0) -> (1/28, 1) -> (1, 1).
    # Area on [0, 0.3] = (1/28)·(1/2) + (0.3 - 1/28)·1 = 0.3 - 1/56,
    # so AUPRO = 1 - 1 / (56 · 0.3).
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    maps = masks.astype(float)
    maps[0, 0, 3] = 1.0
    fpr, pro = M.pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 1 / 28, 1])
    np.testing.assert_allclose(pro, [0, 1, 1])
    assert M.aupro(maps, masks) == pytest.approx(1 - 1 / (56 * 0.3), abs=1e-12)


def test_aupro_timing_100_maps_256():
    rng = np.random.default_rng(12)
    masks = np.zeros((100, 256, 256), dtype=np.uint8)
    masks[::2, 100:140, 50:90] = 1
    masks[1::3, 10:20, 200:250] = 1
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    M.aupro(maps[:2], masks[:2])  # warm up imports
    elapsed = []
    for _ in range(2):  # best of two: the machine may be shared
        start = time.perf_counter()
        value = M.aupro(maps, masks)
        elapsed.append(time.perf_counter() - start)
    assert 0.0 < value < 1.0
    assert min(elapsed) < 1.0, f"aupro took {min(elapsed):.2f} s on 100×256×256"


# --------------------------------------------------------------------------
# IoU / Dice
# --------------------------------------------------------------------------
MASK_4x4 = np.array([[0, 0, 0, 0],
                     [0, 1, 1, 0],
                     [0, 1, 1, 0],
                     [0, 0, 0, 0]])
MAP_4x4 = np.array([[0.9, 0.0, 0.0, 0.0],
                    [0.0, 0.8, 0.7, 0.0],
                    [0.0, 0.6, 0.2, 0.0],
                    [0.0, 0.0, 0.0, 0.0]])


def test_iou_dice_hand_derived():
    # threshold 0.6 (>=) flags (0,0), (1,1), (1,2), (2,1): 4 predicted, 3 of
    # them on the 4-pixel defect. IoU = 3 / (4 + 4 - 3) = 0.6, Dice = 2·3 / (4 + 4) = 0.75.
    assert M.iou(MAP_4x4[None], MASK_4x4[None], 0.6) == pytest.approx(0.6)
    assert M.dice(MAP_4x4[None], MASK_4x4[None], 0.6) == pytest.approx(0.75)
    # a single H×W map works too; threshold above 0.9 flags nothing: IoU = Dice = 0
    assert M.iou(MAP_4x4, MASK_4x4, 0.95) == 0.0
    assert M.dice(MAP_4x4, MASK_4x4, 0.95) == 0.0


def test_iou_dice_are_pooled_over_the_set():
    # second image: a 1-pixel defect that is missed. Pooled: intersection 3,
    # predicted 4, defect 5, union 6 -> IoU 0.5, Dice 6 / 9 (the per-image mean would be 0.3).
    mask2 = np.zeros((4, 4), dtype=int)
    mask2[3, 3] = 1
    maps = np.stack([MAP_4x4, np.zeros((4, 4))])
    masks = np.stack([MASK_4x4, mask2])
    assert M.iou(maps, masks, 0.6) == pytest.approx(0.5)
    assert M.dice(maps, masks, 0.6) == pytest.approx(6 / 9)


# --------------------------------------------------------------------------
# relative error reduction
# --------------------------------------------------------------------------
def test_relative_error_reduction():
    assert M.relative_error_reduction(0.9, 0.95) == pytest.approx(0.5)
    assert M.relative_error_reduction(90, 95) == pytest.approx(0.5)
    assert M.relative_error_reduction(98.0, 99.0) == pytest.approx(0.5)
    assert M.relative_error_reduction(0.95, 0.9) == pytest.approx(-1.0)
    assert M.relative_error_reduction(0.8, 1.0) == pytest.approx(1.0)
    for a1, a2 in ((1.0, 0.9), (100, 99)):
        with pytest.raises(ValueError, match="perfect"):
            M.relative_error_reduction(a1, a2)
    with pytest.raises(ValueError):
        M.relative_error_reduction(-0.1, 0.5)
    with pytest.raises(ValueError):
        M.relative_error_reduction(float("nan"), 0.5)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def test_nan_or_inf_raise():
    scores, labels = image_data(13)
    scores[3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        M.image_auroc(scores, labels)
    maps, masks = blob_data(13)
    maps[1, 2, 3] = np.inf
    for fn in (M.pixel_auroc, M.aupro):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(maps, masks)


def test_shape_mismatch_names_both_shapes():
    maps, masks = blob_data(14)
    with pytest.raises(ValueError, match=r"\(6, 24, 24\).*\(6, 24, 23\)"):
        M.aupro(maps, masks[:, :, :23])
    with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
        M.image_auroc(np.arange(5.0), [0, 1, 0, 1])


def test_only_one_class_raises():
    with pytest.raises(ValueError, match="only one class present"):
        M.image_auroc([0.1, 0.5, 0.9], [0, 0, 0])
    with pytest.raises(ValueError, match="only one class present"):
        M.average_precision([0.1, 0.5, 0.9], [1, 1, 1])
    maps, _ = blob_data(15)
    for fn in (M.pixel_auroc, M.aupro, M.pro_curve):
        with pytest.raises(ValueError, match="only one class present"):
            fn(maps, np.zeros(maps.shape))
    with pytest.raises(ValueError, match="only one class present"):
        M.iou(maps, np.zeros(maps.shape), 0.5)


def test_non_binary_targets_raise():
    with pytest.raises(ValueError, match="binary"):
        M.f1_max([0.1, 0.5, 0.9], [0, 1, 2])
    maps, masks = blob_data(16)
    with pytest.raises(ValueError, match="binary"):
        M.pixel_auroc(maps, masks * 0.5)
    with pytest.raises(ValueError, match="binary"):
        M.dice(maps, masks * 255, 0.5)


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="empty"):
        M.image_auroc([], [])
    maps, masks = blob_data(17)
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="threshold"):
        M.iou(maps, masks, float("nan"))
    with pytest.raises(ValueError, match="N×H×W"):
        M.pixel_auroc(maps[0, 0], masks[0, 0])  # 1-D is not a map


@pytest.mark.parametrize("seed", range(6))
def test_aupro_sorts_only_the_low_fpr_pixels_and_matches_the_full_curve(seed):
    # aupro cuts the curve short; the area must equal the one from the full
    # curve, also with many tied scores (coarse maps) and several limits.
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 20, 20), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[2, 10:19, 10:12] = 1
    masks[3, 0:3, 0:3] = 1
    masks[3, 15:18, 15:20] = 1
    levels = [4, 50, 10_000][seed % 3]
    maps = rng.integers(0, levels, masks.shape).astype(np.float64) + 2.0 * masks * rng.random(masks.shape)
    for limit in (0.01, 0.05, 0.3, 0.77, 1.0):
        fpr, pro = M.pro_curve(maps, masks)
        full = M._trapezoid_up_to(fpr, pro, limit) / limit
        assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(full, abs=1e-12)
