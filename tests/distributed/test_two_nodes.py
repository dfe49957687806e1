"""Two torchrun nodes on this machine, launched as a multi-node job is (``tests/distributed/nodes.py``: one
launcher per node, c10d rendezvous), through the profile stage and CTR training; one node is SIGKILLed
(launcher and worker) mid-run and the job relaunched with the same command on both nodes. The relaunched
job must end with what an uninterrupted 2-node run writes, bit for bit: the soft-token shards, bank codes and
codebooks, the loss history; the CTR weights and metrics.

Which node gets rank 0 is the rendezvous' choice (and may differ between launches): the stopped worker is
named by its rank and its node found from its pid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from tests.distributed.nodes import two_nodes, wait_for_file
from tests.distributed.test_ctr_ddp import TRAINER, make_ctr_run
from tests.reliability.test_resume import PROFILE_YAML

from userip.cli import main as userip_main
from userip.feature_bank import FeatureBank
from userip.profile.distributed import COMMIT_FILE, DIST_CHECKPOINTS
from userip.utils.io import read_json

HERE = Path(__file__).parent
KILL_WORKER = str(HERE / "kill_worker.py")
# 59 users (60 before the k-core filter), global batch 16: 4 steps per epoch, 8 in all; checkpoints every
# 2 steps; k-means after step 3.
STOP_BEFORE_STEP = 5  # the last committed step is then 4, after the codebooks' k-means initialisation
RUN_TIMEOUT_S = 240.0
# How long the surviving node may take to notice its lost peer and end: gloo fails the pending collective
# when the peer's socket closes, and the launcher (--max-restarts 0) then stops.
SURVIVOR_TIMEOUT_S = 120.0


def _run_job(args: list[str]) -> str:
    """``userip ARGS`` on both nodes to the end (the command users run); their output."""
    with two_nodes(["-m", "userip.cli", *args]) as nodes:
        codes = nodes.wait(RUN_TIMEOUT_S)
        output = nodes.output()
    assert codes == [0, 0], output[-6000:]
    return output


def _killed_job(args: list[str], stop_rank: int, stop_at: int, marker: Path) -> str:
    """``userip ARGS`` on both nodes; rank ``stop_rank`` holds before ``stop_at`` (kill_worker.py), then its
    node is SIGKILLed; the other node must end by itself, with a failure."""
    with two_nodes([KILL_WORKER, str(stop_rank), str(stop_at), "--hold", str(marker), "--", *args]) as nodes:
        worker_pid = int(wait_for_file(marker, RUN_TIMEOUT_S, nodes))
        killed = nodes.node_of(worker_pid)
        nodes.kill_node(killed)
        survivor = nodes.procs[1 - killed].wait(timeout=SURVIVOR_TIMEOUT_S)
        output = nodes.output()
    assert survivor != 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def profile_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-node profile run (it pre-trains the offline LM), and a copy of its data and LM."""
    root = tmp_path_factory.mktemp("two_nodes")
    (root / "profile.yaml").write_text(PROFILE_YAML)
    reference = root / "reference"
    assert userip_main(["prepare", "--source", "synthetic", "--num-users", "60", "--num-items", "24",
                        "--out", str(reference)]) == 0  # fmt: skip
    killed = root / "killed"
    shutil.copytree(reference / "data", killed / "data")
    _run_job(_profile_args(reference, root / "profile.yaml"))
    shutil.copytree(reference / "lm", killed / "lm")
    return {"root": root, "reference": reference, "killed": killed}


def _profile_args(run: Path, config: Path) -> list[str]:
    # --resume on both launches: the first starts fresh (nothing to resume), the relaunch continues
    return ["profile", "--run-dir", str(run), "--config", str(config), "--resume"]


