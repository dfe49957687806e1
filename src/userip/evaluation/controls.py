"""Control banks: user IDs that do not come from the LM, for the rows a reader compares UserIP against.

``bag_of_items_bank``: per codebook size K_p, k-means (scikit-learn) on each user's L2-normalised bag of
profile-row items, so the control sees exactly the evidence the profiles were inferred from and has the same
number of codes; what UserIP-<model> gains over it is what the frozen LM adds over plain clustering. With
``signed=True`` (a prompt that states feedback) liked and not-liked items are separate halves of the bag, so
the control also sees the labels the profiles see. Users with known rows but no profile rows (cold users)
are assigned to the nearest centroid, as a new user would be.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize

from userip.data.schema import Dataset
from userip.evaluation.probes import bag_of_items
from userip.feature_bank import UNKNOWN_CODE, FeatureBank


def user_bags(dataset: Dataset, rows: pd.DataFrame, signed: bool) -> sp.csr_matrix:
    """(num_users, I or 2I) bag of each user's items in ``rows`` (liked | not liked halves when signed)."""
    if not signed:
        return bag_of_items(dataset, rows, dataset.num_users)
    liked = rows["label"].to_numpy() == 1
    halves = [bag_of_items(dataset, rows[mask], dataset.num_users) for mask in (liked, ~liked)]
    return normalize(sp.hstack(halves, format="csr"), norm="l2", axis=1).tocsr()


def bag_of_items_bank(
    dataset: Dataset,
    profile_names: list[str],
    codebook_sizes: list[int],
    known_rows: pd.DataFrame | None = None,
    signed: bool = False,
    seed: int = 0,
) -> FeatureBank:
    """A codes bank from k-means on the bags of ``dataset.profile_rows()``; ``known_rows`` (interactions with
    dataset ``user_id``/``item_id``, e.g. cold users' known rows) adds users that have no profile rows."""
    fit_rows = dataset.profile_rows()
    fit_users = np.unique(fit_rows["user_id"].to_numpy())
    fit_bags = user_bags(dataset, fit_rows, signed)[fit_users]
    extra_users = np.zeros(0, dtype=np.int64)
    if known_rows is not None and len(known_rows):
        extra_users = np.setdiff1d(np.unique(known_rows["user_id"].to_numpy()), fit_users)
        extra_bags = user_bags(dataset, known_rows, signed)[extra_users]
    codes = np.full((dataset.num_users, len(profile_names)), UNKNOWN_CODE, dtype=np.int64)
    codebooks = []
    for p, size in enumerate(codebook_sizes):
        kmeans = KMeans(n_clusters=size, n_init=10, random_state=seed + p).fit(fit_bags)
        codes[fit_users, p] = kmeans.labels_
        if len(extra_users):
            codes[extra_users, p] = kmeans.predict(extra_bags)
        codebooks.append(kmeans.cluster_centers_.astype(np.float32))
    return FeatureBank.build(
        profile_names=profile_names,
        codebooks=codebooks,
        codes=codes,
        raw_user_ids=dataset.users["raw_user_id"].astype(str).tolist(),
        dataset_hash=dataset.content_hash,
        lm="none (bag-of-items k-means control)",
        config={
            "control": "bag_of_items",
            "codebook_sizes": list(codebook_sizes),
            "signed": signed,
            "seed": seed,
        },
    )
