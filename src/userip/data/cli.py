"""``userip prepare``: load a source, label, filter, split; write Parquet tables + manifest into RUN/data."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from userip.data.prepare import SOURCES, prepare_to_run_dir, source_options_class, statistics_table
from userip.data.preprocess import PrepareConfig, SplitMode
from userip.utils.config import ConfigError, add_set_argument, apply_overrides, from_dict, load_yaml
from userip.utils.logging import setup_logging
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)

# Command-line flag -> source option it sets (only sources whose options have that field accept it).
SOURCE_FLAGS = {
    "path": "--path",
    "reviews": "--reviews",
    "meta": "--meta",
    "items": "--items",
    "max_bad_lines": "--max-bad-lines",
    "num_users": "--num-users",
    "num_items": "--num-items",
}
CONFIG_KEYS = ("source", "source_options", "prepare")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=sorted(SOURCES), help="data source (or `source:` in --config)")
    parser.add_argument("--path", help="source folder or file")
    parser.add_argument("--reviews", help="Amazon reviews file (JSON lines, .gz ok)")
    parser.add_argument("--meta", help="Amazon meta file (2014 Python literals or 2018 JSON lines, .gz ok)")
    parser.add_argument("--items", help="items table for --source csv or implicit (CSV or Parquet)")
    parser.add_argument("--max-bad-lines", type=int, help="malformed lines tolerated before the load fails")
    parser.add_argument("--num-users", type=int, help="synthetic: number of users")
    parser.add_argument("--num-items", type=int, help="synthetic: number of items")
    parser.add_argument("--out", required=True, help="run directory; the dataset goes to OUT/data")
    parser.add_argument(
        "--config", help="YAML with `source`, `source_options` and `prepare` (PrepareConfig) keys"
    )
    parser.add_argument("--seed", type=int, help="split seed (and synthetic generator seed)")
    parser.add_argument(
        "--split",
        choices=[m.value for m in SplitMode],
        help="random (8:1:1), time, source, or per user in order: leave_last_out, user_ordered (8:1:1)",
    )
    parser.add_argument("--label-threshold", type=float, help="label = rating > threshold (default 3)")
    parser.add_argument(
        "--negatives-per-positive",
        type=int,
        help="implicit sources: sampled negatives (label 0) per observed interaction (required there)",
    )
    add_set_argument(parser, "prepare.min_user_interactions=5")


def resolve(args: argparse.Namespace) -> tuple[str, dict[str, Any], PrepareConfig]:
    """Merge --config and flags (flags win) into (source, source options, PrepareConfig), validating both."""
    file_cfg: dict[str, Any] = load_yaml(args.config) if args.config else {}
    unknown = sorted(set(file_cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{args.config}: unknown top-level key(s) {unknown}; accepted: {list(CONFIG_KEYS)}")
    source = args.source or file_cfg.get("source")
    if source is None:
        raise ConfigError("no source: give --source or `source:` in --config")
    options_cls = source_options_class(source)
    accepted = {f.name for f in dataclasses.fields(options_cls)}
    options = dict(_section(file_cfg, "source_options", args.config))
    for key, flag in SOURCE_FLAGS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key not in accepted:
            raise ConfigError(f"{flag} does not apply to --source {source} (its options: {sorted(accepted)})")
        options[key] = value
    prepare_dict = dict(_section(file_cfg, "prepare", args.config))
    if args.seed is not None:
        prepare_dict["seed"] = args.seed
        if "seed" in accepted:
            options["seed"] = args.seed
    if args.split is not None:
        prepare_dict["split"] = args.split
    if args.label_threshold is not None:
        prepare_dict["label_threshold"] = args.label_threshold
    if args.negatives_per_positive is not None:
        prepare_dict["negatives_per_positive"] = args.negatives_per_positive
    # --set goes last, as in every command with a config (file, then flags, then --set).
    merged = apply_overrides({"source_options": options, "prepare": prepare_dict}, args.set)
    unknown = sorted(set(merged) - {"source_options", "prepare"})
    if unknown:
        raise ConfigError(f"--set: unknown section(s) {unknown}; accepted: ['prepare', 'source_options']")
    options, prepare_dict = merged["source_options"], merged["prepare"]  # the source checks its options
    config = from_dict(PrepareConfig, prepare_dict, where="prepare")
    return source, options, config


def _section(file_cfg: dict[str, Any], key: str, path: Any) -> dict[str, Any]:
    """The mapping ``key`` of a prepare config (empty when absent); a list or value there is named."""
    value = file_cfg.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{path}: {key}: expected a mapping (key: value), got {type(value).__name__} {value!r}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    setup_logging(RunLayout(out).logs / "prepare.log")
    source, options, config = resolve(args)  # errors are reported by userip.cli.main: one line, exit 2
    dataset = prepare_to_run_dir(out, source, options, config, show_progress=True)
    print(f"Prepared {source} dataset (content hash {dataset.content_hash}) in {out / 'data'}\n")
    print(statistics_table(dataset.statistics()))
    return 0
