"""The tolerant JSON-lines and Python-literal readers and the value helpers."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from userip.data.sources.base import (
    DataLoadError,
    LoadReport,
    as_category_lists,
    parse_price,
    read_json_lines,
    read_python_literal_lines,
)

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.float64())])


def write_gz(path, lines):
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_bad_lines_located_in_gzip_among_many_blocks(tmp_path):
    lines = [json.dumps({"id": f"r{k}", "x": k, "extra": {"nested": [1]}}) for k in range(10_000)]
    bad_at = {17: "{not json", 5000: '{"id": "a", "x": "text"}', 9999: '{"id": "z", "x": 1'}  # 0-based
    for k, text in bad_at.items():
        lines[k] = text
    lines.insert(100, "")  # a blank line shifts later line numbers but is not an error
    path = write_gz(tmp_path / "r.json.gz", lines)
    report = LoadReport(max_bad_lines=3)
    frame = read_json_lines(path, SCHEMA, report, required=("id",))
    assert report.num_bad_lines == 3
    assert [b.line for b in report.bad_lines] == [18, 5002, 10001]
    assert all(b.file == str(path) for b in report.bad_lines)
    expected_ids = [f"r{k}" for k in range(10_000) if k not in bad_at]
    assert frame["id"].tolist() == expected_ids
    np.testing.assert_array_equal(frame["x"].to_numpy(), [float(k) for k in range(10_000) if k not in bad_at])
    with pytest.raises(
        DataLoadError, match=r"3 malformed line\(s\), more than the tolerance max_bad_lines=2"
    ):
        read_json_lines(path, SCHEMA, LoadReport(max_bad_lines=2))


def test_missing_required_field_reported_with_line_after_blank_lines(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('\n{"id": "a", "x": 1}\n   \n{"x": 2}\n{"id": "c"}\n')
    report = LoadReport()
    frame = read_json_lines(path, SCHEMA, report, required=("id",))
    assert [str(b) for b in report.bad_lines] == [f"{path}:4: missing field(s) ['id']"]
    assert frame["id"].tolist() == ["a", "c"] and np.isnan(frame["x"].iloc[1])


def test_python_literals_never_evaluated(tmp_path):
    path = write_gz(
        tmp_path / "meta.json.gz",
        [
            "{'asin': 'A1', 'price': 3.5, 'categories': [['Books']]}",
            "__import__('os').system('echo hi')",
            "[1, 2]",
        ],
    )
    report = LoadReport(max_bad_lines=5)
    records = read_python_literal_lines(path, report)
    assert records == [{"asin": "A1", "price": 3.5, "categories": [["Books"]]}]
    assert [b.line for b in report.bad_lines] == [2, 3]


def test_parse_price_and_categories():
    prices = parse_price(pd.Series(["$12.99", "$1,299.00", "$5.99 - $9.99", "", None, "free"]))
    np.testing.assert_array_equal(prices.to_numpy(), [12.99, 1299.0, 5.99, np.nan, np.nan, np.nan])
    assert parse_price(pd.Series([1, 2])).dtype == np.float64
    cats = as_category_lists(
        pd.Series([[["A", "B"], ["A", "C"]], "x, y ,", None, np.array(["z"])]), separator=","
    )
    assert cats.tolist() == [["A", "B", "C"], ["x", "y"], [], ["z"]]


def test_alternative_schemas_survive_a_malformed_line(tmp_path):
    """Numeric prices parse with the second schema, also in the block-by-block path a bad line forces."""
    schemas = [pa.schema([("id", pa.string()), ("price", t)]) for t in (pa.string(), pa.float64())]
    lines = [json.dumps({"id": f"i{k}", "price": k + 0.5}) for k in range(6000)]
    for bad in ([], [2]):
        for k in bad:
            lines[k] = "{oops"
        report = LoadReport()
        frame = read_json_lines(write_gz(tmp_path / "m.json.gz", lines), schemas, report)
        assert report.num_bad_lines == len(bad) and [b.line for b in report.bad_lines] == [k + 1 for k in bad]
        expected = [k + 0.5 for k in range(6000) if k not in bad]
        np.testing.assert_allclose(parse_price(frame["price"]).to_numpy(), expected)
