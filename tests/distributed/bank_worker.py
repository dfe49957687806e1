"""A torchrun worker for test_shard_bank.py: each rank reads its users' rows of a prepared data set and
writes its part of a bank from fixed profile vectors and codebooks (``write_rank_bank``).

    torchrun --nproc_per_node 2 tests/distributed/bank_worker.py DATA_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from userip.codebook.config import QuantizationConfig
from userip.data.schema import Dataset
from userip.data.shards import UserRowGroups, load_user_shard, profile_example_weights
from userip.profile.bank import build_aux
from userip.profile.distributed import shard_bounds, write_rank_bank
from userip.prompts import ProfileSpec
from userip.utils.distributed import init_distributed, shutdown

PROFILES = (
    ProfileSpec("hobby", "This user's hobby is", codebook_size=3),
    ProfileSpec("background", ", his background is", codebook_size=2),
)
DIM = 6
QUANT = QuantizationConfig(kmeans_init_samples=24, balance_min_share=0.3)


def profile_table(num_users: int) -> torch.Tensor:
    """(U, 2, DIM) fixed profile vectors: a few tight clusters (so balancing has work to do)."""
    gen = torch.Generator().manual_seed(11)
    centres = torch.randn(4, 2, DIM, generator=gen) * 3
    which = torch.arange(num_users) % 4
    which[: num_users // 2] = 0  # half the users on one cluster: the floor needs offsets
    return centres[which] + 0.3 * torch.randn(num_users, 2, DIM, generator=gen)


def trained_users(num_users: int) -> np.ndarray:
    return np.flatnonzero(np.arange(num_users) % 7 != 3)  # every 7th user has no training target


def objective_for(dataset: Dataset, table: torch.Tensor):  # noqa: ANN201 - JointObjective
    torch.manual_seed(0)  # the surrogate's initial weights (in the stage, DDP gives every rank rank 0's)
    aux = build_aux(dataset, PROFILES, DIM, QUANT)
    aux.quantizer.init_from(table)  # same table, same generator: the same codebooks in every process
    return aux


def main(data_dir: Path, out_dir: Path) -> None:
    ctx = init_distributed("cpu")
    num_users = int(Dataset.read_manifest(data_dir)["counts"]["users"])
    weights = profile_example_weights(data_dir, num_users, review=False)
    bounds = shard_bounds(np.repeat(np.arange(num_users), weights), num_users, ctx.world_size)
    lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
    shard = load_user_shard(data_dir, lo, hi)
    table = profile_table(num_users)
    objective = objective_for(shard, table)
    trained = trained_users(num_users)
    local_trained = trained[(trained >= lo) & (trained < hi)] - lo
    part, report = write_rank_bank(
        out_dir / "bank", shard, objective, lambda rows: table[lo:hi][rows], local_trained, ctx,
        lm="tiny", template="<t>", config={"note": "test"},
    )  # fmt: skip
    users = shard.interactions["user_id"].to_numpy()
    record = {
        "lo": lo, "hi": hi, "version": part.version, "part_rows": part.num_rows,
        "row_groups_read": shard.row_groups_read,
        "row_groups_total": int(UserRowGroups.of(data_dir / "interactions.parquet").rows.size),
        "rows": len(users), "min_user": int(users.min()), "max_user": int(users.max()),
        "users_rows": len(shard.users), "num_users": shard.num_users,
    }  # fmt: skip
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    if report is not None:
        (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        shutdown()
