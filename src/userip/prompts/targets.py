"""Targets from a ``Dataset``: the behaviour text each user's soft tokens must explain.

Targets come from the dataset's profile rows (``Dataset.profile_rows``: the training split, or an evaluation
protocol's ``history`` split).
``history``: titles of the user's *training-split* interactions sorted by timestamp, joined by the separator,
cut to ``max_target_tokens`` keeping the most recent titles whole (a single over-long title keeps its end).
With ``history_feedback`` label/rating each title is followed by the user's response (" (liked)", " (4/5)"),
and title + response is the unit kept whole.
``review``: one example per training interaction with non-empty review text (the review's first tokens).

Targets are kept as one flat int32 array with offsets (CSR), so memory is proportional to the data, and a
``PromptExample`` is assembled on demand. Users with no target after filtering are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from userip.data.schema import Dataset, profile_rows_of, profile_split_of
from userip.prompts.template import HistoryFeedback, PromptBuilder, PromptConfig, PromptExample, TargetMode

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExampleSet:
    """N examples: example i is user ``user_ids[i]`` with target ``target_ids[offsets[i]:offsets[i+1]]``."""

    builder: PromptBuilder
    user_ids: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (N + 1,) int64
    target_ids: np.ndarray  # (total,) int32
    skipped_user_ids: np.ndarray  # users with no target after filtering

    def __len__(self) -> int:
        return len(self.user_ids)

    def __getitem__(self, i: int) -> PromptExample:
        target = self.target_ids[self.offsets[i] : self.offsets[i + 1]]
        return self.builder.build_from_ids(target.tolist(), user_id=int(self.user_ids[i]))

    @property
    def lengths(self) -> np.ndarray:
        """(N,) full example lengths (template + target), for length bucketing."""
        return np.diff(self.offsets) + self.builder.prefix_length

    @property
    def num_skipped_users(self) -> int:
        return len(self.skipped_user_ids)

    def subset(self, keep_user_ids: Iterable[int]) -> ExampleSet:
        """Only the examples of the given users (e.g. new users trained against a frozen model)."""
        keep = np.isin(self.user_ids, np.fromiter(keep_user_ids, dtype=np.int64))
        if keep.all():  # every example (a rank's own users): the same arrays, no per-example copy
            return dataclasses.replace(self)
        idx = np.flatnonzero(keep)
        pieces = [self.target_ids[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        return _from_pieces(self.builder, self.user_ids[idx], pieces, self.skipped_user_ids)


# Users per block of build_examples: a block's filtered rows and per-user pieces are transient, so the
# memory beyond the result does not grow with the number of users.
EXAMPLE_BLOCK_USERS = 65536


def build_examples(
    dataset: Dataset, builder: PromptBuilder, block_users: int = EXAMPLE_BLOCK_USERS
) -> ExampleSet:
    """Per-user (history) or per-interaction (review) examples from the profile rows, ``block_users`` users
    at a time when the interactions are in user order (as ``userip prepare`` writes them; otherwise at
    once). The examples do not depend on the blocks: a user's target reads its own rows only."""
    mode = builder.config.target_mode
    titles = _title_ids(dataset, builder) if mode is TargetMode.HISTORY else None
    user_parts, length_parts, flat_parts = [], [], []
    for train in _profile_row_blocks(dataset.interactions, block_users):
        if titles is not None:
            user_ids, pieces = _history_targets(dataset, train, builder, titles)
        else:
            user_ids, pieces = _review_targets(dataset, train, builder)
        user_parts.append(user_ids)
        length_parts.append(np.array([len(p) for p in pieces], dtype=np.int64))
        flat_parts.append(np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32))
        del train, pieces
    user_ids = np.concatenate(user_parts)
    # a UserShard holds one user range: only its users can be skipped here
    skipped = np.setdiff1d(np.arange(*dataset.user_range, dtype=np.int64), user_ids)
    if len(skipped):
        log.warning(
            "%d of %d users have no %s target in the training split after filtering; skipped",
            len(skipped),
            dataset.user_range[1] - dataset.user_range[0],
            mode.value,
        )
    lengths = np.concatenate(length_parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ExampleSet(builder, user_ids, offsets, _concat_freeing(flat_parts, np.int32), skipped)


def _profile_row_blocks(interactions: pd.DataFrame, block_users: int) -> Iterator[pd.DataFrame]:
    """``profile_rows_of(interactions)`` in blocks of ``block_users`` consecutive user ids (rows in user
    order; otherwise one block). The profile split is the whole table's."""
    users = interactions["user_id"].to_numpy()
    if len(users) < 2 or bool((users[1:] < users[:-1]).any()):
        yield profile_rows_of(interactions)
        return
    split = profile_split_of(interactions)
    cuts = np.arange(int(users[0]) + block_users, int(users[-1]) + 1, block_users)
    edges = [0, *np.searchsorted(users, cuts).tolist(), len(users)]
    for a, b in zip(edges, edges[1:]):
        yield profile_rows_of(interactions.iloc[a:b], split)


def _concat_freeing(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """``np.concatenate(parts)``, dropping each part once copied: a large result's pages are only touched as
    they are written, so the peak is the result plus one part, not twice the data. Empties ``parts``."""
    out = np.empty(sum(len(p) for p in parts), dtype=dtype)
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[at : at + len(part)] = part
        at += len(part)
    return out


def _from_pieces(
    builder: PromptBuilder, user_ids: np.ndarray, pieces: list[np.ndarray], skipped: np.ndarray
) -> ExampleSet:
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, dtype=np.int32)
    return ExampleSet(builder, np.asarray(user_ids, dtype=np.int64), offsets, flat, np.asarray(skipped))


def history_feedback_texts(train: pd.DataFrame, config: PromptConfig) -> tuple[np.ndarray, list[str]]:
    """(code per row of ``train``, distinct feedback texts): row r's title is followed by ``texts[codes[r]]``.

    Vectorised: each distinct (label, rating) response is formatted once, never once per interaction.
    """
    n = len(train)
    if config.history_feedback is HistoryFeedback.NONE or n == 0:
        return np.zeros(n, dtype=np.int64), [""]
    labels = (train["label"].to_numpy() > 0).astype(np.float64)
    if config.history_feedback is HistoryFeedback.RATING:
        ratings = train["rating"].to_numpy(dtype=np.float64)
        use_rating = ~np.isnan(ratings)
        keys = np.stack([use_rating.astype(np.float64), np.where(use_rating, ratings, labels)], axis=1)
    else:
        keys = np.stack([np.zeros(n), labels], axis=1)
    distinct, codes = np.unique(keys, axis=0, return_inverse=True)
    texts = [
        config.feedback_text(int(value), value if from_rating else math.nan)
        for from_rating, value in distinct
    ]
    return codes.reshape(-1).astype(np.int64), texts


def _title_ids(dataset: Dataset, builder: PromptBuilder) -> tuple[list[np.ndarray], np.ndarray]:
    """Every item's title tokens and whether it has any (empty titles are filtered out of targets)."""
    titles = dataset.items["title"].fillna("").astype(str).str.strip().to_numpy()
    title_ids = [np.asarray(ids, dtype=np.int32) for ids in builder.encode_many([" " + t for t in titles])]
    has_title = np.array([len(t) > 0 and len(ids) > 0 for t, ids in zip(titles, title_ids)], dtype=bool)
    return title_ids, has_title


def _history_targets(
    dataset: Dataset,
    train: pd.DataFrame,
    builder: PromptBuilder,
    titles: tuple[list[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """History targets of the users of ``train``; ``titles``: ``_title_ids`` (tokenized once per item, not
    once per interaction or block; computed here when not given)."""
    budget = builder.config.max_target_tokens
    sep = builder.separator_ids
    title_ids, has_title = titles if titles is not None else _title_ids(dataset, builder)
    order = np.lexsort((train["timestamp"].to_numpy(), train["user_id"].to_numpy()))  # by user, then time
    users = train["user_id"].to_numpy()[order]
    items = train["item_id"].to_numpy()[order]
    codes, texts = history_feedback_texts(train, builder.config)
    codes = codes[order]
    keep = has_title[items]
    users, items, codes = users[keep], items[keep], codes[keep]
    # A unit is "title + feedback": each distinct feedback text is tokenized once, and each distinct
    # (item, feedback) pair concatenated once; rows then index units (for feedback none, unit = title).
    suffix_ids = (
        [np.asarray(ids, dtype=np.int32) for ids in builder.encode_many(texts)] if texts != [""] else []
    )
    if suffix_ids:
        pairs, unit_of_row = np.unique(np.stack([items, codes], axis=1), axis=0, return_inverse=True)
        unit_ids = [np.concatenate([title_ids[i], suffix_ids[c]]) for i, c in pairs]
        units = unit_of_row.reshape(-1)
    else:
        unit_ids, units = title_ids, items
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(users)]
    out_users, pieces = [], []
    for s, e in zip(starts, ends):
        kept: list[np.ndarray] = []
        used = 0
        for unit in units[s:e][::-1]:  # most recent first
            t = unit_ids[unit]
            cost = len(t) + (len(sep) if kept else 0)
            if used + cost > budget:
                if not kept:  # a single over-long unit: keep its end (the feedback survives)
                    kept.append(t[-budget:])
                break
            if kept:
                kept.append(np.asarray(sep, dtype=np.int32))
            kept.append(t)
            used += cost
        out_users.append(users[s])
        pieces.append(np.concatenate(kept[::-1]))
    return np.asarray(out_users, dtype=np.int64), pieces


def _review_targets(dataset: Dataset, train, builder: PromptBuilder) -> tuple[np.ndarray, list[np.ndarray]]:
    if not dataset.has_reviews:
        raise ValueError(
            "target_mode 'review' needs an interactions.review column; this dataset has none "
            "(use target_mode 'history')"
        )
    budget = builder.config.max_target_tokens
    reviews = train["review"].fillna("").astype(str).str.strip()
    rows = train[reviews.to_numpy() != ""]
    rows = rows.iloc[np.lexsort((rows["timestamp"].to_numpy(), rows["user_id"].to_numpy()))]
    texts = [" " + r for r in rows["review"].astype(str).str.strip()]
    out_users, pieces = [], []
    chunk = 4096  # bounded tokenizer batches
    for start in range(0, len(texts), chunk):
        ids_chunk = builder.encode_many(texts[start : start + chunk])
        for u, ids in zip(rows["user_id"].to_numpy()[start : start + chunk], ids_chunk):
            if ids:
                out_users.append(u)
                pieces.append(np.asarray(ids[:budget], dtype=np.int32))
    return np.asarray(out_users, dtype=np.int64), pieces
