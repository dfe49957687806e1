"""``userip train``: train one CTR model on a run directory and report AUC / Logloss on valid and test.

    userip train --model dcn --run-dir RUN [--with-profiles] [--bank PATH] [--model-config YAML] [--seed N]
                 [--epochs N] [--batch-size N] [--lr F] [--user-features a,b] [--threads N] [--no-progress]
    torchrun --nproc_per_node N -m userip.cli train ... [--distributed]    # DistributedDataParallel

Prints a Markdown table and writes ``RUN/ctr/<model>[+profiles]/`` (see ``userip.ctr.recipe``); logs go to
``RUN/logs/train.log`` (rank r > 0 of a distributed run: ``train.rank<r>.log``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from userip.utils.config import ConfigError, add_set_argument, from_dict, load_yaml, merge_cli_values
from userip.utils.run_layout import RunLayout

if TYPE_CHECKING:
    from userip.ctr.recipe import CTRResult

# The model-config YAML may hold model keyword arguments at the top level, or split into two sections.
_SECTIONS = ("model", "trainer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dcn", help="CTR model name (registry key, e.g. dcn)")
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory holding data/ (and bank/)")
    parser.add_argument(
        "--with-profiles", action="store_true", help="add the feature bank's profile-ID fields"
    )
    parser.add_argument("--bank", type=Path, default=None, help="feature bank path (default RUN/bank)")
    parser.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="YAML: model keyword arguments, or sections `model:` and `trainer:` (CTRTrainerConfig keys)",
    )
    add_set_argument(parser, "trainer.patience=3 (sections model and trainer, as in --model-config)")
    parser.add_argument("--seed", type=int, default=None, help="seed for init, shuffling and dropout")
    parser.add_argument(
        "--epochs", type=int, default=None, help="maximum epochs (early stopping on valid AUC)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument(
        "--user-features", default="", help="comma-separated observable user columns, e.g. age,gender"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="DistributedDataParallel over torch.distributed ranks (implied under torchrun with "
        "WORLD_SIZE > 1): torchrun --nproc_per_node N -m userip.cli train ...; --batch-size is the "
        "global batch; gloo on CPU, NCCL on CUDA",
    )


def _read_model_config(path: Path | None) -> tuple[dict, dict]:
    if path is None:
        return {}, {}
    data = load_yaml(path)
    if set(data) & set(_SECTIONS):
        extra = sorted(set(data) - set(_SECTIONS))
        if extra:
            raise ConfigError(
                f"{path}: with sections {list(_SECTIONS)}, other top-level keys {extra} are not allowed"
            )
        return dict(data.get("model") or {}), dict(data.get("trainer") or {})
    return data, {}


def _run_distributed(run_dir: Path, model: str, options: dict[str, Any]) -> CTRResult | None:
    """Train on every rank; rank 0's result (None on the others). Errors propagate to ``userip.cli`` as named
    errors (``userip train: error: DistributedError: ...``, exit code 2) on every rank."""
    from userip.ctr.distributed import local_batch_size, train_ctr_distributed
    from userip.utils.distributed import init_distributed, launcher_world_size, shutdown

    # Before joining the process group, so every rank refuses on its own and none waits for the others.
    local_batch_size(options["config"].batch_size, launcher_world_size())
    ctx = init_distributed(options["config"].device)
    try:
        result = train_ctr_distributed(run_dir, model, ctx=ctx, **options)
    finally:
        shutdown()
    return result if ctx.is_main else None


def results_table(valid: dict[str, float] | None, test: dict[str, float]) -> str:
    rows = [("valid", valid), ("test", test)]
    lines = ["| split | AUC | Logloss |", "|---|---|---|"]
    lines += [f"| {name} | {m['auc']:.4f} | {m['logloss']:.4f} |" for name, m in rows if m is not None]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from userip.ctr.models import check_model_config, model_section
    from userip.ctr.recipe import output_name, train_ctr  # heavy imports only when the command runs
    from userip.ctr.trainer import CTRTrainerConfig
    from userip.utils.distributed import distributed_requested, rank_log_file
    from userip.utils.logging import setup_logging

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    if args.bank is not None and not args.with_profiles:
        raise ConfigError("--bank needs --with-profiles")
    user_features = [c.strip() for c in args.user_features.split(",") if c.strip()]
    distributed = distributed_requested(bool(getattr(args, "distributed", False)))
    setup_logging(rank_log_file(RunLayout(run_dir).logs, "train", distributed))
    model_config, trainer_dict = _read_model_config(args.model_config)
    trainer_dict.setdefault("progress", True)
    flags = {
        "trainer.max_epochs": args.epochs,
        "trainer.batch_size": args.batch_size,
        "trainer.lr": args.lr,
        "trainer.num_threads": args.threads,
        "trainer.progress": False if args.no_progress else None,
    }
    # configs/ctr_models.yaml holds one section per model: pick this model's (flat mappings pass through).
    data = {"model": model_section(model_config, args.model), "trainer": trainer_dict}
    data = merge_cli_values(data, flags, args.set)
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"--set: unknown section(s) {unknown}; accepted: {list(_SECTIONS)}")
    where = f"{args.model_config}:trainer" if args.model_config else "trainer options"
    config = from_dict(CTRTrainerConfig, data["trainer"], where)
    check_model_config(args.model, data["model"], str(args.model_config or "model options"))
    options = {
        "with_profiles": args.with_profiles,
        "bank": args.bank,
        "user_features": user_features,
        "model_config": data["model"],
        "config": config,
        "seed": args.seed,
    }
    if not distributed:
        result = train_ctr(run_dir, args.model, **options)
    else:
        result = _run_distributed(run_dir, args.model, options)
        if result is None:  # ranks > 0 print nothing
            return 0
    name = output_name(args.model, args.with_profiles)
    print(f"{name} (best epoch {result.fit.best_epoch}, seed {result.seed})")
    print(results_table(result.valid, result.test))
    print(f"wrote {result.output_dir}")
    return 0


__all__ = ["add_arguments", "results_table", "run"]
