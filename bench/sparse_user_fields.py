"""Why no user-level field helps DCN on the sparse protocol: a controlled study on the rating tendency.

On ``configs/experiment_ml100k_sparse.yaml``'s data (5 random training rows per user), DCN is trained with one
extra user field that holds the strongest user-level signal ML-100K has, the user's positive rate over their
5 training rows (3 levels: < 0.35, < 0.7, >= 0.7, so 4- and 5-row rates share levels), built three ways:

  leak      every row gets the rate of all 5 training rows (a training row's own label is inside it),
  loo       training rows get the rate of the user's other 4 rows (leave-one-out), eval rows all 5,
  bias      the leak field as a per-level scalar added to DCN's logit (no embedding, no interactions),

and without the user id (item + loo; item alone) to see what the id embedding already learns from the same
5 rows. Same DCN, trainer settings and seeds for every row; choices on nothing (a fixed trainer), reported on
valid and test with paired t-tests against plain DCN.

Usage: python bench/sparse_user_fields.py [--config configs/experiment_ml100k_sparse.yaml] [--seeds 0,1,2,3,4]
Ends with: RESULT dcn_test_auc=... leak=... loo=... bias=... item_loo=... item=... (test AUC means; p values)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from userip.ctr.data import SplitTensors, build_ctr_data
from userip.ctr.features import FeatureMap, Field, FieldSource
from userip.ctr.layers import LinearTerm
from userip.ctr.models import build_model
from userip.ctr.trainer import CTRTrainerConfig, Trainer
from userip.data.schema import Dataset
from userip.evaluation.metrics import auc, paired_test
from userip.pipeline.experiment import Experiment, ExperimentConfig
from userip.utils.config import from_dict, load_yaml
from userip.utils.seed import seed_everything

RATE_LEVELS = (0.35, 0.7)  # 3 levels; field index 1..3 (0 = unknown)
USER, ITEM, RATE = 0, 1, 2  # columns of the study's x_ids


def rate_column(dataset: Dataset, split: str, leave_one_out: bool) -> np.ndarray:
    """(N,) level index of each ``split`` row's user positive rate over the user's training rows."""
    inter = dataset.interactions
    train = inter[inter["split"] == "train"]
    positives = train.groupby("user_id")["label"].sum()
    counts = train.groupby("user_id")["label"].count()
    rows = inter[inter["split"] == split]
    pos = positives.reindex(rows["user_id"]).fillna(0).to_numpy()
    n = counts.reindex(rows["user_id"]).fillna(0).to_numpy()
    if leave_one_out:
        pos, n = pos - rows["label"].to_numpy(), n - 1
    rate = np.where(n > 0, pos / np.maximum(n, 1), 0.5)
    return np.digitize(rate, RATE_LEVELS) + 1


class BiasFieldDCN(nn.Module):
    """DCN on user and item, plus a per-value scalar of the rate field added to the logit (zero at start)."""

    def __init__(self, feature_map: FeatureMap) -> None:
        super().__init__()
        self.dcn = build_model("dcn", FeatureMap(feature_map.fields[:RATE]))
        self.embedding = self.dcn.embedding  # the trainer's embedding weight decay applies to it
        self.rate_bias = LinearTerm(feature_map.vocab_sizes[RATE:])
        with torch.no_grad():
            self.rate_bias.weight.zero_()

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.dcn(x_ids[:, :RATE]) + self.rate_bias(x_ids[:, RATE:]).reshape(-1)


VARIANTS = {  # name -> (columns, leave_one_out, model)
    "dcn": ((USER, ITEM), False, "dcn"),
    "leak": ((USER, ITEM, RATE), False, "dcn"),
    "loo": ((USER, ITEM, RATE), True, "dcn"),
    "bias": ((USER, ITEM, RATE), False, "bias"),
    "item_loo": ((ITEM, RATE), True, "dcn"),
    "item": ((ITEM,), False, "dcn"),
}


def fit_variant(dataset: Dataset, name: str, seed: int, trainer: CTRTrainerConfig) -> tuple[float, float]:
    columns, loo, model_name = VARIANTS[name]
    data = build_ctr_data(dataset)
    splits = {}
    for split, tensors in data.splits.items():
        rate = torch.from_numpy(rate_column(dataset, split, loo and split == "train")).long()[:, None]
        x_ids = torch.cat([tensors.x_ids, rate], dim=1)[:, list(columns)]
        splits[split] = SplitTensors(x_ids, tensors.labels)
    fields = (*data.feature_map.fields, Field("positive_rate", len(RATE_LEVELS) + 2, FieldSource.USER))
    feature_map = FeatureMap(tuple(fields[c] for c in columns))
    seed_everything(seed)
    model = BiasFieldDCN(feature_map) if model_name == "bias" else build_model("dcn", feature_map)
    fit_trainer = Trainer(model, dataclasses.replace(trainer, seed=seed))
    fit = fit_trainer.fit(splits["train"], splits["valid"])
    test_auc = auc(splits["test"].labels.numpy(), fit_trainer.predict(splits["test"].x_ids))
    return float(fit.best_valid_auc), float(test_auc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/experiment_ml100k_sparse.yaml"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = from_dict(ExperimentConfig, load_yaml(args.config), str(args.config))
    dataset = Experiment(config).prepare_data()  # reused when the experiment already wrote it
    seeds = [int(s) for s in args.seeds.split(",")]
    trainer = CTRTrainerConfig(
        lr=0.003, embedding_weight_decay=0.001, batch_size=1024, max_epochs=30, patience=5
    )
    scores = {name: [fit_variant(dataset, name, s, trainer) for s in seeds] for name in VARIANTS}
    base_test = [t for _, t in scores["dcn"]]
    print("| fields | valid AUC | test AUC | vs DCN (test) | paired p |")
    print("|---|---|---|---|---|")
    result = [f"dcn_test_auc={np.mean(base_test):.4f}"]
    for name, pairs in scores.items():
        valid, test = np.mean([v for v, _ in pairs]), [t for _, t in pairs]
        p = paired_test(test, base_test).t_pvalue if name != "dcn" else float("nan")
        gain = np.mean(test) - np.mean(base_test)
        print(f"| {name} | {valid:.4f} | {np.mean(test):.4f} | {gain:+.4f} | {p:.3g} |")
        if name != "dcn":
            result.append(f"{name}={np.mean(test):.4f} {name}_p={p:.3g}")
    print("RESULT " + " ".join(result) + f" seeds={len(seeds)} device=cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
