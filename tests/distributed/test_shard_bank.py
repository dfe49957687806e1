"""Shard-local reading and the rank-local bank on 2 gloo ranks (torchrun): each rank reads only the row
groups of its users, and the bank its parts make up is the one the single-process code writes from the same
profile vectors and codebooks (codes after the balance fit, manifest, report, recovery)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tests.distributed.bank_worker import (
    SPLITS,
    objective_for,
    profile_table,
    skewed_distances,
    trained_users,
)

from userip.codebook.quantizer import ProfileQuantizer
from userip.data.prepare import prepare
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.profile.bank import write_bank
from userip.utils.distributed import DistContext, rank_reduce
from userip.utils.io import read_json

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_rank_bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("shardbank")
    dataset = prepare("synthetic", {"num_users": 240, "num_items": 30})
    dataset.save(root / "data", row_group_rows=300)  # ~10 row groups of interactions
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    env["PYTHONPATH"] += os.pathsep + str(HERE.parents[1])  # the worker imports tests.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "bank_worker.py"), str(root / "data"), str(root)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [read_json(root / f"rank{r}.json") for r in range(2)]
    return {"root": root, "dataset": Dataset.load(root / "data"), "ranks": ranks}


def test_each_rank_reads_only_its_users_row_groups(two_rank_bank: dict) -> None:
    dataset, ranks = two_rank_bank["dataset"], two_rank_bank["ranks"]
    users = dataset.interactions["user_id"].to_numpy()
    assert ranks[0]["lo"] == 0 and ranks[0]["hi"] == ranks[1]["lo"] and ranks[1]["hi"] == dataset.num_users
    for rec in ranks:
        held = (users >= rec["lo"]) & (users < rec["hi"])
        # exactly its users' rows, no one else's
        assert (
            rec["rows"] == int(held.sum())
            and rec["min_user"] == rec["lo"]
            and rec["max_user"] == rec["hi"] - 1
        )
        assert rec["users_rows"] == rec["hi"] - rec["lo"] == rec["part_rows"]
        assert rec["num_users"] == dataset.num_users
        # and only the row groups that hold them: about half of them, never all
        total = rec["row_groups_total"]
        assert total >= 6 and rec["row_groups_read"]["interactions"] <= total // 2 + 1
    assert sum(r["row_groups_read"]["interactions"] for r in ranks) <= ranks[0]["row_groups_total"] + 1


def test_multi_part_bank_equals_the_single_process_bank(two_rank_bank: dict, tmp_path: Path) -> None:
    root, dataset = two_rank_bank["root"], two_rank_bank["dataset"]
    pointer = read_json(root / "bank" / "CURRENT.json")
    assert [(p["user_lo"], p["user_hi"]) for p in pointer["parts"]] == [
        (r["lo"], r["hi"]) for r in two_rank_bank["ranks"]
    ]
    table = profile_table(dataset.num_users)
    objective = objective_for(dataset, table)
    single, report = write_bank(
        tmp_path / "bank", dataset, objective, table, trained_user_ids=trained_users(dataset.num_users),
        lm="tiny", template="<t>", config={"note": "test"},
    )  # fmt: skip
    assert any(bool((q.code_bias != 0).any()) for q in objective.quantizer.quantizers)  # balancing ran
    multi = FeatureBank.load(root / "bank", expected_dataset_hash=dataset.content_hash)
    assert multi.version == pointer["version"] == two_rank_bank["ranks"][0]["version"]
    np.testing.assert_array_equal(multi.codes, single.codes)
    assert multi.raw_user_ids == single.raw_user_ids and multi.codebook_hash == single.codebook_hash
    assert (multi.codes == -1).any() and (multi.codes >= 0).any()
    single_manifest = FeatureBank.load(tmp_path / "bank").manifest
    skip = {"version", "created"}
    assert {k: v for k, v in multi.manifest.items() if k not in skip} == {
        k: v for k, v in single_manifest.items() if k not in skip
    }
    multi.verify_objective(root / "bank")  # the objective the parts name, as recorded
    dist_report = json.loads((root / "report.json").read_text())
    report.pop("bank_version"), dist_report.pop("bank_version")
    assert "recovery" in dist_report and dist_report == json.loads(json.dumps(report))


def test_balance_fit_on_rows_split_over_ranks_equals_the_fit_on_all_rows(two_rank_bank: dict) -> None:
    """Each rank holds its rows only and all-reduces per-code numbers: the offsets (and every row's counts)
    are the single-process fit's on the concatenated rows, on both ranks, also when one rank holds none."""
    d2 = skewed_distances()
    for case, (_, share) in enumerate(SPLITS):
        single = ProfileQuantizer(8, d2.shape[1])
        counts = single.fit_balance_distances(d2, share)
        assert single.code_bias.any() and int(counts.min()) >= math.ceil(share * len(d2))
        for rank in two_rank_bank["ranks"]:
            got = rank["balance"][case]
            assert got["counts"] == counts.tolist()
            np.testing.assert_allclose(got["code_bias"], single.code_bias.numpy(), rtol=1e-6, atol=1e-6)
    # the bank step's fit: the same offsets on both ranks, bit for bit (rank 0's are broadcast)
    assert two_rank_bank["ranks"][0]["code_bias"] == two_rank_bank["ranks"][1]["code_bias"]


def test_one_rank_group_fit_equals_the_single_process_fit(tmp_path: Path) -> None:
    """The all-reduce path with one gloo rank: every collective runs and the numbers are the ones of the fit
    without a process group, bit for bit."""
    d2 = skewed_distances()
    single = ProfileQuantizer(8, d2.shape[1])
    counts = single.fit_balance_distances(d2, 0.05)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(0, 1, 0, "gloo", torch.device("cpu"))
        grouped = ProfileQuantizer(8, d2.shape[1])
        got = grouped.fit_balance_distances(d2, 0.05, reduce=rank_reduce(ctx))
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, counts) and torch.equal(grouped.code_bias, single.code_bias)
