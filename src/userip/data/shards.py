"""Reading one user range of a prepared dataset: what a rank of the distributed profile stage holds.

``Dataset.save`` writes every per-user table (interactions, users, truth, hints) in ``user_id`` order with
row groups of at most ``ROW_GROUP_ROWS`` rows, so the Parquet footer of each file is an index of user
ranges: row group g holds users ``[min, max]`` of its ``user_id`` statistics. ``UserRowGroups`` reads that
index (footer only, O(row groups)); ``read_user_rows`` reads only the row groups that overlap ``[lo, hi)``
(then drops the rows outside it), and ``load_user_shard`` gives a ``Dataset`` restricted to those users.

Runs prepared before row groups were bounded still load: their tables are sorted by user too (preparation
always ordered them so), only in larger row groups (pyarrow's default is about a million rows), so a rank
reads more rows than it keeps. A file whose row groups are not in user order is read whole (correct, not
local) with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userip.data.schema import (
    HISTORY_SPLIT,
    MANIFEST,
    Dataset,
    DatasetError,
)
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)

PER_USER_TABLES = ("interactions", "users", "truth", "hints")


def data_folder(folder: str | Path) -> Path:
    """``folder`` itself, or the data folder of a run directory."""
    folder = Path(folder)
    if (RunLayout(folder).data / MANIFEST).exists():
        return RunLayout(folder).data
    return folder


@dataclasses.dataclass(frozen=True)
class UserRowGroups:
    """One Parquet table's index of user ranges: row group g holds user ids ``[first[g], last[g]]``."""

    path: Path
    first: np.ndarray  # (G,) int64
    last: np.ndarray  # (G,) int64
    rows: np.ndarray  # (G,) int64
    ordered: bool  # row groups in user order (adjacent groups share at most their boundary user)

    @classmethod
    def of(cls, path: str | Path) -> UserRowGroups:
        path = Path(path)
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path}: unreadable Parquet table (corrupt or truncated: {e})") from e
        column = meta.schema.names.index("user_id") if "user_id" in meta.schema.names else -1
        if column < 0:
            raise DatasetError(f"{path}: no user_id column")
        first, last, rows = [], [], []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(column).statistics
            if stats is None or not stats.has_min_max:  # no statistics: this group may hold anyone
                first.append(np.iinfo(np.int64).min)
                last.append(np.iinfo(np.int64).max)
            else:
                first.append(int(stats.min))
                last.append(int(stats.max))
            rows.append(group.num_rows)
        f, la = np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64)
        # a user's rows may continue into the next group: first[g + 1] == last[g] is still in order
        ordered = bool(len(f) == 0 or ((f <= la).all() and (f[1:] >= la[:-1]).all()))
        return cls(path, f, la, np.asarray(rows, dtype=np.int64), ordered)

    def groups_for(self, lo: int, hi: int) -> list[int]:
        """Row groups that may hold a user in ``[lo, hi)``."""
        if not self.ordered:
            log.warning("%s: row groups are not in user order; reading the whole table", self.path)
            return list(range(len(self.rows)))
        return np.flatnonzero((self.last >= lo) & (self.first < hi)).tolist()


def read_user_rows(
    path: str | Path, lo: int, hi: int, columns: list[str] | None = None
) -> tuple[pd.DataFrame, int]:
    """The rows of users ``[lo, hi)`` of a per-user table (file order kept) and how many row groups were
    read."""
    index = UserRowGroups.of(path)
    groups = index.groups_for(lo, hi)
    file = pq.ParquetFile(path)
    tables = []
    try:
        # Arrow tables of the groups (rows outside the range dropped per group), converted to pandas once,
        # each column's Arrow buffers freed as it is converted: about one copy of the rows at any moment
        # (pandas frames per group and their concatenation would hold two).
        for g in groups:
            part = file.read_row_group(g, columns=columns)
            users = part.column("user_id").to_numpy()
            keep = (users >= lo) & (users < hi)
            tables.append(part if keep.all() else part.filter(pa.array(keep)))
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path}: unreadable Parquet table (corrupt or truncated: {e})") from e
    if not tables:  # no row group holds the range: the table's columns, no rows
        return file.schema_arrow.empty_table().to_pandas(), 0
    table = pa.concat_tables(tables)
    del tables
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    pa.default_memory_pool().release_unused()  # give the groups' buffers back, not to the pool's cache
    return frame.reset_index(drop=True), len(groups)


