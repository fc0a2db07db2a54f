"""Spreads, intervals and verdicts: known values, the three verdicts, paired draws keep both classes."""
import numpy as np
import pytest

from uadkit import metrics, stats


def test_mean_sd_and_its_format():
    m, s = stats.mean_sd([0.81, 0.84, 0.80])
    assert m == pytest.approx(0.816667, abs=1e-6) and s == pytest.approx(0.0208167, abs=1e-6)
    assert stats.mean_sd([0.5]) == (0.5, 0.0)
    assert stats.format_mean_sd([0.81, 0.84, 0.80], scale=100, decimals=1) == "81.7 ± 2.1"
    with pytest.raises(ValueError, match="NaN"):
        stats.mean_sd([0.5, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        stats.mean_sd([])


def test_seed_interval_is_the_t_interval():
    m, lo, hi = stats.seed_interval([0.01, 0.03, 0.02])
    assert m == pytest.approx(0.02)
    assert hi - m == pytest.approx(4.302653 * 0.01 / np.sqrt(3), rel=1e-5)  # t(0.975, 2 dof) = 4.3027
    with pytest.raises(ValueError, match="two seeds"):
        stats.seed_interval([0.1])


@pytest.mark.parametrize("low, high, claimed, expected", [
    (0.01, 0.05, "greater", "holds"), (-0.05, -0.01, "greater", "contradicted"), (-0.01, 0.02, "greater", "inconclusive"),
    (-0.05, -0.01, "less", "holds"), (0.01, 0.05, "less", "contradicted"), (0.0, 0.02, "greater", "inconclusive")])
def test_verdicts(low, high, claimed, expected):
    assert stats.verdict(low, high, claimed=claimed) == expected


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="claimed"):
        stats.verdict(0, 1, claimed="better")
    with pytest.raises(ValueError, match="exceed"):
        stats.verdict(1, 0)


def _scores(rng, labels, separation):
    return rng.normal(size=len(labels)) + separation * labels


def test_paired_bootstrap_separates_a_real_difference_from_none():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)]
    good, bad = _scores(rng, y, 3.0), _scores(rng, y, 0.0)
    d, lo, hi = stats.paired_bootstrap(metrics.image_auroc, good, bad, y, n_boot=300)
    assert lo > 0 and lo <= d <= hi and stats.verdict(lo, hi) == "holds"
    same = stats.paired_bootstrap(metrics.image_auroc, good, good, y, n_boot=300)
    assert same == (0.0, 0.0, 0.0)
    # two models of the same quality, each with its own noise: the interval includes zero
    one, two = _scores(rng, y, 1.0), _scores(rng, y, 1.0)
    _, lo, hi = stats.paired_bootstrap(metrics.image_auroc, one, two, y, n_boot=300)
    assert stats.verdict(lo, hi) == "inconclusive"


def test_paired_bootstrap_is_repeatable_and_keeps_both_classes_in_every_draw():
    y = np.r_[np.zeros(98), np.ones(2)]  # with two anomalies, an unstratified draw often has none
    rng = np.random.default_rng(1)
    a, b = _scores(rng, y, 1.0), _scores(rng, y, 0.5)
    first = stats.paired_bootstrap(metrics.image_auroc, a, b, y, n_boot=200, seed=3)
    assert first == stats.paired_bootstrap(metrics.image_auroc, a, b, y, n_boot=200, seed=3)


def test_paired_bootstrap_over_maps_draws_whole_images():
    rng = np.random.default_rng(2)
    masks = np.zeros((20, 1, 8, 8)); masks[10:, :, 2:5, 2:5] = 1
    a = rng.random(masks.shape) + masks
    b = rng.random(masks.shape) + 0.2 * masks
    d, lo, hi = stats.paired_bootstrap(metrics.pixel_auroc, a, b, masks, strata=masks.reshape(20, -1).max(1),
                                       n_boot=100)
    assert 0 < lo <= d <= hi


def test_paired_bootstrap_rejects_unpaired_input():
    y = np.r_[np.zeros(5), np.ones(5)]
    with pytest.raises(ValueError, match="same images"):
        stats.paired_bootstrap(metrics.image_auroc, np.zeros(10), np.zeros(9), y)
    with pytest.raises(ValueError, match="n_boot"):
        stats.paired_bootstrap(metrics.image_auroc, np.zeros(10), np.zeros(10), y, n_boot=10)


