"""Per-user tables in row groups and the user-range reader (``userip.data.shards``): a range reads only the
row groups that hold it and gets exactly its users' rows; the whole-dataset load, its content hash and a
dataset saved in one row group (a run prepared before row groups were bounded) are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from userip.data.prepare import prepare
from userip.data.schema import Dataset
from userip.data.shards import UserRowGroups, load_user_shard, profile_example_weights, read_user_rows


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return prepare("synthetic", {"num_users": 120, "num_items": 24})


def test_row_groups_index_user_ranges_and_a_range_reads_only_its_groups(dataset, tmp_path: Path) -> None:
    dataset.save(tmp_path / "data", row_group_rows=100)
    path = tmp_path / "data" / "interactions.parquet"
    index = UserRowGroups.of(path)
    assert index.ordered and len(index.rows) == pq.ParquetFile(path).metadata.num_row_groups >= 8
    rows, groups = read_user_rows(path, 30, 50)
    users = dataset.interactions["user_id"].to_numpy()
    want = dataset.interactions[(users >= 30) & (users < 50)].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, want)
    assert groups == len(index.groups_for(30, 50)) and groups <= len(index.rows) // 3
    shard = load_user_shard(tmp_path / "data", 30, 50)
    assert shard.user_range == (30, 50) and shard.num_users == dataset.num_users
    assert shard.users["user_id"].tolist() == list(range(30, 50))
    assert shard.truth["user_id"].tolist() == list(range(30, 50))
    assert shard.content_hash == dataset.content_hash
    # the single-process load is the same data, same hash, as before row groups
    loaded = Dataset.load(tmp_path / "data")
    pd.testing.assert_frame_equal(loaded.interactions, dataset.interactions)
    assert loaded.content_hash == dataset.content_hash


def test_a_dataset_in_one_row_group_still_loads_and_shards(dataset, tmp_path: Path) -> None:
    # a run prepared before row groups were bounded: one big row group per table
    dataset.save(tmp_path / "old", row_group_rows=10**9)
    assert pq.ParquetFile(tmp_path / "old" / "interactions.parquet").metadata.num_row_groups == 1
    shard = load_user_shard(tmp_path / "old", 100, 120)
    users = dataset.interactions["user_id"].to_numpy()
    assert len(shard.interactions) == int(((users >= 100) & (users < 120)).sum())
    assert Dataset.load(tmp_path / "old").content_hash == dataset.content_hash


def test_example_weights_count_profile_rows_per_user(dataset, tmp_path: Path) -> None:
    dataset.save(tmp_path / "data", row_group_rows=50)
    weights = profile_example_weights(tmp_path / "data", dataset.num_users, review=False)
    has_rows = np.bincount(dataset.profile_rows()["user_id"], minlength=dataset.num_users) > 0
    np.testing.assert_array_equal(weights, has_rows.astype(np.int64))
