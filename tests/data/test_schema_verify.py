from __future__ import annotations

import pandas as pd
import pytest
from tests.prompts.conftest import dataset_from_rows

from userip.data.schema import Dataset, DatasetError


def test_a_table_altered_after_the_write_is_refused(tmp_path):
    rows = [(u, i, t, "train") for u in range(3) for t, i in enumerate((0, 2, 4))]
    dataset_from_rows(rows, num_users=3).save(tmp_path)
    assert len(Dataset.load(tmp_path).interactions) == 9  # untouched: loads

    path = tmp_path / "interactions.parquet"
    inter = pd.read_parquet(path)
    inter.loc[0, "label"] = 0  # a valid Parquet file with one label flipped
    inter.to_parquet(path, index=False)
    with pytest.raises(DatasetError, match=r"interactions\.parquet differ from the content hashes"):
        Dataset.load(tmp_path)
