"""Recovery of the generator's true profiles (synthetic data) by learned profile IDs, plus reference points.

NMI (arithmetic normalisation, scikit-learn's default) and ARI between a profile's codes and a true factor,
both computed from the (true value x code) contingency table of user counts (``contingency_scores``), so the
distributed bank step's report needs only every rank's pair counts, never a row per user.
``kmeans_bow_codes`` is the upper reference used by the benchmark (k-means on users' bag-of-items vectors,
which see the same training interactions the LM sees, without any LM); ``random_codes`` is chance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import mutual_info_score

from userip.data.schema import Dataset


def contingency_table(
    true_labels: np.ndarray, code_ids: np.ndarray, counts: np.ndarray | None = None
) -> np.ndarray:
    """(distinct true values, distinct codes) int64 table: how many users have each (true value, code) pair.

    Row i of the inputs stands for ``counts[i]`` users (default 1), so equal pairs may repeat (one per rank).
    """
    true_labels, code_ids = np.asarray(true_labels), np.asarray(code_ids)
    if code_ids.shape != true_labels.shape or code_ids.ndim != 1:
        raise ValueError(
            f"code_ids {code_ids.shape} and true_labels {true_labels.shape} must be equal 1-D shapes"
        )
    true_values, true_idx = np.unique(true_labels, return_inverse=True)
    code_values, code_idx = np.unique(code_ids, return_inverse=True)
    table = np.zeros((len(true_values), len(code_values)), dtype=np.int64)
    weights = 1 if counts is None else np.asarray(counts, np.int64)
    np.add.at(table, (true_idx.ravel(), code_idx.ravel()), weights)
    return table


def _entropy(margin: np.ndarray) -> float:
    """Entropy (nats) of the labelling with these class sizes: scikit-learn's ``_entropy`` on the counts."""
    sizes = margin.astype(np.float64)
    if sizes.size == 1:
        return 0.0
    total = sizes.sum()
    return float(-np.sum((sizes / total) * (np.log(sizes) - np.log(total))))


def contingency_scores(contingency: np.ndarray) -> dict[str, float]:
    """{'nmi', 'ari'} from a (true value x code) table of user counts: equal to scikit-learn's
    ``normalized_mutual_info_score`` (arithmetic average) and ``adjusted_rand_score`` on the per-user labels,
    special cases included (no users or a single class on both sides: 1.0)."""
    table = np.asarray(contingency, dtype=np.int64)
    if table.ndim != 2 or (table < 0).any():
        raise ValueError(f"contingency must be a 2-D table of non-negative counts, got shape {table.shape}")
    rows, cols = table.sum(1), table.sum(0)
    table = table[rows > 0][:, cols > 0]  # values no user has are not classes
    rows, cols = rows[rows > 0], cols[cols > 0]
    if len(rows) == len(cols) and len(rows) <= 1:
        nmi = 1.0
    else:
        mi = mutual_info_score(None, None, contingency=table)
        nmi = 0.0 if mi == 0 else float(mi / ((_entropy(rows) + _entropy(cols)) / 2))
    # adjusted_rand_score via the pair confusion matrix (same-cluster pair counts), in Python ints
    n = int(rows.sum())
    sum_squares = int((table**2).sum())
    tp = sum_squares - n
    fp = int((table @ cols).sum()) - sum_squares
    fn = int((table.T @ rows).sum()) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        ari = 1.0
    else:
        ari = 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
    return {"nmi": nmi, "ari": float(ari)}


def profile_recovery(code_ids: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """{'nmi', 'ari'} between learned ``code_ids`` (N,) and ``true_labels`` (N,)."""
    return contingency_scores(contingency_table(true_labels, code_ids))


def profile_recovery_entry(
    code_ids: np.ndarray, true_labels: dict[str, np.ndarray], counts: np.ndarray | None = None
) -> dict[str, Any]:
    """One profile's report entry {'vs': {factor: {nmi, ari}}, 'best_match', 'num_users', 'num_codes_used'}
    from rows of (code, true value per factor), row i standing for ``counts[i]`` users (default 1)."""
    code_ids = np.asarray(code_ids)
    counts = np.ones(len(code_ids), dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
    per_factor = {
        f: contingency_scores(contingency_table(labels, code_ids, counts))
        for f, labels in true_labels.items()
    }
    return {
        "vs": per_factor,
        "best_match": max(per_factor, key=lambda f: per_factor[f]["nmi"]) if per_factor else None,
        "num_users": int(counts.sum()),
        "num_codes_used": int(len(np.unique(code_ids[counts > 0]))),
    }


def recovery_report(
    codes: np.ndarray, profile_names: list[str], truth: pd.DataFrame, user_ids: np.ndarray | None = None
) -> dict[str, Any]:
    """Every learned profile against every true factor: {profile: {factor: {nmi, ari}}}, plus 'best_match'.

    ``codes`` (U, P) is indexed by ``user_ids`` (default 0..U-1); users with code -1 (no profile) are skipped.
    """
    codes = np.asarray(codes)
    user_ids = np.arange(len(codes)) if user_ids is None else np.asarray(user_ids)
    truth = truth.set_index("user_id")
    factors = list(truth.columns)
    report: dict[str, Any] = {"profiles": {}}
    common = np.isin(user_ids, truth.index.to_numpy())
    for p, name in enumerate(profile_names):
        keep = common & (codes[:, p] >= 0)
        true_rows = truth.loc[user_ids[keep]]
        report["profiles"][name] = profile_recovery_entry(
            codes[keep, p], {f: true_rows[f].to_numpy() for f in factors}
        )
    return report


def bag_of_items(dataset: Dataset, split: str = "train") -> np.ndarray:
    """(U, I) float32 user vectors: interaction counts per item in ``split``, rows L2-normalised.

    Presence, not rating sign: which items a user chooses is what the generator's hobby drives most.
    """
    inter = dataset.split(split)
    mat = np.zeros((dataset.num_users, dataset.num_items), dtype=np.float32)
    np.add.at(mat, (inter["user_id"].to_numpy(), inter["item_id"].to_numpy()), 1.0)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    return mat / np.maximum(norms, 1e-12)


def kmeans_bow_codes(dataset: Dataset, num_clusters: int, seed: int = 0) -> np.ndarray:
    """(U,) cluster ids of k-means on bag-of-items vectors: the no-LM upper reference for recovery."""
    return (
        KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(bag_of_items(dataset)).astype(np.int64)
    )


def random_codes(num_users: int, num_clusters: int, seed: int = 0) -> np.ndarray:
    """(U,) uniform random ids: chance level of NMI / ARI."""
    return np.random.default_rng(seed).integers(0, num_clusters, num_users).astype(np.int64)
