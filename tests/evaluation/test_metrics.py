import math

import numpy as np
import pytest
from scipy import stats

from userip.evaluation import (
    auc,
    logloss,
    mean_std,
    paired_test,
    rela_impr_auc,
    rela_impr_logloss,
)
from userip.evaluation.metrics import choose_simplest_within_noise, hopeless_candidates


def mann_whitney_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Independent AUC: the Mann-Whitney U statistic from mid-ranks, over n_pos * n_neg."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def test_auc_equals_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) * 0.5 + labels * 0.2, 2)  # rounding creates many ties
    assert auc(labels, scores) == pytest.approx(mann_whitney_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_one_class():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_logloss_equals_formula():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300).astype(float)
    probs = rng.uniform(0.01, 0.99, 300)
    expected = -np.mean([y * math.log(p) + (1 - y) * math.log(1 - p) for y, p in zip(labels, probs)])
    assert logloss(labels, probs) == pytest.approx(expected, rel=1e-12)


def test_logloss_clips_confident_misses():
    eps = 1e-7
    value = logloss([1, 0], [0.0, 1.0], eps=eps)
    assert value == pytest.approx(-math.log(eps), rel=1e-6)
    assert logloss([1, 0], [1.0, 0.0]) < 1e-6


def test_logloss_rejects_bad_input():
    with pytest.raises(ValueError, match="sigmoid"):
        logloss([0, 1], [-0.5, 2.0])
    with pytest.raises(ValueError, match="length"):
        logloss([0, 1, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="0/1"):
        logloss([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [float("nan"), 0.5])


def test_rela_impr_values():
    # (0.75 - 0.5) / (0.70 - 0.5) - 1 = 0.25
    assert rela_impr_auc(0.75, 0.70) == pytest.approx(0.25)
    assert rela_impr_auc(0.70, 0.70) == pytest.approx(0.0)
    assert rela_impr_auc(0.65, 0.70) < 0
    # (0.5 - 0.4) / 0.4 = 0.25
    assert rela_impr_logloss(0.40, 0.50) == pytest.approx(0.25)
    assert rela_impr_logloss(0.55, 0.50) < 0
    with pytest.raises(ValueError, match="0.5"):
        rela_impr_auc(0.7, 0.5)
    with pytest.raises(ValueError, match="positive"):
        rela_impr_logloss(0.0, 0.5)


def test_mean_std_matches_numpy_sample_std():
    values = [0.71, 0.73, 0.72, 0.75]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_t_test_equals_textbook_formula():
    a = np.array([0.780, 0.784, 0.779, 0.786, 0.781])
    b = np.array([0.775, 0.778, 0.777, 0.779, 0.776])
    d = a - b
    t_expected = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p_expected = 2 * stats.t.sf(abs(t_expected), df=len(d) - 1)
    res = paired_test(a, b)
    assert res.num_pairs == 5
    assert res.mean_diff == pytest.approx(d.mean())
    assert res.t_statistic == pytest.approx(t_expected)
    assert res.t_pvalue == pytest.approx(p_expected)
    assert res.significant(0.05)
    assert res.wilcoxon_pvalue is None  # 5 pairs cannot reach p < 0.05 in the exact test


def test_paired_test_wilcoxon_with_enough_pairs():
    rng = np.random.default_rng(2)
    b = rng.normal(0.78, 0.003, 8)
    a = b + rng.normal(0.004, 0.002, 8)
    res = paired_test(a, b)
    expected = stats.wilcoxon(a, b)
    assert res.wilcoxon_statistic == pytest.approx(expected.statistic)
    assert res.wilcoxon_pvalue == pytest.approx(expected.pvalue)


def test_paired_test_degenerate_cases():
    same = paired_test([0.7, 0.7, 0.7], [0.7, 0.7, 0.7])
    assert math.isnan(same.t_statistic) and same.t_pvalue == 1.0 and not same.significant()
    shifted = paired_test([0.8, 0.9], [0.7, 0.8])
    assert shifted.t_statistic == math.inf and shifted.t_pvalue == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_test([0.7], [0.6])
    with pytest.raises(ValueError, match="one score per seed"):
        paired_test([0.7, 0.8], [0.6])


# ---------------------------------------------------------------- choose_simplest_within_noise
def _paired_t(a, b) -> float:
    """scipy's paired t statistic of a - b (the independent computation of gap / SE)."""
    return float(stats.ttest_rel(a, b).statistic)


def test_simplest_within_noise_keeps_a_tie_and_takes_a_clear_gain():
    simple = [0.700, 0.702, 0.699, 0.701]
    noisy_gain = [0.703, 0.701, 0.702, 0.700]  # +0.001 on average, with spread
    clear_gain = [0.720, 0.723, 0.719, 0.722]
    t_noisy = _paired_t(noisy_gain, simple)
    assert 0 < t_noisy < 2  # scipy: not clearly above noise

    choice = choose_simplest_within_noise([simple, noisy_gain], threshold=2.0)
    assert choice.best == 1 and choice.chosen == 0
    assert choice.gaps[0] / choice.gap_ses[0] == pytest.approx(t_noisy, rel=1e-9)
    assert choice.within_noise == (True, True)

    choice = choose_simplest_within_noise([simple, noisy_gain, clear_gain], threshold=2.0)
    assert _paired_t(clear_gain, simple) > 2 and _paired_t(clear_gain, noisy_gain) > 2
    assert choice.best == choice.chosen == 2 and choice.within_noise == (False, False, True)
    # Threshold 0: the best mean wins outright (the old rule); a huge threshold keeps the simplest.
    assert choose_simplest_within_noise([simple, noisy_gain], threshold=0.0).chosen == 1
    assert choose_simplest_within_noise([simple, clear_gain], threshold=1e6).chosen == 0


def test_simplest_within_noise_against_scipy_on_random_grids():
    rng = np.random.default_rng(0)
    for _ in range(50):
        num_candidates, num_seeds = rng.integers(2, 6), rng.integers(3, 7)
        scores = (
            0.7
            + rng.normal(0, 0.003, (num_candidates, num_seeds))
            + rng.normal(0, 0.003, (num_candidates, 1))
        )
        threshold = float(rng.choice([1.0, 2.0]))
        choice = choose_simplest_within_noise(scores, threshold)
        best = int(np.argmax(scores.mean(axis=1)))
        assert choice.best == best
        within = [c == best or _paired_t(scores[best], scores[c]) <= threshold for c in range(num_candidates)]
        assert list(choice.within_noise) == within
        assert choice.chosen == within.index(True)


def test_simplest_within_noise_edge_cases():
    # A candidate missing a seed (pruned) cannot be chosen, even with the best scores it has.
    choice = choose_simplest_within_noise([[0.70, 0.70, 0.70], [0.80, np.nan, np.nan], [0.71, 0.72, 0.71]])
    assert choice.best == 2 and choice.within_noise[1] is False and np.isnan(choice.means[1])
    # Equal scores: the simplest; a constant positive gain (no spread) is a clear gain.
    assert choose_simplest_within_noise([[0.7, 0.7, 0.7], [0.7, 0.7, 0.7]]).chosen == 0
    assert choose_simplest_within_noise([[0.7, 0.7, 0.7], [0.71, 0.71, 0.71]]).chosen == 1
    # One seed: no error estimate, only ties are within noise.
    assert choose_simplest_within_noise([[0.70], [0.7001]]).chosen == 1
    with pytest.raises(ValueError, match="every seed"):
        choose_simplest_within_noise([[np.nan, 0.7]])
    with pytest.raises(ValueError, match="threshold"):
        choose_simplest_within_noise([[0.7, 0.7]], threshold=-1)


def test_complexity_ranks_protect_the_simpler_model_but_not_a_grid_order():
    simple_model = [0.700, 0.704, 0.699]  # e.g. warm start, lr 1e-3
    simple_model_lr = [0.701, 0.704, 0.700]  # warm start, another lr: not simpler than the first
    richer_noisy = [0.704, 0.703, 0.703]  # joint training: best mean, gain within noise
    scores = [simple_model, simple_model_lr, richer_noisy]
    assert _paired_t(richer_noisy, simple_model_lr) < 2 and _paired_t(richer_noisy, simple_model) < 2
    choice = choose_simplest_within_noise(scores, 2.0, complexity=[0, 0, 1])
    assert choice.best == 2 and choice.chosen == 1  # the simpler model, and its best setting
    assert choose_simplest_within_noise(scores, 2.0).chosen == 0  # no ranks: the order decides
    # All of one complexity: the best mean, whatever the noise.
    assert choose_simplest_within_noise(scores, 2.0, complexity=[0, 0, 0]).chosen == 2
    with pytest.raises(ValueError, match="one rank per candidate"):
        choose_simplest_within_noise(scores, 2.0, complexity=[0, 1])


def test_hopeless_candidates_are_far_below_the_first_seeds_best_and_never_the_first():
    assert hopeless_candidates([0.60, 0.70, 0.695, 0.68], 0.01) == {3}
    assert hopeless_candidates([0.50, 0.70], 0.01) == set()  # the simplest stays to fall back on
    assert hopeless_candidates([0.50, 0.70, 0.40], None) == set()
