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
