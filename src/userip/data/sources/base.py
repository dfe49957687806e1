"""What every source loader returns, the load report, and fast tolerant readers for JSON-lines files.

A loader turns a source's files into a :class:`RawData`: frames keyed by the source's own (string) ids, before
any labelling, filtering, re-indexing or splitting (that is :mod:`userip.data.preprocess`, the same for every
source). Problems that do not stop the load (malformed lines, missing titles or prices) are counted in a
:class:`LoadReport` with file and line, and the load fails once malformed lines exceed a tolerance.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

log = logging.getLogger(__name__)

# Columns of RawData.interactions: required first, optional after.
RAW_INTERACTION_REQUIRED = ("raw_user_id", "raw_item_id")
RAW_INTERACTION_OPTIONAL = ("rating", "label", "timestamp", "review", "split")
RAW_ITEM_COLUMNS = ("raw_item_id", "title", "categories", "brand", "price")

# How many bad lines a report keeps verbatim (all are counted).
_MAX_KEPT_BAD_LINES = 20
# Lines per block when a file has malformed lines and has to be scanned block by block.
_BLOCK_LINES = 4096


class DataLoadError(ValueError):
    """A source cannot be loaded; the message names the file (and line) and what was expected."""


@dataclasses.dataclass
class BadLine:
    file: str
    line: int  # 1-based
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"


@dataclasses.dataclass
class LoadReport:
    """Counts of tolerated problems; ``check_bad_lines`` turns too many malformed lines into an error."""

    max_bad_lines: int = 100
    num_bad_lines: int = 0
    bad_lines: list[BadLine] = dataclasses.field(default_factory=list)
    num_missing_titles: int = 0
    num_missing_prices: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def add_bad_line(self, file: str | Path, line: int, error: str) -> None:
        self.num_bad_lines += 1
        if len(self.bad_lines) < _MAX_KEPT_BAD_LINES:
            self.bad_lines.append(BadLine(str(file), int(line), error[:200]))

    def check_bad_lines(self) -> None:
        if self.num_bad_lines > self.max_bad_lines:
            shown = "\n  ".join(map(str, self.bad_lines))
            raise DataLoadError(
                f"{self.num_bad_lines} malformed line(s), more than the tolerance max_bad_lines="
                f"{self.max_bad_lines} (raise it with --max-bad-lines). First ones:\n  {shown}"
            )

    def note(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_bad_lines": self.num_bad_lines,
            "bad_lines": [str(b) for b in self.bad_lines],
            "num_missing_titles": self.num_missing_titles,
            "num_missing_prices": self.num_missing_prices,
            "notes": list(self.notes),
        }


@dataclasses.dataclass
class RawData:
    """A source's data keyed by its own ids (strings), before labelling, filtering and splitting.

    interactions  raw_user_id str, raw_item_id str, and optionally rating float64, label int8 (a ready 0/1
                  label), timestamp int64 (seconds), review str, split str (the source's own train/valid/test)
    items         raw_item_id str, title str, categories list[str], brand str, price float64 (NaN if missing)
    users         raw_user_id str, then observable features (converted to str by preprocessing)
    truth         raw_user_id str, then one int column per true latent profile (synthetic data)
    extra_config  facts about the source worth keeping in the manifest (e.g. names of truth values)
    implicit      every interaction is an observed positive and there is no rating or label: preprocessing
                  labels them 1 and samples the negatives (``PrepareConfig.negatives_per_positive``)
    positional    ``timestamp`` holds each user's position (0 = oldest), which orders a user's history but is
                  not comparable across users (no global time split)
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None
    report: LoadReport = dataclasses.field(default_factory=LoadReport)
    extra_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    implicit: bool = False
    positional: bool = False


# ---------------------------------------------------------------------------------------------- file helpers
def require_file(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise DataLoadError(f"no {what} given")
    path = Path(path)
    if not path.is_file():
        raise DataLoadError(f"{path}: {what} not found")
    return path


def find_file(folder: str | Path, candidates: tuple[str, ...], what: str) -> Path:
    """The first of ``candidates`` (glob patterns, tried with and without .gz) that exists in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataLoadError(f"{folder}: folder not found (expected the {what} inside it)")
    for pattern in candidates:
        for pat in (pattern, pattern + ".gz"):
            hits = sorted(folder.glob(pat))
            if hits:
                return hits[0]
    raise DataLoadError(f"{folder}: no {what} found (looked for {', '.join(candidates)}, optionally .gz)")


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it is gzip (by magic number, not by name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _open_stream(path: Path) -> pa.NativeFile:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    raw = pa.OSFile(str(path))
    return pa.CompressedInputStream(raw, "gzip") if gzipped else raw


def _line_starts(data: bytes) -> np.ndarray:
    """Byte offset of each line's start (vectorised over the whole buffer)."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    return np.concatenate([[0], newlines + 1]).astype(np.int64)


def _nonblank_line_numbers(data: bytes) -> np.ndarray:
    """1-based numbers of the lines holding something other than whitespace (pyarrow skips blank lines)."""
    starts = _line_starts(data)
    ends = np.append(starts[1:] - 1, len(data))
    buffer = np.frombuffer(data, dtype=np.uint8)
    is_text = ~np.isin(buffer, np.frombuffer(b" \t\r\n\x0b\x0c", dtype=np.uint8))
    text_before = np.concatenate([[0], np.cumsum(is_text)])  # text_before[k] = text bytes in data[:k]
    return np.flatnonzero(text_before[ends] > text_before[starts]) + 1


# ---------------------------------------------------------------------------------------------- JSON lines
def read_json_lines(
    path: Path,
    schema: pa.Schema | list[pa.Schema],
    report: LoadReport,
    required: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Read a JSON-lines file (gzip or plain) into a frame with exactly ``schema``'s columns.

    Fast path: one pyarrow parse of the whole file (unknown fields ignored), trying each schema of a list in
    turn (e.g. price as a string, then as a number). When all fail, the file is parsed in blocks with the
    first schema and each failing block is bisected down to its malformed lines, which are counted with
    their line numbers; every other line is kept. Rows missing a ``required`` field count as bad lines too.
    """
    try:
        return _read_json_lines(path, schema, report, required)
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream, unreadable file
        raise DataLoadError(f"{path}: not a readable (gzip) JSON-lines file ({type(e).__name__}: {e})") from e


def _read_json_lines(
    path: Path, schema: pa.Schema | list[pa.Schema], report: LoadReport, required: tuple[str, ...]
) -> pd.DataFrame:
    schemas = schema if isinstance(schema, list) else [schema]
    all_options = [
        pa_json.ParseOptions(explicit_schema=s, unexpected_field_behavior="ignore") for s in schemas
    ]
    table = None
    line_numbers = None  # computed lazily, only if a row has to be reported
    for options in all_options:
        try:
            # Streaming from the (gzip) file lets Arrow decompress and parse blocks in parallel.
            with _open_stream(path) as stream:
                table = pa_json.read_json(stream, parse_options=options)
            break
        except pa.ArrowInvalid:
            continue
    if table is None:
        table, line_numbers = _read_json_lines_tolerant(path, read_bytes(path), all_options, report)
    # One chunk per column: gathers (take) on a many-chunk Arrow column are ~7x slower downstream.
    frame = table.combine_chunks().to_pandas()
    if required and len(frame):
        missing = frame[list(required)].isna().any(axis=1).to_numpy()
        if missing.any():
            if line_numbers is None:
                line_numbers = _nonblank_line_numbers(read_bytes(path))
            for row in np.flatnonzero(missing):
                absent = [c for c in required if pd.isna(frame.iloc[row][c])]
                report.add_bad_line(path, int(line_numbers[row]), f"missing field(s) {absent}")
            frame = frame[~missing].reset_index(drop=True)
    report.check_bad_lines()
    return frame


def _read_json_lines_tolerant(
    path: Path, data: bytes, all_options: list[pa_json.ParseOptions], report: LoadReport
) -> tuple[pa.Table, np.ndarray]:
    """Parse block by block (any of the schemas may parse a block; results are cast to the first one) and
    bisect failing blocks down to single malformed lines."""
    lines = data.split(b"\n")
    target = all_options[0].explicit_schema
    tables: list[pa.Table] = []
    kept_numbers: list[np.ndarray] = []

    def parse_block(lo: int, hi: int) -> pa.Table:
        block = b"\n".join(lines[lo:hi]) + b"\n"
        error: pa.ArrowInvalid | None = None
        for options in all_options:
            try:
                return pa_json.read_json(pa.BufferReader(block), parse_options=options).cast(target)
            except pa.ArrowInvalid as e:
                error = error or e
        raise error  # type: ignore[misc]

    def parse(lo: int, hi: int) -> None:
        try:
            table = parse_block(lo, hi)
        except pa.ArrowInvalid as e:
            if hi - lo == 1:
                report.add_bad_line(path, lo + 1, _short_arrow_error(e))
                report.check_bad_lines()  # fail early instead of bisecting a file of garbage
                return
            mid = (lo + hi) // 2
            parse(lo, mid)
            parse(mid, hi)
            return
        tables.append(table)
        kept_numbers.append(np.array([i + 1 for i in range(lo, hi) if lines[i].strip()], dtype=np.int64))

    for start in range(0, len(lines), _BLOCK_LINES):
        parse(start, min(start + _BLOCK_LINES, len(lines)))
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables) if tables else target.empty_table()
    numbers = np.concatenate(kept_numbers) if kept_numbers else np.zeros(0, dtype=np.int64)
    return table, numbers


def _short_arrow_error(e: Exception) -> str:
    return str(e).replace("JSON parse error: ", "invalid JSON: ").split(" in row ")[0]


def read_python_literal_lines(path: Path, report: LoadReport) -> list[dict[str, Any]]:
    """Lines of Python dict literals (Amazon 2014 metadata), parsed with ``ast.literal_eval``, never eval."""
    records = []
    text = read_bytes(path).decode("utf-8", errors="replace")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            report.add_bad_line(path, number, f"not a Python literal ({type(e).__name__})")
            report.check_bad_lines()
            continue
        if not isinstance(value, dict):
            report.add_bad_line(path, number, f"expected a dict literal, got {type(value).__name__}")
            report.check_bad_lines()
            continue
        records.append(value)
    return records


# ---------------------------------------------------------------------------------------------- value helpers
def parse_price(values: pd.Series) -> pd.Series:
    """Prices as float64: numbers pass; strings like "$1,299.99" or "$5.99 - $9.99" give the first number."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64")
    text = values.astype("string")
    number = text.str.extract(r"(\d[\d,]*\.?\d*)", expand=False).str.replace(",", "", regex=False)
    return pd.to_numeric(number, errors="coerce").astype("float64")


def as_category_lists(values: pd.Series, separator: str | None = None) -> pd.Series:
    """Categories as lists of non-empty str: from lists, lists of lists (flattened), or joined strings."""

    def convert(v: Any) -> list[str]:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return []
        if isinstance(v, str):
            parts = v.split(separator) if separator else [v]
            return [p.strip() for p in parts if p.strip()]
        out: list[str] = []
        for x in v:
            out.extend(convert(x))
        # Keep the first occurrence of each category, in order (Amazon 2014 repeats the root in every path).
        return list(dict.fromkeys(out))

    # One call per *distinct* value: items are far fewer than interactions, and values repeat a lot.
    return values.map(convert)


def as_int64(numbers: pd.Series, what: str, path: str | Path, first_row: int = 1) -> pd.Series:
    """Whole numbers read from a file (``pd.to_numeric`` output: int, uint, float or object) as int64. A
    value outside int64 (2^63 and up, as text or as a float) would wrap to a negative number under a bare
    ``astype``: it is a ``DataLoadError`` naming ``path``, the row (``first_row``: the file line of row 0)
    and ``what``."""
    values = numbers.to_numpy()
    if values.dtype.kind == "u":
        outside = values > np.iinfo(np.int64).max
    elif values.dtype.kind == "f":
        outside = (values >= 2.0**63) | (values < -(2.0**63))
    elif values.dtype.kind == "O":
        outside = np.array([not -(2**63) <= int(v) < 2**63 for v in values], dtype=bool)
    else:
        outside = np.zeros(len(values), dtype=bool)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DataLoadError(
            f"{path}: row {row + first_row}: {what} holds {values[row]}, outside the 64-bit integer range "
            f"[-2^63, 2^63)"
        )
    return numbers.astype("int64")


def to_unix_seconds(dates: pd.Series) -> pd.Series:
    """Parsed datetimes as int64 Unix seconds (0 where missing), whatever their resolution (pandas 3: us)."""
    seconds = (dates - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    return seconds.fillna(0).astype("int64")


def take_strings(vocabulary: np.ndarray | list[str], codes: np.ndarray) -> pd.Series:
    """``vocabulary[codes]`` as a pandas str Series, gathered in Arrow (~30x faster than Python objects)"""
    return pa.array(np.asarray(vocabulary, dtype=object), pa.string()).take(pa.array(codes)).to_pandas()
