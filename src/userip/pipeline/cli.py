"""``userip run``: the whole pipeline on the embedded default (or a config), printing the result table.

The terminal gets a progress bar per stage, warnings, errors and the summary; every detail (each CTR epoch,
each profile log step) is in ``RUN/logs/run.log``. ``--verbose`` prints those INFO records on the terminal
too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from userip.utils.config import ConfigError, add_set_argument, from_dict, read_config
from userip.utils.run_layout import RunLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML of PipelineConfig (default: the embedded default)")
    parser.add_argument("--run-dir", type=Path, help="where artifacts go (default: runs/default)")
    parser.add_argument(
        "--lm",
        help="'offline' (default), 'random', 'smollm2', a .gguf file, a model folder, a HF name (gpt2), "
        "or 'none' (no LM)",
    )
    parser.add_argument("--seeds", help="comma-separated CTR seeds, e.g. 0,1,2,3,4")
    add_set_argument(parser, "profile.train.num_epochs=5")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every INFO record (each CTR epoch) on the terminal too; RUN/logs/run.log always has them",
    )


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2], with an error naming the flag; an empty list is refused (it would
    leave nothing to train, or silently fall back to the config's seeds)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds: expected at least one integer (e.g. 0,1,2), got {text!r}")
    return seeds


def build_config(args: argparse.Namespace):
    from userip.pipeline.run import PipelineConfig

    flags = {
        "run_dir": None if args.run_dir is None else str(args.run_dir),
        "profile.lm.name_or_path": args.lm,
        "seeds": None if args.seeds is None else parse_seeds(args.seeds),
    }
    data = read_config(args.config, flags, args.set)
    return from_dict(PipelineConfig, data, str(args.config or "run config"))


def run(args: argparse.Namespace) -> int:
    config = build_config(args)  # a bad key or value fails here, before any work
    run_dir = Path(config.run_dir)
    from userip.pipeline.run import run_pipeline

    layout = RunLayout(run_dir)
    print(f"userip run: artifacts under {run_dir}, details in {layout.log_file}", flush=True)
    start = time.perf_counter()
    summary = run_pipeline(config, verbose=args.verbose)
    print()
    print(summary["markdown"])
    print(f"done in {time.perf_counter() - start:.0f} s; artifacts under {run_dir.resolve()}")
    print(f"  summary: {layout.results / 'summary.md'}  log: {layout.log_file}")
    return 0
