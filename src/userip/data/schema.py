"""The one dataset every stage reads: interactions, items, users, split, and (synthetic) true profiles.

Tables (pandas DataFrames; Parquet on disk) and their columns. ``*_id`` columns are contiguous int64 indices
assigned after filtering (0..num_users-1, 0..num_items-1); ``raw_*_id`` keep the source's own keys as strings.

interactions   user_id int64, item_id int64, rating float32, label int8 (1 iff rating > threshold),
               timestamp int64 (seconds; 0 where the source has none; a per-user position for positional
               implicit sources), split str in {train, valid, test, history},
               review str (optional column: review text, "" where missing)
               Implicit feedback (optional columns, both or neither): sampled int8 (1: a negative sampled by
               preparation, label 0, rating NaN; 0: an observed interaction, label 1) and event int64 (the
               rank of the observed interaction in its user's history, 0 = oldest, shared by its sampled
               negatives, which copy its timestamp and split)
items          item_id int64, raw_item_id str, title str, categories list[str], brand str, price float64 (NaN
               where missing)
users          user_id int64, raw_user_id str, then observable features (str columns, e.g. age, gender)
truth          (optional, synthetic data) user_id int64, then one int64 column per true latent profile
hints          (optional) user_id int64, favourite_category str, favourite_brand str, price_level str:
               the paper's derived profile words, computed from the *training split only* (its observed rows)

On disk a dataset is a folder ``<run_dir>/data/`` holding ``<table>.parquet`` files and ``manifest.json``
(source, counts, config, per-table content hashes, overall ``content_hash``). The manifest is written last, so
a folder without it is an interrupted write and is refused by ``load``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.utils.artifacts import check_record
from userip.utils.io import atomic_write_json, atomic_write_with, read_json
from userip.utils.run_layout import RunLayout

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")  # the CTR splits
# Rows that are profile evidence only, never CTR training rows. Evaluation protocols
# (``userip.data.protocols``) use it to keep the rows a profile is inferred from apart from the rows a CTR
# model learns from.
HISTORY_SPLIT = "history"
ALL_SPLITS = (*SPLITS, HISTORY_SPLIT)
TABLES = ("interactions", "items", "users", "truth", "hints")
MANIFEST = "manifest.json"
# Rows per Parquet row group of the per-user tables (written in user_id order): the footer's user_id
# statistics then index user ranges, and a rank of the distributed profile stage reads only the row groups
# of its users (``userip.data.shards``). Small enough that a rank reads little beyond its range, large
# enough that the footer stays small (10M users x 15 interactions: ~2,300 row groups).
ROW_GROUP_ROWS = 65536

INTERACTION_COLUMNS = {
    "user_id": "int64",
    "item_id": "int64",
    "rating": "float32",
    "label": "int8",
    "timestamp": "int64",
    "split": "object",
}
# Implicit feedback's extra columns (see the module docstring): present together or not at all.
IMPLICIT_COLUMNS = ("event", "sampled")
ITEM_COLUMNS = ("item_id", "raw_item_id", "title", "categories", "brand", "price")
USER_COLUMNS = ("user_id", "raw_user_id")


def profile_split_of(interactions: pd.DataFrame) -> str:
    """The profile split: the ``history`` split when there is one, else the training split."""
    return HISTORY_SPLIT if bool((interactions["split"] == HISTORY_SPLIT).any()) else "train"


def profile_samples_of(interactions: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    """The labelled rows of the profile split (``profile_split_of``, or ``split`` when given: the split of
    the whole table, for a block of its rows), sampled negatives included (what a supervised objective on
    the profile split trains on)."""
    return interactions[interactions["split"] == (split or profile_split_of(interactions))]


def observed(interactions: pd.DataFrame) -> pd.DataFrame:
    """The rows that record something the user did: all rows, less the sampled negatives of implicit data."""
    if "sampled" not in interactions.columns:
        return interactions
    return interactions[interactions["sampled"].to_numpy() == 0]


def profile_rows_of(interactions: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    """The rows profiles are inferred from (prompt targets, hints, the evidence of control rows and probes):
    the observed rows of the profile split (``profile_samples_of``). A sampled negative is an item the user
    never met, not evidence of a taste, so implicit data gives its positives only; explicit data is
    unchanged (every row observed). ``split``: as ``profile_samples_of``."""
    return observed(profile_samples_of(interactions, split))


def user_ranks(user_ids: np.ndarray) -> np.ndarray:
    """Each row's 0-based rank among its user's rows, in row order (int64)."""
    user_ids = np.asarray(user_ids)
    order = np.argsort(user_ids, kind="stable")
    ordered = user_ids[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else np.zeros(0, int)
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return ranks


class DatasetError(ValueError):
    """A dataset table or folder does not meet the schema; the message names the table and column."""


@dataclasses.dataclass
class Dataset:
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    truth: pd.DataFrame | None = None
    hints: pd.DataFrame | None = None
    source: str = "unknown"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ basic facts
    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        """Observed interactions (every row, less the sampled negatives of implicit data): Table 1's count."""
        if not self.is_implicit:
            return len(self.interactions)
        return int((self.interactions["sampled"].to_numpy() == 0).sum())

    @property
    def is_implicit(self) -> bool:
        """Implicit feedback: observed rows are positives and the negatives were sampled (``sampled``)."""
        return "sampled" in self.interactions.columns

    @property
    def has_reviews(self) -> bool:
        return "review" in self.interactions.columns

    @property
    def user_range(self) -> tuple[int, int]:
        """The user ids ``[lo, hi)`` whose rows this object holds: all of them (a ``UserShard`` holds one
        range)."""
        return 0, self.num_users

    def split(self, name: str) -> pd.DataFrame:
        if name not in ALL_SPLITS:
            raise DatasetError(f"unknown split {name!r}; expected one of {ALL_SPLITS}")
        return self.interactions[self.interactions["split"] == name]

    def profile_rows(self) -> pd.DataFrame:
        """The rows profiles are inferred from (see ``profile_rows_of``): no sampled negatives."""
        return profile_rows_of(self.interactions)

    def profile_samples(self) -> pd.DataFrame:
        """The labelled rows of the profile split, sampled negatives included (see ``profile_samples_of``)."""
        return profile_samples_of(self.interactions)

    @property
    def profile_names(self) -> list[str]:
        """Names of the true latent profiles (synthetic data), e.g. ['hobby', 'background']."""
        return [] if self.truth is None else [c for c in self.truth.columns if c != "user_id"]

    def statistics(self) -> dict[str, Any]:
        """The paper's Table 1 (interactions, users, items, sparsity %) plus split sizes (rows, sampled
        negatives included) and positive rate; implicit data adds the number of sampled negatives."""
        n, u, i = self.num_interactions, self.num_users, self.num_items
        sparsity = 100.0 * (1.0 - n / (u * i)) if u and i else float("nan")
        by_split = self.interactions["split"].value_counts()
        stats = {
            "interactions": n,
            "users": u,
            "items": i,
            "sparsity_pct": round(sparsity, 4),
            "positive_rate": float(self.interactions["label"].mean()) if n else float("nan"),
            **{f"num_{s}": int(by_split.get(s, 0)) for s in ALL_SPLITS},
        }
        if self.is_implicit:
            stats["sampled_negatives"] = len(self.interactions) - n
        return stats

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check columns, contiguous ids and referential integrity; raise DatasetError naming the cause."""
        inter = self.interactions
        for col in INTERACTION_COLUMNS:
            if col not in inter.columns:
                raise DatasetError(f"interactions: missing column {col!r}")
        for col in ITEM_COLUMNS:
            if col not in self.items.columns:
                raise DatasetError(f"items: missing column {col!r}")
        for col in USER_COLUMNS:
            if col not in self.users.columns:
                raise DatasetError(f"users: missing column {col!r}")
        if len(inter) == 0:
            raise DatasetError("interactions: empty dataset")
        for table, col, n in (("users", "user_id", self.num_users), ("items", "item_id", self.num_items)):
            ids = getattr(self, table)[col].to_numpy()
            if not np.array_equal(ids, np.arange(n)):
                raise DatasetError(f"{table}.{col}: must be 0..{n - 1} in order (contiguous after filtering)")
        for col, n in (("user_id", self.num_users), ("item_id", self.num_items)):
            v = inter[col].to_numpy()
            if v.min() < 0 or v.max() >= n:
                raise DatasetError(f"interactions.{col}: values outside 0..{n - 1}")
        bad = set(inter["split"].unique()) - set(ALL_SPLITS)
        if bad:
            raise DatasetError(f"interactions.split: unknown values {sorted(bad)}; expected {ALL_SPLITS}")
        if not set(np.unique(inter["label"].to_numpy())) <= {0, 1}:
            raise DatasetError("interactions.label: must be 0/1")
        present = [c for c in IMPLICIT_COLUMNS if c in inter.columns]
        if present and len(present) != len(IMPLICIT_COLUMNS):
            raise DatasetError(
                f"interactions: implicit columns {list(IMPLICIT_COLUMNS)} come together; has {present}"
            )
        if present:
            sampled = inter["sampled"].to_numpy()
            if not set(np.unique(sampled)) <= {0, 1}:
                raise DatasetError("interactions.sampled: must be 0/1")
            if (inter["label"].to_numpy() != (sampled == 0)).any():
                raise DatasetError(
                    "interactions.sampled: sampled rows must have label 0, observed rows label 1"
                )
            if len(inter) and inter["event"].to_numpy().min() < 0:
                raise DatasetError("interactions.event: must be >= 0")

    # ------------------------------------------------------------------ persistence
    def table_hashes(self) -> dict[str, str]:
        """Content hash per table, independent of Parquet writer versions (hashes the values)."""
        out = {}
        for name in TABLES:
            df = getattr(self, name)
            if df is None:
                continue
            out[name] = _hash_frame(df)
        return out

    @property
    def content_hash(self) -> str:
        return _combine_hashes(self.table_hashes())

    def save(self, folder: str | Path, row_group_rows: int = ROW_GROUP_ROWS) -> dict[str, Any]:
        """Write every table atomically, then the manifest (last, so its presence marks a complete write).

        Tables keep their row order (interactions are in user order, as preparation builds them; users,
        truth and hints in user_id order), in row groups of ``row_group_rows`` rows: see ``ROW_GROUP_ROWS``.
        """
        self.validate()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path = folder / MANIFEST
        # An old manifest must not vouch for tables being replaced: remove it first.
        if manifest_path.exists():
            manifest_path.unlink()
        for name in TABLES:
            df = getattr(self, name)
            target = folder / f"{name}.parquet"
            if df is None:
                if target.exists():
                    target.unlink()
                continue
            atomic_write_with(
                target,
                lambda tmp, df=df: df.to_parquet(tmp, index=False, row_group_size=row_group_rows),
            )
        hashes = self.table_hashes()  # hashing is the slow part of a save: do it once
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "counts": self.statistics(),
            "config": self.config,
            "table_hashes": hashes,
            "content_hash": _combine_hashes(hashes),
            "profile_names": self.profile_names,
        }
        atomic_write_json(manifest_path, manifest)
        return manifest

    @classmethod
    def load(cls, folder: str | Path) -> Dataset:
        folder = Path(folder)
        if (RunLayout(folder).data / MANIFEST).exists():  # accept a run directory as well
            folder = RunLayout(folder).data
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise DatasetError(
                f"{folder}: no {MANIFEST}; not a prepared dataset (or its write was interrupted). "
                "Run `userip prepare` first."
            )
        manifest = _read_checked_manifest(manifest_path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        tables: dict[str, pd.DataFrame | None] = {}
        for name in TABLES:
            path = folder / f"{name}.parquet"
            if name in manifest["table_hashes"]:
                if not path.exists():
                    raise DatasetError(f"{path}: listed in the manifest but missing")
                try:
                    tables[name] = pd.read_parquet(path)
                except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
                    raise DatasetError(f"{path}: unreadable Parquet table (corrupt or truncated: {e})") from e
            else:
                tables[name] = None
        ds = cls(**tables, source=manifest["source"], config=manifest.get("config", {}))  # type: ignore[arg-type]
        ds.validate()
        # A table altered after the write (a page that still decodes, an edited file) must not pass as the
        # data the bank and the CTR models were built from: the hashes recorded at write time decide.
        # (About 0.4 s for Yelp's 606k rows.)
        altered = [
            f"{name}.parquet"
            for name, digest in ds.table_hashes().items()
            if manifest["table_hashes"].get(name) != digest
        ]
        if altered:
            raise DatasetError(
                f"{folder}: {', '.join(altered)} differ from the content hashes recorded in {MANIFEST} when "
                "they were written (altered or corrupt); prepare the data again"
            )
        return ds

    @staticmethod
    def read_manifest(folder: str | Path) -> dict[str, Any]:
        folder = Path(folder)
        if (RunLayout(folder).data / MANIFEST).exists():
            folder = RunLayout(folder).data
        return _read_checked_manifest(folder / MANIFEST)


def _read_checked_manifest(path: Path) -> dict[str, Any]:
    """A dataset manifest with the fields every reader relies on (a garbage file is a named error)."""
    manifest = read_json(path)
    check_record(manifest, path, {"format_version": int, "source": str, "table_hashes": dict})
    return manifest


def _combine_hashes(table_hashes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, value in sorted(table_hashes.items()):
        h.update(f"{name}={value};".encode())
    return h.hexdigest()[:16]


def _hash_frame(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(",".join(map(str, df.columns)).encode())
    for col in df.columns:
        series = df[col]
        if series.dtype == object and len(series) and isinstance(series.iloc[0], list | np.ndarray):
            series = series.map(lambda v: "\x1f".join(map(str, v)))
        h.update(pd.util.hash_pandas_object(series, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]
