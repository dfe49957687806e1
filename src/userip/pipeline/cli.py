"""``userip run``: the whole pipeline on the embedded default (or a config), printing the result table.

The terminal gets a progress bar per stage, warnings, errors and the summary; every detail (each CTR epoch,
each profile log step) is in ``RUN/logs/run.log``. ``--verbose`` prints those INFO records on the terminal
too.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from userip.utils.config import ConfigError, apply_overrides, from_dict, load_yaml
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML of PipelineConfig (default: the embedded default)")
    parser.add_argument("--run-dir", type=Path, help="where artifacts go (default: runs/default)")
    parser.add_argument(
        "--lm",
        help="'offline' (default), 'random', 'smollm2', a .gguf file, a model folder, or a HF name (gpt2)",
    )
    parser.add_argument("--seeds", help="comma-separated CTR seeds, e.g. 0,1,2,3,4")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key, value read as YAML (repeatable): --set profile.train.num_epochs=5",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every INFO record (each CTR epoch) on the terminal too; RUN/logs/run.log always has them",
    )


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2], with an error naming the flag."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def build_config(args: argparse.Namespace):
    from userip.pipeline.run import PipelineConfig

    data = load_yaml(args.config) if args.config else {}
    if args.run_dir is not None:
        data["run_dir"] = str(args.run_dir)
    if args.lm is not None:
        data.setdefault("profile", {}).setdefault("lm", {})["name_or_path"] = args.lm
    if args.seeds is not None:
        data["seeds"] = parse_seeds(args.seeds)
    data = apply_overrides(data, args.set)
    return from_dict(PipelineConfig, data, str(args.config or "run config"))


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    run_dir = Path(config.run_dir)
    from userip.pipeline.run import run_pipeline

    layout = RunLayout(run_dir)
    print(f"userip run: artifacts under {run_dir}, details in {layout.log_file}", flush=True)
    start = time.perf_counter()
    try:
        summary = run_pipeline(config, verbose=args.verbose)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    print()
    print(summary["markdown"])
    print(f"done in {time.perf_counter() - start:.0f} s; artifacts under {run_dir.resolve()}")
    print(f"  summary: {layout.results / 'summary.md'}  log: {layout.log_file}")
    return 0
