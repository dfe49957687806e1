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


def skewed_distances(num_rows: int = 1000, num_codes: int = 4) -> torch.Tensor:
    """(N, K) squared distances of points in a 95% / 5% pair of blobs to K codes, two of them far off: the
    plain nearest-code counts miss any floor above 0 (the fit needs its Sinkhorn and repair steps)."""
    gen = torch.Generator().manual_seed(5)
    dim = 8
    points = torch.cat(
        [
            0.3 * torch.randn(num_rows * 95 // 100, dim, generator=gen),
            3.0 + 0.3 * torch.randn(num_rows - num_rows * 95 // 100, dim, generator=gen),
        ]
    )
    codes = torch.randn(num_codes, dim, generator=gen)
    codes[0], codes[1] = points[:950].mean(0), points[950:].mean(0)
    return ((points[:, None, :] - codes[None]) ** 2).sum(-1)


# (rows of rank 0, floor share): uneven halves, and every row on rank 0 (rank 1 holds none)
SPLITS = ((700, 0.05), (1000, 0.2))


def balance_on_split_rows(ctx) -> list[dict]:  # noqa: ANN001 - DistContext
    """``fit_balance_distances`` on ``skewed_distances`` split over the ranks (rank 0 the first rows)."""
    from userip.codebook.quantizer import ProfileQuantizer
    from userip.utils.distributed import rank_reduce

    d2 = skewed_distances()
    out = []
    for rows0, share in SPLITS:
        mine = d2[:rows0] if ctx.rank == 0 else d2[rows0:]
        q = ProfileQuantizer(8, d2.shape[1])
        counts = q.fit_balance_distances(mine, share, reduce=rank_reduce(ctx))
        out.append({"code_bias": q.code_bias.tolist(), "counts": counts.tolist()})
    return out


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
    record["code_bias"] = [q.code_bias.tolist() for q in objective.quantizer.quantizers]
    record["balance"] = balance_on_split_rows(ctx)
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    if report is not None:
        (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        shutdown()
