"""Recovery of the generator's true profiles (synthetic data) by learned profile IDs, plus reference points.

NMI (arithmetic normalisation, scikit-learn's default) and ARI between a profile's codes and a true factor.
``kmeans_bow_codes`` is the upper reference used by the benchmark (k-means on users' bag-of-items vectors,
which see the same training interactions the LM sees, without any LM); ``random_codes`` is chance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from userip.data.schema import Dataset


def profile_recovery(code_ids: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """{'nmi', 'ari'} between learned ``code_ids`` (N,) and ``true_labels`` (N,)."""
    code_ids, true_labels = np.asarray(code_ids), np.asarray(true_labels)
    if code_ids.shape != true_labels.shape or code_ids.ndim != 1:
        raise ValueError(
            f"code_ids {code_ids.shape} and true_labels {true_labels.shape} must be equal 1-D shapes"
        )
    return {
        "nmi": float(normalized_mutual_info_score(true_labels, code_ids)),
        "ari": float(adjusted_rand_score(true_labels, code_ids)),
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
        per_factor = {f: profile_recovery(codes[keep, p], true_rows[f].to_numpy()) for f in factors}
        report["profiles"][name] = {
            "vs": per_factor,
            "best_match": max(per_factor, key=lambda f: per_factor[f]["nmi"]) if per_factor else None,
            "num_users": int(keep.sum()),
            "num_codes_used": int(len(np.unique(codes[keep, p]))),
        }
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
