"""``userip compare --config FILE``: rows of several experiments on the same data in one paired table
(``userip.evaluation.compare``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from userip.utils.config import add_set_argument, from_dict, read_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="compare YAML (see configs/compare_*.yaml)"
    )
    add_set_argument(parser, "reference='no LM'")


def run(args: argparse.Namespace) -> int:
    from userip.evaluation.compare import CompareConfig, compare

    config = from_dict(CompareConfig, read_config(args.config, {}, args.set), str(args.config))
    out = compare(config)
    print(out["markdown"])
    print(f"\ntables in {config.out_dir} (compare.md, compare.csv)")
    return 0