@pytest.mark.slow  # 3 launches of 2 nodes + the offline LM: ~75 s on the busy 2-core machine
def test_profile_node_killed_and_job_relaunched_equals_the_uninterrupted_run(
    profile_runs: dict[str, Path],
) -> None:
    run, reference = profile_runs["killed"], profile_runs["reference"]
    args = _profile_args(run, profile_runs["root"] / "profile.yaml")
    _killed_job(args, stop_rank=1, stop_at=STOP_BEFORE_STEP, marker=profile_runs["root"] / "held")
    assert not (run / "bank").exists()
    commit = read_json(run / "profile" / "checkpoints" / DIST_CHECKPOINTS / COMMIT_FILE)
    assert commit["step"] == STOP_BEFORE_STEP - 1 and commit["world_size"] == 2

    output = _run_job(args)  # the same command on both nodes
    assert f"resumed from step {STOP_BEFORE_STEP - 1}" in output

    for rank in range(2):
        shard = f"rank-{rank}-of-2.safetensors"
        got = load_file(str(run / "profile" / "shards" / shard))
        want = load_file(str(reference / "profile" / "shards" / shard))
        assert got.keys() == want.keys()
        for key in got:
            assert np.array_equal(got[key].numpy(), want[key].numpy()), (shard, key)
    bank, ref_bank = FeatureBank.load(run / "bank"), FeatureBank.load(reference / "bank")
    assert bank.codes.shape == ref_bank.codes.shape and np.array_equal(bank.codes, ref_bank.codes)
    for a, b in zip(bank.codebooks, ref_bank.codebooks, strict=True):
        assert np.array_equal(a, b)
    history = read_json(run / "bank" / "report.json")["lm_loss_history"]
    assert len(history) == 8 and history == read_json(reference / "bank" / "report.json")["lm_loss_history"]


def test_ctr_node_killed_and_job_relaunched_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # In the default suite, as the other torchrun tests here (3 launches of 2 nodes: ~25 s on the idle 2-core
    # machine, ~50 s busy): the multi-node launch, kill and relaunch that the slow profile test also runs.
    """CTR training keeps no checkpoints: the relaunch trains again from the start, and must write exactly
    what an uninterrupted 2-node run writes (nothing of the killed run may leak into it)."""
    runs = {}
    for name in ("reference", "killed"):
        runs[name] = make_ctr_run(tmp_path / name, {**TRAINER, "max_epochs": 3})
    _run_job(_ctr_args(runs["reference"]))
    args = _ctr_args(runs["killed"])
    # rank 0 (the rank that writes the outputs) is stopped this time, after one epoch and its validation
    _killed_job(args, stop_rank=0, stop_at=2, marker=tmp_path / "held")
    assert not list(runs["killed"].glob("ctr/*/metrics.json"))  # killed before rank 0 wrote anything
    _run_job(args)  # the same command on both nodes

    got_dir, want_dir = runs["killed"] / "ctr" / "dcn+profiles", runs["reference"] / "ctr" / "dcn+profiles"
    got, want = load_file(str(got_dir / "model.safetensors")), load_file(str(want_dir / "model.safetensors"))
    assert got.keys() == want.keys()
    for key in got:
        assert np.array_equal(got[key].numpy(), want[key].numpy()), key
    metrics, ref_metrics = read_json(got_dir / "metrics.json"), read_json(want_dir / "metrics.json")
    assert len(metrics["history"]) == 3
    for key in ("valid", "test", "calibration"):
        assert metrics[key] == ref_metrics[key], key
    timing = ("train_seconds", "train_samples_per_s")  # wall-clock measurements, not results
    for got_epoch, want_epoch in zip(metrics["history"], ref_metrics["history"], strict=True):
        assert {k: v for k, v in got_epoch.items() if k not in timing} == {
            k: v for k, v in want_epoch.items() if k not in timing
        }


def _ctr_args(run: Path) -> list[str]:
    return ["train", "--model", "dcn", "--run-dir", str(run), "--with-profiles", "--model-config",
            str(run / "model.yaml"), "--no-progress"]  # fmt: skip
