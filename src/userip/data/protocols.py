"""Evaluation protocols: how a prepared dataset's rows are turned into profile evidence, CTR training rows and
evaluation rows (``protocol:`` in ``userip experiment``).

    warm        the paper's random 8:1:1 split, unchanged: every user is seen in training
    sparse      each user's training rows capped at ``history_rows`` drawn at random (seeded); valid/test
                untouched. Random, not the first rows in time order: valid/test rows are random rows of the
                whole history, and a user's first ratings are a different population (on ML-100K, DCN trained
                on every user's first 5 rows reached test AUC 0.626, on 5 random rows 0.680)
    cold_start  a share of users (``cold_user_fraction``) never seen by the CTR model: their first
                ``history_rows`` interactions are all that is known of them (given to the new-user path,
                ``userip profile --new-users``), and they are scored on the rest (half of them in valid, half
                in test). Every other user's first ``history_rows`` rows are profile evidence only (the
                ``history`` split) and their later rows train the CTR model, so a warm user's profile is
                inferred from as much evidence as a cold user's and never from the rows the CTR model learns
                from (a profile fitted on the CTR's own training rows leaks their labels into a user field)
    time        the global time split (``prepare.split: time``), unchanged

On implicit data (sampled negatives, ``Dataset.is_implicit``) every count and rank above is over the observed
rows (the positives): ``history_rows`` means positives, a user's "first rows" are their first positives, and
each sampled negative follows the positive it was drawn for (same ``event``) into whatever split that positive
goes, or out of the data with it. The cold users' known rows are their positives only (a sampled negative is
not evidence about a user).

Everything is seeded and vectorised; the transform is recorded in the dataset's config.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import pandas as pd

from userip.data.preprocess import derive_hints
from userip.data.schema import HISTORY_SPLIT, Dataset, DatasetError
from userip.utils.config import ConfigError, check_fields, choice, to_dict

# The columns of a ``userip profile --new-users`` file (``userip.profile.new_users.read_new_users``).
NEW_USER_COLUMNS = ("raw_user_id", "raw_item_id", "rating", "label", "timestamp")


class Protocol(enum.Enum):
    WARM = "warm"
    SPARSE = "sparse"
    COLD_START = "cold_start"
    TIME = "time"


@dataclasses.dataclass
class ProtocolConfig:
    name: Protocol = Protocol.WARM
    history_rows: int = 5  # k: sparse's training rows per user; cold start's known rows per user
    cold_user_fraction: float = 0.2  # cold_start: share of users held out of CTR training
    seed: int = 0  # which rows sparse keeps; which users are cold

    def __post_init__(self) -> None:
        self.name = choice(Protocol, self.name, "protocol.name")  # type: ignore[assignment]
        check_fields(self, positive_ints=("history_rows",), where="protocol")
        if not 0.0 < self.cold_user_fraction < 1.0:
            raise ConfigError(
                f"protocol.cold_user_fraction: expected a number in (0, 1), got {self.cold_user_fraction!r}"
            )


@dataclasses.dataclass
class ProtocolData:
    dataset: Dataset
    # cold_start: the cold users' known rows in the ``--new-users`` file format; None for other protocols
    new_users: pd.DataFrame | None = None


def apply_protocol(dataset: Dataset, config: ProtocolConfig) -> ProtocolData:
    """The dataset as ``config`` evaluates it (``warm`` and ``time`` return it unchanged)."""
    if config.name is Protocol.SPARSE:
        return ProtocolData(_sparse(dataset, config))
    if config.name is Protocol.COLD_START:
        return _cold_start(dataset, config)
    return ProtocolData(dataset)


def _rank_in_user(interactions: pd.DataFrame) -> np.ndarray:
    """Each row's 0-based position in its user's history by (timestamp, row order); any sortable
    ``timestamp`` column works."""
    order = np.lexsort(
        (
            np.arange(len(interactions)),
            interactions["timestamp"].to_numpy(),
            interactions["user_id"].to_numpy(),
        )
    )
    users = interactions["user_id"].to_numpy()[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    ranks_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = ranks_sorted
    return ranks


def _observed_mask(interactions: pd.DataFrame) -> np.ndarray:
    """True for rows that record something the user did (all rows but implicit data's sampled negatives)."""
    if "sampled" not in interactions.columns:
        return np.ones(len(interactions), dtype=bool)
    return interactions["sampled"].to_numpy() == 0


def _to_negatives(interactions: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """``values`` (one per row; read on observed rows only) with each sampled negative given the value of its
    observed row (same user and ``event``); unchanged for data without sampled negatives."""
    if "sampled" not in interactions.columns:
        return values
    observed = _observed_mask(interactions)
    users = interactions["user_id"].to_numpy(np.int64)
    events = interactions["event"].to_numpy(np.int64)
    keys = users * (int(events.max(initial=0)) + 1) + events
    order = np.argsort(keys[observed], kind="stable")
    observed_keys = keys[observed][order]
    at = np.minimum(np.searchsorted(observed_keys, keys), max(len(observed_keys) - 1, 0))
    found = observed_keys[at] == keys if len(observed_keys) else np.zeros(len(keys), dtype=bool)
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise DatasetError(
            f"interactions: sampled negative of user {users[row]}, event {events[row]} has no observed row"
        )
    return values[observed][order][at]


def _with(dataset: Dataset, interactions: pd.DataFrame, config: ProtocolConfig) -> Dataset:
    """``dataset`` with new interactions, hints recomputed from its profile rows, the protocol recorded."""
    interactions = interactions.reset_index(drop=True)
    out = Dataset(
        interactions,
        dataset.items,
        dataset.users,
        truth=dataset.truth,
        hints=derive_hints(interactions, dataset.items) if dataset.hints is not None else None,
        source=dataset.source,
        config={**dataset.config, "protocol": to_dict(config)},
    )
    out.validate()
    return out


def _sparse(dataset: Dataset, config: ProtocolConfig) -> Dataset:
    inter = dataset.interactions
    is_train = (inter["split"] == "train").to_numpy()
    train_observed = is_train & _observed_mask(inter)
    train = inter[train_observed]
    # A random order within each user: rank by a seeded random key instead of the timestamp.
    random_key = np.random.default_rng(config.seed).random(len(train))
    train_rank = np.full(len(inter), -1, dtype=np.int64)
    train_rank[train_observed] = _rank_in_user(train.assign(timestamp=random_key))
    train_rank = _to_negatives(inter, train_rank)
    keep = ~is_train | (train_rank < config.history_rows)
    return _with(dataset, inter[keep], config)


def _cold_start(dataset: Dataset, config: ProtocolConfig) -> ProtocolData:
    inter = dataset.interactions
    k = config.history_rows
    user_ids = inter["user_id"].to_numpy()
    observed = _observed_mask(inter)
    rank = np.full(len(inter), -1, dtype=np.int64)
    rank[observed] = _rank_in_user(inter[observed])
    rank = _to_negatives(inter, rank)
    # Only users with something left to score once their k known rows are taken can be cold.
    counts = np.bincount(user_ids[observed], minlength=dataset.num_users)
    eligible = np.flatnonzero(counts > k)
    num_cold = int(round(config.cold_user_fraction * dataset.num_users))
    if num_cold < 2 or num_cold > len(eligible):
        raise ConfigError(
            f"protocol.cold_user_fraction {config.cold_user_fraction} asks for {num_cold} cold users; "
            f"{len(eligible)} users have more than history_rows={k} interactions (need at least 2)"
        )
    rng = np.random.default_rng(config.seed)
    cold_ids = rng.permutation(eligible)[:num_cold]
    valid_ids, test_ids = cold_ids[: num_cold // 2], cold_ids[num_cold // 2 :]
    is_cold = np.isin(user_ids, cold_ids)
    known = rank < k

    split = np.where(known, HISTORY_SPLIT, "train").astype(object)
    split[is_cold & ~known & np.isin(user_ids, valid_ids)] = "valid"
    split[is_cold & ~known & np.isin(user_ids, test_ids)] = "test"
    protocol_inter = inter.assign(split=split)[~(is_cold & known)]

    known_rows = inter[is_cold & known & observed]
    raw_user_ids = dataset.users["raw_user_id"].astype(str).to_numpy()
    raw_item_ids = dataset.items["raw_item_id"].astype(str).to_numpy()
    new_users = pd.DataFrame(
        {
            "raw_user_id": raw_user_ids[known_rows["user_id"].to_numpy()],
            "raw_item_id": raw_item_ids[known_rows["item_id"].to_numpy()],
            "rating": known_rows["rating"].to_numpy(),
            "label": known_rows["label"].to_numpy(),
            "timestamp": known_rows["timestamp"].to_numpy(),
        },
        columns=list(NEW_USER_COLUMNS),
    )
    return ProtocolData(_with(dataset, protocol_inter, config), new_users)


def known_rows_of(new_users: pd.DataFrame, dataset: Dataset) -> pd.DataFrame:
    """The cold users' known rows (a ``new_users`` frame) as interactions of ``dataset``'s user and item ids
    (rows of users or items the dataset does not have are dropped)."""
    user_of = pd.Series(dataset.users["user_id"].to_numpy(), index=dataset.users["raw_user_id"].astype(str))
    item_of = pd.Series(dataset.items["item_id"].to_numpy(), index=dataset.items["raw_item_id"].astype(str))
    user_ids = new_users["raw_user_id"].astype(str).map(user_of)
    item_ids = new_users["raw_item_id"].astype(str).map(item_of)
    keep = (user_ids.notna() & item_ids.notna()).to_numpy()
    return pd.DataFrame(
        {
            "user_id": user_ids[keep].astype(np.int64).to_numpy(),
            "item_id": item_ids[keep].astype(np.int64).to_numpy(),
            "label": new_users["label"].to_numpy()[keep],
        }
    )