class UserShard(Dataset):
    """A ``Dataset`` holding only users ``[user_lo, user_hi)``: their interactions, users, truth and hints
    rows (global user ids), and every item. ``num_users`` and ``content_hash`` are the whole dataset's (from
    its manifest), so code that sizes per-user arrays or checks the data's identity sees the full dataset;
    the tables' own hashes are not recomputed (the manifest's are trusted: a rank cannot hash rows it does
    not read). Not for ``save`` or ``validate``."""

    def __init__(self, *args: Any, user_lo: int, user_hi: int, manifest: dict[str, Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.user_lo, self.user_hi, self.manifest = user_lo, user_hi, manifest
        self.row_groups_read: dict[str, int] = {}

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def user_range(self) -> tuple[int, int]:
        return self.user_lo, self.user_hi

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def table_hashes(self) -> dict[str, str]:
        return dict(self.manifest["table_hashes"])

    def save(self, folder: str | Path) -> dict[str, Any]:  # pragma: no cover - guard
        raise DatasetError("a UserShard holds part of a dataset and cannot be saved")


def load_user_shard(folder: str | Path, lo: int, hi: int, full_users: bool = False) -> UserShard:
    """Users ``[lo, hi)`` of the prepared dataset in ``folder`` (a data folder or a run directory), reading
    only the row groups that hold them (every item; with ``full_users`` the whole users table, which a
    surrogate on users' observable features needs for its vocabularies)."""
    folder = data_folder(folder)
    manifest = Dataset.read_manifest(folder)
    hashes = manifest.get("table_hashes", {})
    tables: dict[str, pd.DataFrame | None] = {}
    groups: dict[str, int] = {}
    for name in PER_USER_TABLES:
        path = folder / f"{name}.parquet"
        if name not in hashes:
            tables[name] = None
            continue
        if not path.exists():
            raise DatasetError(f"{path}: listed in the manifest but missing")
        if name == "users" and full_users:
            tables[name], groups[name] = pd.read_parquet(path), UserRowGroups.of(path).rows.size
        else:
            tables[name], groups[name] = read_user_rows(path, lo, hi)
    tables["items"] = pd.read_parquet(folder / "items.parquet")
    shard = UserShard(
        **tables,  # type: ignore[arg-type]
        source=manifest["source"],
        config=manifest.get("config", {}),
        user_lo=lo,
        user_hi=hi,
        manifest=manifest,
    )
    shard.row_groups_read = groups
    return shard


def profile_example_weights(folder: str | Path, num_users: int, review: bool) -> np.ndarray:
    """(num_users,) int32: about how many training examples each user will give, read one row group at a
    time (columns user_id, split[, sampled][, review]): memory is the (num_users,) counts plus one row group.

    History targets: 1 for a user with a profile row (a user whose every title is empty gets 0 examples but
    1 here); review targets: the profile rows with a non-empty review. The profile rows are those of
    ``profile_rows_of`` (the history split when the dataset has one, else train; observed rows only).
    """
    path = data_folder(folder) / "interactions.parquet"
    file = pq.ParquetFile(path)
    names = set(file.schema_arrow.names)
    columns = ["user_id", "split"] + [c for c in ("sampled",) if c in names] + (["review"] if review else [])
    counts = {s: np.zeros(num_users, dtype=np.int32) for s in ("train", HISTORY_SPLIT)}
    for g in range(file.metadata.num_row_groups):
        frame = file.read_row_group(g, columns=columns).to_pandas()
        keep = np.ones(len(frame), dtype=bool)
        if "sampled" in frame.columns:
            keep &= frame["sampled"].to_numpy() == 0
        if review:
            keep &= frame["review"].fillna("").astype(str).str.strip().to_numpy() != ""
        split = frame["split"].to_numpy()
        users = frame["user_id"].to_numpy()
        for name, out in counts.items():
            rows = users[keep & (split == name)]
            if len(rows):  # rows of one row group: a few users, added where they are
                present, n = np.unique(rows, return_counts=True)
                out[present] += n.astype(np.int32)
    # the profile split is the history split when the dataset has one (profile_samples_of)
    chosen = counts[HISTORY_SPLIT] if counts[HISTORY_SPLIT].any() else counts["train"]
    return chosen if review else (chosen > 0).astype(np.int32)
