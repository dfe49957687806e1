"""Preparation throughput on a generated Amazon-2018 file of 1,000,000 reviews (parse, filter, split, write).

Writes ``Books.json.gz`` (reviews, JSON lines with the real 2018 fields) and ``meta_Books.json.gz`` into a
work folder, then times ``userip prepare``'s three phases in this process: parse (load_source), preprocess
(label, de-duplicate, 4-core filter, re-index, split, hints) and write (Parquet + manifest). As a reference
measured in the same process, it times the naive loader (``json.loads`` per line) on a 100,000-line sample
and extrapolates.
Target: under 15 s in total on the project's 2-core machine.

    python bench/bench_data.py [--num-reviews 1000000] [--workdir DIR] [--plain]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.prepare import load_source
from userip.data.preprocess import PrepareConfig, build_dataset
from userip.utils.config import to_dict

# fmt: off
WORDS = np.array([
    "great", "good", "bad", "fine", "love", "hate", "book", "story", "read", "author", "plot", "characters",
    "slow", "fast", "ending", "boring", "classic", "recommend", "gift", "price", "quality", "paper", "cover",
    "pages", "writing", "style", "series", "first", "second", "worth",
], dtype=object)
# fmt: on


def generate_amazon_2018(folder: Path, num_reviews: int, gz: bool, seed: int = 0) -> tuple[Path, Path]:
    """Reviews by lognormal-active users on Zipf-popular items; the real 2018 field set, ~10 words of text."""
    rng = np.random.default_rng(seed)
    num_items = max(num_reviews // 30, 10)
    counts = np.maximum(np.rint(rng.lognormal(np.log(8), 0.9, num_reviews)).astype(np.int64), 1)
    counts = counts[: np.searchsorted(np.cumsum(counts), num_reviews) + 1]
    users = np.repeat(np.arange(len(counts)), counts)[:num_reviews]
    items = (rng.zipf(1.3, num_reviews) - 1) % num_items
    text = WORDS[rng.integers(0, len(WORDS), (num_reviews, 10))]
    reviews = pd.DataFrame(
        {
            "overall": rng.integers(1, 6, num_reviews).astype(float),
            "verified": rng.random(num_reviews) < 0.8,
            "reviewTime": "06 2, 2016",
            "reviewerID": pd.Series(users).map("A{:013d}".format),
            "asin": pd.Series(items).map("{:010d}".format),
            "style": [{"Format:": " Paperback"}] * num_reviews,
            "reviewerName": "Reader",
            "reviewText": pd.Series([" ".join(row) for row in text]),
            "summary": "Five Stars",
            "unixReviewTime": 1_300_000_000 + rng.integers(0, 200_000_000, num_reviews),
        }
    )
    meta = pd.DataFrame(
        {
            "category": [
                ["Books", "Literature & Fiction", ["Romance", "Mystery", "Sci-Fi"][k % 3]]
                for k in range(num_items)
            ],
            "title": [f"Book title {k}" for k in range(num_items)],
            "brand": [f"Publisher {k % 500}" for k in range(num_items)],
            "price": [f"${(k % 40) + 4.99:.2f}" if k % 7 else "" for k in range(num_items)],
            "asin": [f"{k:010d}" for k in range(num_items)],
        }
    )
    suffix = ".json.gz" if gz else ".json"
    paths = folder / f"Books{suffix}", folder / f"meta_Books{suffix}"
    for frame, path in zip((reviews, meta), paths):
        text = frame.to_json(orient="records", lines=True)
        if gz:
            with gzip.open(path, "wt", compresslevel=1, encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
    return paths


def naive_parse_seconds(path: Path, sample_lines: int, total_lines: int) -> float:
    """Reference: json.loads per line + DataFrame, on a sample, extrapolated to the whole file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(sample_lines)]
    start = time.perf_counter()
    records = [json.loads(line) for line in lines]
    pd.DataFrame.from_records(
        records, columns=["reviewerID", "asin", "overall", "unixReviewTime", "reviewText"]
    )
    return (time.perf_counter() - start) * total_lines / sample_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-reviews", type=int, default=1_000_000)
    parser.add_argument(
        "--workdir", help="where to write the generated files and the run (default: a temp dir)"
    )
    parser.add_argument("--plain", action="store_true", help="write uncompressed .json instead of .json.gz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        reviews, meta = generate_amazon_2018(folder, args.num_reviews, gz=not args.plain)
        print(f"generated {args.num_reviews:,} reviews ({reviews.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s: {reviews}")  # fmt: skip

        cpu_start, start = time.process_time(), time.perf_counter()
        raw, source_cfg = load_source("amazon", {"reviews": str(reviews), "meta": str(meta)})
        parsed = time.perf_counter()
        dataset = build_dataset(raw, PrepareConfig(), "amazon", to_dict(source_cfg))
        preprocessed = time.perf_counter()
        dataset.save(folder / "run" / "data")
        written = time.perf_counter()
        # CPU seconds of all threads: on a shared machine wall time also counts other processes' load.
        cpu = time.process_time() - cpu_start

        total = written - start
        naive = naive_parse_seconds(reviews, min(100_000, args.num_reviews), args.num_reviews)
        parse_s = parsed - start
        stats = dataset.statistics()
        print(f"parse      {parse_s:6.2f} s  ({args.num_reviews / parse_s:,.0f} reviews/s)")
        print(f"preprocess {preprocessed - parsed:6.2f} s  (label, dedupe, 4-core, re-index, split, hints)")
        print(f"write      {written - preprocessed:6.2f} s  (Parquet + manifest)")
        print(f"total      {total:6.2f} s  ({args.num_reviews / total:,.0f} reviews/s); target < 15 s")
        print(f"CPU time   {cpu:6.2f} s  (all threads; load average now {os.getloadavg()[0]:.1f})")
        print(
            f"reference: json.loads per line would take ~{naive:.1f} s to parse alone "
            f"({naive / parse_s:.1f}x)"
        )
        print(f"after filtering: {stats['interactions']:,} interactions, {stats['users']:,} users, "
              f"{stats['items']:,} items, sparsity {stats['sparsity_pct']:.4f}%")  # fmt: skip
        print(
            f"RESULT reviews={args.num_reviews} total_s={total:.2f} "
            f"reviews_per_s={args.num_reviews / total:.0f} cpu_s={cpu:.2f} parse_s={parse_s:.2f} "
            f"preprocess_s={preprocessed - parsed:.2f} write_s={written - preprocessed:.2f} "
            f"parse_speedup_vs_json_loads={naive / parse_s:.1f} kept_interactions={stats['interactions']} "
            f"under_15s={str(total < 15).lower()}"
        )


if __name__ == "__main__":
    main()
