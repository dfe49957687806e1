"""Recovery metrics against an independent computation, and the reference points."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from userip.codebook import profile_recovery, recovery_report
from userip.codebook.recovery import kmeans_bow_codes, random_codes


def _nmi_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) / mean(H(a), H(b)) from the contingency table (arithmetic normalisation)."""
    n = len(a)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pa, pb, pab = table.sum(1) / n, table.sum(0) / n, table / n
    nz = pab > 0
    mi = (pab[nz] * np.log(pab[nz] / np.outer(pa, pb)[nz])).sum()
    h = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    return float(mi / ((h(pa) + h(pb)) / 2))


def test_nmi_matches_contingency_formula_and_is_permutation_invariant():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 200)
    noisy = np.where(rng.random(200) < 0.7, truth, rng.integers(0, 4, 200))
    result = profile_recovery(noisy, truth)
    assert result["nmi"] == pytest.approx(_nmi_by_hand(noisy, truth), rel=1e-9)
    relabelled = np.array([2, 0, 3, 1])[truth]
    assert profile_recovery(relabelled, truth) == pytest.approx({"nmi": 1.0, "ari": 1.0})
    chance = profile_recovery(random_codes(200, 4, seed=1), truth)
    assert chance["nmi"] < 0.1 and abs(chance["ari"]) < 0.1
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        profile_recovery(truth[:5], truth)


def test_recovery_report_pairs_profiles_with_factors():
    truth = pd.DataFrame(
        {"user_id": np.arange(6), "hobby": [0, 0, 1, 1, 2, 2], "background": [0, 1, 0, 1, 0, 1]}
    )
    codes = np.array([[5 % 3, 0], [2, 1], [1, 0], [1, 1], [0, 0], [0, -1]])  # user 5 has no background code
    report = recovery_report(codes, ["p_hobby", "p_background"], truth)
    assert report["profiles"]["p_hobby"]["best_match"] == "hobby"
    assert report["profiles"]["p_hobby"]["vs"]["hobby"]["nmi"] == pytest.approx(1.0)
    assert report["profiles"]["p_background"]["best_match"] == "background"
    assert report["profiles"]["p_background"]["num_users"] == 5


def test_kmeans_on_bag_of_items_finds_planted_hobbies(tiny_dataset):
    codes = kmeans_bow_codes(tiny_dataset, 3, seed=0)
    truth = tiny_dataset.truth["hobby"].to_numpy()
    assert profile_recovery(codes, truth)["nmi"] > 0.8


@pytest.mark.parametrize("case", ["noisy", "one_class", "one_code", "empty", "perfect"])
def test_contingency_scores_equal_sklearn_on_per_user_labels(case):
    """The counts path (what the distributed report uses) against scikit-learn on one row per user."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from userip.codebook.recovery import contingency_scores, contingency_table

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, 500)
    codes = {
        "noisy": np.where(rng.random(500) < 0.6, truth * 2 + 7, rng.integers(0, 12, 500)),
        "one_class": rng.integers(0, 4, 500),
        "one_code": np.full(500, 3),
        "empty": np.zeros(0, dtype=np.int64),
        "perfect": truth[::-1].copy(),
    }[case]
    truth = {"one_class": np.zeros(500, dtype=np.int64), "empty": np.zeros(0, dtype=np.int64)}.get(
        case, truth if case != "perfect" else truth[::-1].copy()
    )
    scores = contingency_scores(contingency_table(truth, codes))
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(truth, codes), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(truth, codes), abs=1e-12)
    # the same users as (pair, count) rows, each pair split in two rows as two ranks would send it
    pairs, counts = np.unique(np.column_stack([truth, codes]), axis=0, return_counts=True)
    split = np.concatenate([counts // 2, counts - counts // 2])
    table = contingency_table(np.tile(pairs[:, 0], 2), np.tile(pairs[:, 1], 2), split)
    assert table.sum() == len(truth)
    assert contingency_scores(table) == scores


def test_contingency_scores_ignore_empty_rows_and_reject_bad_tables():
    from userip.codebook.recovery import contingency_scores

    table = np.array([[5, 0, 1], [0, 4, 2]])
    padded = np.zeros((4, 5), dtype=np.int64)
    padded[1:3, 1:4] = table
    assert contingency_scores(padded) == contingency_scores(table)
    with pytest.raises(ValueError, match="non-negative counts"):
        contingency_scores(np.array([[1, -1]]))
