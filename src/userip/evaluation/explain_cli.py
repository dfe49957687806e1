"""``userip explain``: the vocabulary words nearest to users' learned soft tokens (paper Table 5), or with
``--attention`` the attention of a sentence's tokens to the profiles before and after tuning (Fig. 7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from userip.utils.config import ConfigError, positive_int_flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, type=Path, help="a run after `userip profile`")
    parser.add_argument("--users", help="comma-separated raw user ids (default: the first --limit users)")
    parser.add_argument(
        "--limit",
        type=positive_int_flag,
        help="users shown when --users is not given (default 10; 7 with --attention, as in Fig. 7)",
    )
    parser.add_argument("-k", type=positive_int_flag, default=5, help="nearest words per profile")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--attention",
        action="store_true",
        help="Fig. 7 instead: attention of a sentence's tokens to each profile, before and after tuning",
    )
    parser.add_argument(
        "--sentence",
        help="with --attention: the sentence (default: the most-interacted training item's title)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="with --attention: PNG path (default RUN/explain/attention.png; CSV beside it)",
    )


def run(args: argparse.Namespace) -> int:
    from userip.evaluation.explain import explain_run

    users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
    if args.attention:
        return _run_attention(args, users)
    try:
        rows = explain_run(args.run_dir, users, k=args.k, limit=10 if args.limit is None else args.limit)
    except KeyError as e:  # unknown --users: reported by userip.cli as a named input error
        raise ConfigError(f"--users: {e.args[0]}") from e
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


def _run_attention(args: argparse.Namespace, users: list[str] | None) -> int:
    import pandas as pd

    from userip.evaluation.attention import explain_attention
    from userip.evaluation.plots import plot_attention
    from userip.utils.io import atomic_write_text

    limit = 7 if args.limit is None else args.limit
    try:
        result = explain_attention(args.run_dir, args.sentence, users, limit=limit)
    except KeyError as e:
        raise ConfigError(f"--users: {e.args[0]}") from e
    png = plot_attention(result, args.out or args.run_dir / "explain" / "attention.png")
    rows = []
    for when, values in (("before", result.before), ("after", result.after)):
        for n, user in enumerate(result.raw_user_ids):
            for p, profile in enumerate(result.profile_names):
                rows.append(
                    {"when": when, "user": user, "profile": profile, **dict(zip(result.tokens, values[n, p]))}
                )
    table = pd.DataFrame(rows)
    atomic_write_text(png.with_suffix(".csv"), table.to_csv(index=False))
    print(f"sentence: {' '.join(result.tokens)}")
    print("| profile | when | " + " | ".join(result.tokens) + " |")
    print("|---|---|" + "---|" * len(result.tokens))
    for (profile, when), group in table.groupby(["profile", "when"], sort=False):
        means = group[result.tokens].mean()
        print(f"| {profile} | {when} | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    print(
        f"mean over {len(result.raw_user_ids)} users, scaled to [0, 1] per user; heat maps in {png}, "
        f"numbers in {png.with_suffix('.csv')}"
    )
    return 0
