"""Amazon review data, 2014 (McAuley et al.) and 2018 (Ni et al.) releases.

reviews  JSON lines, both years: reviewerID, asin, overall (1-5), unixReviewTime, reviewText, summary, ...
meta     2014: one Python dict literal per line (single quotes; parsed with ``ast.literal_eval``, never eval):
         asin, title, categories (list of category paths), brand, price (float)
         2018: JSON lines: asin, title, category (list), brand, price (string such as "$12.99", or "")
The meta format is detected from its first line unless ``meta_format`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

from userip.data.sources.base import (
    DataLoadError,
    LoadReport,
    RawData,
    as_category_lists,
    parse_price,
    read_bytes,
    read_json_lines,
    read_python_literal_lines,
    require_file,
)


class MetaFormat(enum.Enum):
    AUTO = "auto"
    JSON = "json"  # 2018
    PYTHON = "python"  # 2014: Python dict literals


@dataclasses.dataclass
class AmazonConfig:
    path: str | None = (
        None  # a folder holding one reviews file and one meta_* file (used when reviews is unset)
    )
    reviews: str | None = None
    meta: str | None = None  # optional: without it items have no titles (counted as missing)
    meta_format: MetaFormat = MetaFormat.AUTO
    max_bad_lines: int = 100
    keep_reviews: bool = True  # keep review text (the `review` target mode of profile inference needs it)

    def __post_init__(self) -> None:
        self.meta_format = MetaFormat(self.meta_format)
        if self.path is None and self.reviews is None:
            raise ValueError("amazon: give --reviews FILE (and --meta FILE) or --path DIR")
        if self.max_bad_lines < 0:
            raise ValueError(f"max_bad_lines must be >= 0, got {self.max_bad_lines}")


REVIEW_SCHEMA = pa.schema(
    [
        ("reviewerID", pa.string()),
        ("asin", pa.string()),
        ("overall", pa.float64()),
        ("unixReviewTime", pa.int64()),
        ("reviewText", pa.string()),
    ]
)
_META_FIELDS = [
    ("asin", pa.string()),
    ("title", pa.string()),
    ("brand", pa.string()),
    ("category", pa.list_(pa.string())),  # 2018
    ("categories", pa.list_(pa.list_(pa.string()))),  # 2014 layout, if someone wrote it as JSON
]
# Price is a string in 2018 files and a number in JSON conversions of 2014 files: try both.
META_SCHEMAS = [pa.schema([*_META_FIELDS, ("price", t)]) for t in (pa.string(), pa.float64())]


def _locate_files(cfg: AmazonConfig) -> tuple[Path, Path | None]:
    if cfg.reviews is not None:
        meta = require_file(cfg.meta, "Amazon meta file") if cfg.meta is not None else None
        return require_file(cfg.reviews, "Amazon reviews file"), meta
    folder = Path(cfg.path)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise DataLoadError(f"{folder}: folder not found (expected an Amazon reviews file and a meta_* file)")
    files = sorted(
        p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz"))
    )
    metas = [p for p in files if p.name.startswith("meta")]
    reviews = [p for p in files if not p.name.startswith("meta")]
    if len(reviews) != 1 or len(metas) > 1:
        raise DataLoadError(
            f"{folder}: expected exactly one reviews file and at most one meta_* file, found reviews="
            f"{[p.name for p in reviews]} meta={[p.name for p in metas]}; name them with --reviews/--meta"
        )
    meta = require_file(cfg.meta, "Amazon meta file") if cfg.meta else (metas[0] if metas else None)
    return reviews[0], meta


def _detect_meta_format(path: Path) -> MetaFormat:
    data = read_bytes(path)
    first = next((ln for ln in data.split(b"\n", 50) if ln.strip()), b"")
    try:
        json.loads(first)
        return MetaFormat.JSON
    except ValueError:
        return MetaFormat.PYTHON


def _read_meta(path: Path, meta_format: MetaFormat, report: LoadReport) -> pd.DataFrame:
    if meta_format is MetaFormat.AUTO:
        meta_format = _detect_meta_format(path)
    if meta_format is MetaFormat.JSON:
        meta = read_json_lines(path, META_SCHEMAS, report, required=("asin",))
    else:
        records = read_python_literal_lines(path, report)
        meta = pd.DataFrame.from_records(records)
        for name, _ in [*_META_FIELDS, ("price", None)]:
            if name not in meta.columns:
                meta[name] = None
        missing_asin = meta["asin"].isna()
        if missing_asin.any():
            report.note(f"{path}: {int(missing_asin.sum())} meta record(s) without 'asin' skipped")
            meta = meta[~missing_asin]
    # 2018 has `category` (a list); 2014 has `categories` (a list of paths): use whichever the record has.
    categories = meta["category"].where(meta["category"].notna(), meta["categories"])
    items = pd.DataFrame(
        {
            "raw_item_id": meta["asin"].astype(str),
            "title": meta["title"].fillna("").astype(str),
            "categories": as_category_lists(categories),
            "brand": meta["brand"].fillna("").astype(str),
            "price": parse_price(meta["price"]),
        }
    )
    return items.drop_duplicates("raw_item_id", keep="first").reset_index(drop=True)


def load_amazon(cfg: AmazonConfig) -> RawData:
    report = LoadReport(max_bad_lines=cfg.max_bad_lines)
    reviews_path, meta_path = _locate_files(cfg)
    reviews = read_json_lines(reviews_path, REVIEW_SCHEMA, report, required=("reviewerID", "asin", "overall"))
    interactions = pd.DataFrame(
        {
            "raw_user_id": reviews["reviewerID"],
            "raw_item_id": reviews["asin"],
            "rating": reviews["overall"].astype("float64"),
            "timestamp": reviews["unixReviewTime"].fillna(0).astype("int64"),
        }
    )
    if cfg.keep_reviews:
        interactions["review"] = reviews["reviewText"].fillna("")
    if meta_path is None:
        report.note(f"{reviews_path}: no meta file; items get no titles, categories, brands or prices")
        items = None
    else:
        items = _read_meta(meta_path, cfg.meta_format, report)
    return RawData(interactions=interactions, items=items, report=report)
