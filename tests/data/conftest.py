"""Tiny deterministic fixtures for the dataset layer, written in each source's real format, and an independent
(pure Python, set-based) k-core filter to check counts against."""

from __future__ import annotations

import gzip
import json
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
ML100K_RECBOLE = SHARED / "data" / "ml-100k"

CATEGORIES = ["Books", "Toys", "Garden"]


def make_rows(seed: int = 0, num_users: int = 14, num_items: int = 9) -> list[tuple[str, str, float, int]]:
    """(user, item, rating, timestamp) rows: a dense core plus sparse users/items that a 4-core must drop,
    including one user who only falls below 4 after a sparse item is dropped (needs a second round)."""
    rng = np.random.default_rng(seed)
    rows = []
    t = 1_400_000_000
    for u in range(num_users):
        for i in range(num_items):
            if rng.random() < 0.6:
                t += int(rng.integers(1, 10_000))
                rows.append((f"U{u}", f"A{i:03d}", float(rng.integers(1, 6)), t))
    rows += [("Usparse", "A000", 5.0, t + 1), ("Usparse", "A001", 2.0, t + 2)]  # 2 interactions: dropped
    rows += [(f"U{u}", "Arare", 4.0, t + 10 + u) for u in range(2)]  # an item with 2 interactions: dropped
    # A user with exactly 4 interactions, one of them on the rare item: survives round 1, dropped in round 2.
    rows += [("Uchain", "Arare", 5.0, t + 20)] + [("Uchain", f"A00{i}", 4.0, t + 21 + i) for i in range(3)]
    return rows


def reference_kcore(rows, min_user: int = 4, min_item: int = 4):
    """Iterative k-core with sets and Counters, independent of the numpy implementation."""
    kept = list(dict.fromkeys((u, i) for u, i, *_ in rows).keys())  # de-duplicated pairs
    while True:
        users = Counter(u for u, _ in kept)
        items = Counter(i for _, i in kept)
        new = [(u, i) for u, i in kept if users[u] >= min_user and items[i] >= min_item]
        if len(new) == len(kept):
            return new
        kept = new


def item_meta(item: str) -> dict:
    index = int(item[1:]) if item[1:].isdigit() else 99
    return {
        "asin": item,
        "title": f"Thing number {index}",
        "category": [CATEGORIES[index % 3], "All"],
        "brand": f"Brand{index % 2}",
        "price": f"${index + 0.5:.2f}",
    }


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_amazon_2018(folder: Path, rows, gz: bool = True) -> tuple[Path, Path]:
    suffix = ".json.gz" if gz else ".json"
    reviews = [
        json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t,
                    "reviewText": f"text {u} {i}",
                    "verified": True, "style": {"Format:": " Paperback"}})
        for u, i, r, t in rows
    ]  # fmt: skip
    items = sorted({i for _, i, *_ in rows})
    meta = [json.dumps(item_meta(i)) for i in items if i != "A002"]  # A002 has no metadata at all
    return (
        write_lines(folder / f"Books{suffix}", reviews, gz),
        write_lines(folder / f"meta_Books{suffix}", meta, gz),
    )


def write_amazon_2014(folder: Path, rows, gz: bool = True) -> tuple[Path, Path]:
    suffix = ".json.gz" if gz else ".json"
    reviews = [
        json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "reviewText": "ok",
                    "summary": "s", "helpful": [0, 0], "reviewTime": "01 1, 2014"})
        for u, i, r, t in rows
    ]  # fmt: skip
    meta = []
    for i in sorted({i for _, i, *_ in rows}):
        m = item_meta(i)
        record = {
            "asin": i,
            "categories": [[m["category"][0], "Sub"], [m["category"][0]]],
            "salesRank": {"Books": 3},
        }
        if i != "A001":  # A001 lacks title and price: tolerated and counted
            record.update(
                title=m["title"], price=float(i[1:]) + 0.5 if i[1:].isdigit() else 1.0, brand=m["brand"]
            )
        meta.append(repr(record))  # Python dict literal, single quotes
    return (
        write_lines(folder / f"reviews_Books{suffix}", reviews, gz),
        write_lines(folder / f"meta_Books{suffix}", meta, gz),
    )


@pytest.fixture
def rows():
    return make_rows()


@pytest.fixture(scope="session")
def fx() -> types.SimpleNamespace:
    """The writers and the reference filter above, for tests (conftest modules are not importable by name)."""
    return types.SimpleNamespace(
        make_rows=make_rows, reference_kcore=reference_kcore, item_meta=item_meta, write_lines=write_lines,
        write_amazon_2018=write_amazon_2018, write_amazon_2014=write_amazon_2014,
    )  # fmt: skip


@pytest.fixture
def ml100k_recbole() -> Path:
    if not (ML100K_RECBOLE / "ml-100k.inter").is_file():
        pytest.skip(f"shared MovieLens-100K (RecBole format) not found at {ML100K_RECBOLE}")
    return ML100K_RECBOLE
