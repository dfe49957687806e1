"""``userip explain``: the vocabulary words nearest to users' learned soft tokens (paper Table 5)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, type=Path, help="a run after `userip profile`")
    parser.add_argument("--users", help="comma-separated raw user ids (default: the first --limit users)")
    parser.add_argument("--limit", type=int, default=10, help="how many users when --users is not given")
    parser.add_argument("-k", type=int, default=5, help="nearest words per profile")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")


def run(args: argparse.Namespace) -> int:
    from userip.evaluation.explain import explain_run

    users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
    try:
        rows = explain_run(args.run_dir, users, k=args.k, limit=args.limit)
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"userip explain: {e}")
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    profiles = [key for key in rows[0] if key not in ("raw_user_id", "truth")] if rows else []
    print("| user | " + " | ".join(f"{p} (ID: nearest words)" for p in profiles) + " |")
    print("|---|" + "---|" * len(profiles))
    for row in rows:
        cells = [f"{row[p]['code']}: " + ", ".join(w for w, _ in row[p]["nearest"]) for p in profiles]
        print(f"| {row['raw_user_id']} | " + " | ".join(cells) + " |")
    return 0
