"""``userip experiment --config FILE``: the paper's tables and figures over seeds (resumable).

Like ``userip run``: the terminal gets a progress bar per stage (prepare, profile when its config asks for
one, trainer search, experiment cells), warnings, errors and the tables; every INFO record (each CTR epoch,
each cell) is in ``OUT/experiment.log``. ``--verbose`` prints those on the terminal too.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from userip.utils.config import add_set_argument, from_dict, read_config

LOG_FILE = "experiment.log"  # under the experiment's output folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="experiment YAML (see configs/experiment_*.yaml)"
    )
    parser.add_argument("--seeds", help="override: comma-separated seeds")
    parser.add_argument("--out-dir", type=Path, help="override: where cells, tables and plots go")
    add_set_argument(parser, "pepler.lm_device=cuda")
    parser.add_argument(
        "--rows",
        help="compute only these rows' cells (comma-separated variants: base, userip, hobby9_retrain, kar, "
        "pepler, ...) and no tables; copy their OUT/cells (and RUN/profiles for retrained sizes) into one "
        "folder and rerun without --rows for the tables",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="compute nothing: write the tables from the cells that exist (rows short of seeds say so)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every INFO record (each CTR epoch, each cell) on the terminal too; OUT/experiment.log "
        "always has them",
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
    log_file = config.output_dir / LOG_FILE
    setup_logging(log_file, console_level=logging.INFO if args.verbose else logging.WARNING)
    print(f"userip experiment: output under {config.output_dir}, details in {log_file}", flush=True)
    start = time.perf_counter()
    out = run_experiment(config, rows, args.finished_only)
    print()
    print(out["markdown"])
    print(f"done in {time.perf_counter() - start:.0f} s; tables, CSV/JSON and plots in {config.output_dir}")
    print(f"  log: {log_file}")
    return 0