def test_claims_table_rows_carry_the_verdict():
    rows = [stats.claim("A beats B", "91.9 vs 88.2", (0.02, 0.01, 0.03), how="3 seeds"),
            stats.claim("C beats B", "90.0 vs 88.2", (0.00, -0.01, 0.02), how="bootstrap")]
    table = stats.claims_table(rows)
    assert list(table["verdict"]) == ["holds", "inconclusive"]
    assert table.loc["A beats B", "this run (difference, interval)"] == "+0.020 [+0.010, +0.030]"


def test_pixel_bootstrap_agrees_with_the_exact_metric_and_the_generic_bootstrap():
    rng = np.random.default_rng(4)
    masks = np.zeros((30, 1, 16, 16)); masks[15:, :, 4:9, 4:9] = 1
    a = rng.random(masks.shape) + 0.8 * masks
    b = rng.random(masks.shape) + 0.5 * masks
    strata = masks.reshape(30, -1).max(1)
    d, lo, hi = stats.paired_bootstrap_pixels(a, b, masks, n_boot=400)
    assert d == pytest.approx(metrics.pixel_auroc(a, masks) - metrics.pixel_auroc(b, masks))
    d2, lo2, hi2 = stats.paired_bootstrap(metrics.pixel_auroc, a, b, masks, strata=strata, n_boot=400)
    assert d2 == pytest.approx(d) and lo == pytest.approx(lo2, abs=0.01) and hi == pytest.approx(hi2, abs=0.01)
    # binned AUROC of the full set is the exact one up to ~1/bins
    neg, pos = stats._pixel_histograms(a, masks, 4096)
    assert stats._auroc_from_counts(neg.sum(0), pos.sum(0)) == pytest.approx(metrics.pixel_auroc(a, masks), abs=1e-3)


def test_bootstrap_over_several_test_sets_is_the_difference_of_means():
    rng = np.random.default_rng(5)
    ys = [np.r_[np.zeros(30), np.ones(20)], np.r_[np.zeros(40), np.ones(10)]]
    a = [_scores(rng, y, 2.0) for y in ys]
    b = [_scores(rng, y, 0.2) for y in ys]
    d, lo, hi = stats.paired_bootstrap(metrics.image_auroc, a, b, ys, n_boot=200)
    expected = np.mean([metrics.image_auroc(x, y) - metrics.image_auroc(z, y) for x, z, y in zip(a, b, ys)])
    assert d == pytest.approx(expected) and lo <= d <= hi and lo > 0
    with pytest.raises(ValueError, match="lists of the same length"):
        stats.paired_bootstrap(metrics.image_auroc, a[0], b, ys)


def test_seed_claim_is_the_t_interval_of_per_seed_differences():
    a, b = [0.80, 0.83, 0.81], [0.78, 0.80, 0.80]
    row = stats.seed_claim("A beats B", "90 vs 80", a, b)
    m, lo, hi = stats.seed_interval(np.subtract(a, b))
    assert (row["difference"], row["low"], row["high"]) == pytest.approx((m, lo, hi))
    assert row["verdict"] == stats.verdict(lo, hi) and row["seeds"] == 3
    assert row[stats.SEEDS_COLUMN] == "0.813 ± 0.015 vs 0.793 ± 0.012"
    assert row["interval"] == "t-interval over 3 seeds"
    with pytest.raises(ValueError, match="one number per seed"):
        stats.seed_claim("A beats B", "", [0.8, 0.9, 0.7], [0.8, 0.9])


def test_claims_table_shows_seed_spreads_only_when_a_row_has_them():
    boot = stats.claim("C beats D", "1 vs 0", (0.1, 0.05, 0.15), how="paired bootstrap")
    assert stats.SEEDS_COLUMN not in stats.claims_table([boot]).columns
    both = stats.claims_table([boot, stats.seed_claim("A beats B", "", [0.8, 0.9, 0.7], [0.7, 0.8, 0.75])])
    assert list(both.columns)[1] == stats.SEEDS_COLUMN and both.loc["C beats D", stats.SEEDS_COLUMN] == "—"
