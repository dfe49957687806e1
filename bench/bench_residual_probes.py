"""Do residual codes keep what the soft tokens know? (issue 25 item 1)

Re-quantizes the *fixed* soft tokens of one profile stage (``userip.profile.requantize``: codebooks +
surrogate trained again, as the experiment's sweeps do) with ``quantization.num_levels`` 1, 2, 3, ... and
probes every bank like ``userip experiment``'s diagnostics do (``userip.evaluation.probes.probe_report``:
5-fold cross-validated linear-probe AUC against facts no profile saw, e.g. the held-out positive rate). The
codes are probed as all their fields (one-hot of every level).

    python bench/bench_residual_probes.py --run-dir /tmp/syn                 # synthetic default, seed 0
    python bench/bench_residual_probes.py --run-dir RUN --bank-root /tmp/b  # a finished run's soft tokens

A run folder with soft tokens is re-quantized with the profile config it recorded (``stage_config.json``);
one without gets them first: ``userip run``'s prepare + profile stages on the embedded synthetic default
(``--num-users``, ``--epochs``). Synthetic data is implicit feedback (no held-out positive rate to probe):
pass e.g. ``--target heldout_top_genre_is_outdoors`` there. Ends with one line
``RESULT soft_auc=... codes_L1_auc=... codes_L2_auc=... kept_L2=...`` for the ``--target`` probe, where
kept_L = (codes AUC - 0.5) / (soft-token AUC - 0.5), the share of the soft tokens' lift over chance.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from userip.data.schema import HISTORY_SPLIT, Dataset
from userip.evaluation.probes import one_hot_codes, probe_markdown, probe_report
from userip.pipeline.run import PipelineConfig, stage_prepare, stage_profile
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens
from userip.profile.requantize import requantize
from userip.profile.stage import ProfileStageConfig
from userip.utils.config import from_dict
from userip.utils.io import read_json
from userip.utils.run_layout import RunLayout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sizes", type=int, nargs=2, default=[4, 3], help="hobby and background codebook sizes")
    p.add_argument(
        "--residual-size",
        type=int,
        default=0,
        help="codebook size of every level past the first (0: --sizes)",
    )
    p.add_argument("--epochs", type=int, default=15, help="profile epochs when the run has no soft tokens")
    p.add_argument("--num-users", type=int, default=2000, help="synthetic users (new run only)")
    p.add_argument("--requantize-epochs", type=int, default=30)
    p.add_argument("--target", default="heldout_positive_rate_high", help="the probe row of the RESULT line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bank-root",
        type=Path,
        default=None,
        help="where the re-quantized banks go (default: the run folder); with it the run is only read",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    config = from_dict(
        PipelineConfig,
        {
            "run_dir": str(args.run_dir),
            "source_options": {"num_users": args.num_users, "seed": args.seed},
            "profile": {
                "train": {"num_epochs": args.epochs, "lr": 0.02, "batch_size": 32, "progress": False}
            },
            "seeds": [args.seed],
        },
        "bench config",
    )
    start = time.perf_counter()
    layout = RunLayout(args.run_dir)
    if (layout.profile / "soft_tokens.safetensors").exists():  # a finished stage: read with its own config
        config.profile = ProfileStageConfig.from_dict(read_json(layout.stage_config)["config"])
    else:
        stage_profile(config, args.run_dir, stage_prepare(config, args.run_dir))
    profile_s = time.perf_counter() - start
    bank_root = args.bank_root or args.run_dir
    dataset = Dataset.load(args.run_dir)
    soft_tokens, trained_mask, _ = load_soft_tokens(RunLayout(args.run_dir).profile)
    users = torch.nonzero(trained_mask).squeeze(1).numpy()
    profiles = profile_means(soft_tokens[users], config.profile.prompt)  # (N, P, D)
    features: dict[str, np.ndarray] = {"soft_tokens": profiles.flatten(1).numpy()}
    timings = {}
    for levels in args.levels:
        residual_sizes = (args.residual_size,) * (levels - 1) if args.residual_size else ()
        quant = dataclasses.replace(
            config.profile.quantization,
            num_levels=levels,
            residual_sizes=residual_sizes,
            seed=args.seed,
            kmeans_init_samples=256,
        )
        t = time.perf_counter()
        bank = requantize(
            args.run_dir,
            dataset,
            config.profile,
            quant,
            list(args.sizes),
            bank_root / f"bench_residual_bank_L{levels}_r{args.residual_size}",
            epochs=args.requantize_epochs,
        )
        timings[levels] = time.perf_counter() - t
        features[f"codes_L{levels}"] = one_hot_codes(bank.lookup(users), bank.codebook_sizes)
        print(
            f"L={levels}: fields {bank.profile_names} sizes {bank.codebook_sizes} ({timings[levels]:.1f} s)"
        )
    held_out = ("train", "valid", "test") if len(dataset.split(HISTORY_SPLIT)) else ("valid", "test")
    table = probe_report(dataset, features, dataset.profile_rows(), users, held_out)
    print(probe_markdown(table))
    if args.target not in table.columns:  # rows: feature sets, columns: probe targets
        print(f"target {args.target!r} not among the probe targets {list(table.columns)}", file=sys.stderr)
        return 2
    row = table[args.target]
    soft = float(row["soft_tokens"])
    parts = [f"soft_auc={soft:.3f}"]
    for levels in args.levels:
        auc = float(row[f"codes_L{levels}"])
        parts += [f"codes_L{levels}_auc={auc:.3f}", f"kept_L{levels}={(auc - 0.5) / (soft - 0.5):.2f}"]
    parts.append(f"users={len(users)} profile_s={profile_s:.0f}")
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
