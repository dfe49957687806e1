"""The one raw id -> row rule (``userip.data.ids``): dict and array lookups agree, unknown -> reserved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from userip.data.ids import UNKNOWN_ROW, IdIndex, dense_rows


def test_rows_in_order_and_unknown_reserved():
    index = IdIndex(["u7", "u2", "u9"])
    assert [index.get(r) for r in ("u7", "u2", "u9", "nope")] == [0, 1, 2, UNKNOWN_ROW]
    assert index.rows(["u9", "x", "u7"]).tolist() == [2, -1, 0]
    assert index.rows(iter(["u2"]), 1).dtype == np.int64
    assert list(index) == ["u7", "u2", "u9"] and len(index) == 3 and "u2" in index


def test_field_rows_start_at_one_and_encode_matches_rows():
    index = IdIndex((3, 5, 9), first_row=1, missing=0)  # a CTR field: 0 is the unseen index
    values = np.arange(11)
    assert index.encode(values).tolist() == index.rows(values.tolist()).tolist()
    assert index.encode(values).tolist() == [0, 0, 0, 1, 0, 2, 0, 0, 0, 3, 0]
    assert IdIndex((), first_row=1, missing=0).encode(np.array([1, 2])).tolist() == [0, 0]


def test_reserved_rows_are_held_by_no_one():
    index = IdIndex(["a", "", "b", ""], reserved="")  # the bank's unfilled rows
    assert len(index) == 2 and "" not in index
    assert index.rows(["b", "", "a"]).tolist() == [2, -1, 0]
    assert index.encode(np.array(["b", "", "a", "z"], dtype=object)).tolist() == [2, -1, 0, -1]


def test_repeated_ids_refused():
    with pytest.raises(ValueError, match="unique"):
        IdIndex(["a", "b", "a"])


def test_dense_rows_number_present_codes_in_order():
    codes = np.array([4, 1, 4, 2])
    kept, rows = dense_rows(codes, 6)
    assert kept.tolist() == [1, 2, 4]
    assert rows.tolist() == [UNKNOWN_ROW, 0, 1, UNKNOWN_ROW, 2, UNKNOWN_ROW]
    # The dataset's ids: kept raw keys numbered in sorted order, as factorize(sort=True) + dense_rows gives.
    raw = pd.Series(["m", "c", "m", "k"])
    codes, keys = pd.factorize(raw, sort=True)
    kept, rows = dense_rows(codes, len(keys))
    assert IdIndex(np.asarray(keys)[kept]).rows(raw).tolist() == rows[codes].tolist() == [2, 0, 2, 1]
