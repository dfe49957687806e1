"""Profile fields trained jointly with DCN vs added to a trained DCN (``trainer.warm_start``), per protocol.

For one experiment config (its run directory must exist: run ``userip experiment --config ...`` first, which
also caches the trainer search), trains on every seed, with the trainer settings validation chose for
UserIP-DCN (``warm_start`` forced off / on; DCN with its own choice):

  dcn       DCN on user and item ids,
  joint     UserIP-DCN trained from scratch with the profile fields (the paper's way),
  warm      UserIP-DCN extended from DCN (same settings and seed): DCN's weights fixed, the new fields'
            part trained, DCN itself competing as validation epoch 0 (docs/ctr_training.md).

Reports valid and test AUC (means over seeds) and paired t-tests of test AUC against DCN, so a reader sees
what the warm start gives up where profiles help (cold start) and what it saves where they cost (sparse).

Usage: python bench/warm_start_fields.py [--config configs/experiment_ml100k_cold_start.yaml] [--seeds 0,1,2]
Ends with: RESULT dcn=... joint=... joint_p=... warm=... warm_p=... (test AUC means) and the valid AUC means.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from userip.ctr.recipe import train_ctr
from userip.evaluation.metrics import paired_test
from userip.pipeline.experiment import Cell, Experiment, ExperimentConfig
from userip.utils.config import from_dict, load_yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/experiment_ml100k_cold_start.yaml"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    config = from_dict(ExperimentConfig, load_yaml(args.config), str(args.config))
    experiment = Experiment(config)
    experiment.setup()  # reuses the run directory's data, bank and new-user IDs
    experiment.select_trainers()  # cached search cells: no training when the experiment has run
    model = config.userip_model.lower()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[tuple[float, float]]] = {"dcn": [], "joint": [], "warm": []}
    for seed in seeds:
        base_trainer = experiment.trainer_for(Cell("table2", model, "base", seed))
        userip_trainer = experiment.trainer_for(Cell("table2", model, "userip", seed))
        runs = {
            "dcn": dict(config=base_trainer),
            "joint": dict(config=dataclasses.replace(userip_trainer, warm_start=False), with_profiles=True),
            "warm": dict(config=dataclasses.replace(userip_trainer, warm_start=True), with_profiles=True),
        }
        for name, kwargs in runs.items():
            bank = experiment.banks["userip"] if kwargs.get("with_profiles") else None
            result = train_ctr(experiment.dataset, model, bank=bank, seed=seed, save=False, **kwargs)
            rows[name].append((result.valid["auc"], result.test["auc"]))
            print(
                f"seed {seed} {name}: valid {result.valid['auc']:.4f} test {result.test['auc']:.4f}",
                flush=True,
            )
    test = {name: np.array([t for _, t in r]) for name, r in rows.items()}
    valid = {name: float(np.mean([v for v, _ in r])) for name, r in rows.items()}
    print("| row | valid AUC | test AUC | p vs DCN |\n|---|---|---|---|")
    for name in rows:
        p = paired_test(test[name], test["dcn"]).t_pvalue if name != "dcn" else float("nan")
        print(f"| {name} | {valid[name]:.4f} | {test[name].mean():.4f} | {p:.3g} |")
    p_joint = paired_test(test["joint"], test["dcn"]).t_pvalue
    p_warm = paired_test(test["warm"], test["dcn"]).t_pvalue
    print(
        f"RESULT dcn={test['dcn'].mean():.4f} joint={test['joint'].mean():.4f} joint_p={p_joint:.3g} "
        f"warm={test['warm'].mean():.4f} warm_p={p_warm:.3g} valid_dcn={valid['dcn']:.4f} "
        f"valid_joint={valid['joint']:.4f} valid_warm={valid['warm']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
