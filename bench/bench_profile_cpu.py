"""Wall time of an experiment config's profile stage (e.g. SmolLM2-135M on ML-100K) against a time budget, and
its tokens/s against the same LM in fp32, measured in the same process.

The stage is the one ``userip experiment --config CONFIG`` runs (same data, protocol and profile settings),
written to ``--run-dir`` (default: the config's run_dir), so the experiment afterwards reuses the bank instead
of training again. The reference: ``--reference-steps`` steps of the same profile settings with fp32 LM
weights, in a temporary copy of the data.

Usage: python bench/bench_profile_cpu.py --config configs/experiment_ml100k_warm_smollm2.yaml
       [--budget-min 30] [--run-dir DIR] [--set profile.lm.device=cuda ...]
Ends with: RESULT wall_s=... train_s=... budget_s=... within_budget=0|1 tokens_per_s=... fp32_tokens_per_s=...
           speedup_vs_fp32=... steps=... epochs=... first_epoch_loss=... last_epoch_loss=... device=...
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from userip.pipeline.experiment import Experiment, ExperimentConfig
from userip.profile.stage import run_profile_stage
from userip.utils.config import add_set_argument, apply_overrides, from_dict, load_yaml
from userip.utils.logging import setup_logging


def epoch_means(losses: list[float], steps_per_epoch: int) -> list[float]:
    return [float(np.mean(losses[i : i + steps_per_epoch])) for i in range(0, len(losses), steps_per_epoch)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a userip experiment YAML")
    parser.add_argument("--run-dir", type=Path, help="where the stage is written (default: the config's)")
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--reference-steps", type=int, default=3)
    add_set_argument(parser, "profile.lm.device=cuda")
    args = parser.parse_args()

    data = apply_overrides(load_yaml(args.config), args.set)
    config = from_dict(ExperimentConfig, data, str(args.config))
    if args.run_dir is not None:
        config = dataclasses.replace(config, run_dir=str(args.run_dir))
    run_dir = Path(config.run_dir)
    if (run_dir / "bank").exists():
        print(f"{run_dir / 'bank'} exists: this bench times a fresh stage; choose another --run-dir")
        return 2
    setup_logging(run_dir / "logs" / "bench_profile_cpu.log")
    dataset = Experiment(config).prepare_data()  # RUN/data exactly as the experiment prepares it
    profile = config.profile

    with tempfile.TemporaryDirectory() as tmp:  # fp32 reference, same LM and settings, a few steps
        shutil.copytree(run_dir / "data", Path(tmp) / "data")
        reference = dataclasses.replace(
            profile,
            lm=dataclasses.replace(profile.lm, dtype="fp32"),
            train=dataclasses.replace(
                profile.train, max_steps=args.reference_steps, checkpoint_every=0, progress=False
            ),
        )
        ref = run_profile_stage(tmp, reference)
        fp32_tok_s = ref.report["lm_tokens"] / ref.report["lm_seconds"]

    start = time.perf_counter()
    result = run_profile_stage(run_dir, profile)
    wall = time.perf_counter() - start
    report = result.report
    tok_s = report["lm_tokens"] / report["lm_seconds"]
    steps_per_epoch = -(-len(dataset.users) // profile.train.batch_size)
    means = epoch_means(report["lm_loss_history"], steps_per_epoch)
    cpu = platform.processor() or platform.machine()
    device = f"{profile.lm.device} ({cpu}, {torch.get_num_threads()} threads)"
    budget = args.budget_min * 60
    print(
        f"RESULT wall_s={wall:.0f} train_s={report['lm_seconds']:.3f} budget_s={budget:.0f} "
        f"within_budget={int(wall <= budget)} "
        f"tokens_per_s={tok_s:.0f} fp32_tokens_per_s={fp32_tok_s:.0f} "
        f"speedup_vs_fp32={tok_s / fp32_tok_s:.2f} "
        f"steps={result.steps} epochs={len(means)} first_epoch_loss={means[0]:.4f} "
        f"last_epoch_loss={means[-1]:.4f} device={device.replace(' ', '_')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
