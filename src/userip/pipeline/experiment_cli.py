"""``userip experiment --config FILE``: the paper's tables and figures over seeds (resumable)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from userip.utils.config import add_set_argument, from_dict, read_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="experiment YAML (see configs/experiment_*.yaml)"
    )
    parser.add_argument("--seeds", help="override: comma-separated seeds")
    parser.add_argument("--out-dir", type=Path, help="override: where cells, tables and plots go")
    add_set_argument(parser, "pepler.lm_device=cuda")
    parser.add_argument(
        "--rows",
        help="compute only these rows' cells (comma-separated variants: base, userip, kar, pepler, rella, "
        "...) and no tables; copy their OUT/cells into one folder and rerun without --rows for the tables",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="compute nothing: write the tables from the cells that exist (rows short of seeds say so)",
    )


def run(args: argparse.Namespace) -> int:
    from userip.pipeline.cli import parse_seeds
    from userip.pipeline.experiment import ExperimentConfig, run_experiment
    from userip.utils.logging import setup_logging

    flags = {
        "seeds": parse_seeds(args.seeds) if args.seeds is not None else None,
        "out_dir": str(args.out_dir) if args.out_dir is not None else None,
    }
    config = from_dict(ExperimentConfig, read_config(args.config, flags, args.set), str(args.config))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    setup_logging(config.output_dir / "experiment.log")
    start = time.perf_counter()
    out = run_experiment(config, rows, args.finished_only)
    print(out["markdown"])
    print(f"done in {time.perf_counter() - start:.0f} s; tables, CSV/JSON and plots in {config.output_dir}")
    return 0
