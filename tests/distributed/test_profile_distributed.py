"""The profile stage on torch.distributed (gloo, 2 CPU processes launched by torchrun).

One tiny synthetic data set is profiled once in this process (the reference) and once by 2 ranks; the bank
of the 2-rank run must be valid, give every trained user codes, and recover the true profiles about as well
(NMI within 0.05). A rank SIGKILLed mid-run is followed by ``--resume`` to a valid bank.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from userip.cli import main as userip_main
from userip.feature_bank import UNKNOWN_CODE, FeatureBank
from userip.profile.cli import build_config
from userip.profile.distributed import COMMIT_FILE, DIST_CHECKPOINTS, local_examples, shard_bounds
from userip.profile.stage import run_profile_stage
from userip.utils.distributed import DistributedError
from userip.utils.io import read_json

HERE = Path(__file__).parent
CONFIG = {
    "offline_lm": {"max_steps": 150, "epochs": 15, "hidden_size": 32, "num_layers": 1},
    "train": {"lr": 0.02, "num_epochs": 8, "batch_size": 32, "progress": False, "checkpoint_every": 5},
    "quantization": {"kmeans_init_samples": 64},
}
TOTAL_STEPS = 80  # 8 epochs x ceil(300 users / 32)


def _torchrun(
    args: list[str], kill: tuple[int, int] = (-1, 0), timeout: float = 240
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "kill_worker.py"), str(kill[0]), str(kill[1]), "--", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    config_file = root / "profile.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    single = root / "single"
    assert userip_main(["prepare", "--source", "synthetic", "--num-users", "300", "--num-items", "36",
                        "--out", str(single)]) == 0  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["profile", "--run-dir", str(single), "--config", str(config_file)]
        from userip.cli import build_parser

        run_profile_stage(single, build_config(build_parser("profile").parse_args(args)))
    finally:
        torch.set_num_threads(threads)
    out = {"root": root, "config": config_file, "single": single}
    for name in ("dist", "killed"):  # same data and the same (already pre-trained) offline LM
        target = root / name
        shutil.copytree(single / "data", target / "data")
        shutil.copytree(single / "lm", target / "lm")
        out[name] = target
    return out


def _profile_args(run: Path, config: Path, *extra: str) -> list[str]:
    return ["profile", "--run-dir", str(run), "--config", str(config), *extra]


def _check_bank(run: Path) -> dict:
    bank = FeatureBank.load(run / "bank")
    report = read_json(run / "bank" / "report.json")
    trained = np.ones(bank.codes.shape[0], dtype=bool)
    assert bank.codes.shape == (300, 2)
    # every user of this data set has a training history, so every user has codes
    assert (bank.codes[trained] != UNKNOWN_CODE).all()
    for p, size in enumerate(bank.codebook_sizes):
        assert bank.codes[:, p].max() < size
        assert len(np.unique(bank.codes[:, p])) == size  # balanced codes: every code used
    return report


def test_two_gloo_ranks_match_the_single_process_run(runs: dict[str, Path]) -> None:
    proc = _torchrun(_profile_args(runs["dist"], runs["config"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _check_bank(runs["dist"])
    reference = read_json(runs["single"] / "bank" / "report.json")
    assert report["world_size"] == 2 and len(report["lm_loss_history"]) == TOTAL_STEPS
    got, want = report["recovery"]["profiles"], reference["recovery"]["profiles"]
    assert want["hobby"]["vs"]["hobby"]["nmi"] > 0.2  # the comparison below is not between two zeros
    for profile in ("hobby", "background"):
        for truth in ("hobby", "background"):
            a, b = got[profile]["vs"][truth]["nmi"], want[profile]["vs"][truth]["nmi"]
            assert abs(a - b) <= 0.05, (profile, truth, a, b)
    # each rank wrote its own shard of soft tokens; together they cover every user once
    manifest = read_json(runs["dist"] / "profile" / "profile_manifest.json")
    bounds = manifest["distributed"]["user_bounds"]
    assert bounds[0] == 0 and bounds[-1] == 300 and len(bounds) == 3
    for shard in manifest["distributed"]["shards"]:
        assert (runs["dist"] / "profile" / shard).is_file()
    assert not (runs["dist"] / "profile" / "soft_tokens.safetensors").exists()


def test_killed_rank_then_resume_finishes_with_a_valid_bank(runs: dict[str, Path]) -> None:
    run = runs["killed"]
    killed = _torchrun(_profile_args(run, runs["config"]), kill=(1, 12))
    assert killed.returncode != 0
    assert not (run / "bank").exists()
    commit = read_json(run / "profile" / "checkpoints" / DIST_CHECKPOINTS / COMMIT_FILE)
    assert commit["step"] == 10 and commit["world_size"] == 2  # the last step both ranks had saved
    resumed = _torchrun(_profile_args(run, runs["config"], "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 10" in resumed.stderr
    report = _check_bank(run)
    assert len(report["lm_loss_history"]) == TOTAL_STEPS


def test_resume_with_another_number_of_ranks_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = runs["killed"] / "profile" / "checkpoints" / DIST_CHECKPOINTS / COMMIT_FILE
    if not ckpt.exists():
        pytest.skip("needs the killed run's checkpoints")
    run = tmp_path / "run"
    shutil.copytree(runs["killed"], run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
         "-m", "userip.cli", *_profile_args(run, runs["config"], "--resume", "--distributed")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "DistributedError" in proc.stderr and "same number of ranks" in proc.stderr
    assert "traceback : userip profile: error: DistributedError" in proc.stderr  # torchrun's summary


def test_rank_mismatch_is_the_named_error_on_every_rank_before_any_work(tmp_path: Path) -> None:
    """2 ranks resume a stage checkpointed by 3: each rank stops with the one-line named error and exit code 2
    before loading the LM. torchrun itself exits 1 on any failed worker (it cannot pass the code on) and stops
    the other workers once one failed; its failure summary shows the named error where it would show a
    traceback (``userip.cli`` writes it to the worker's ``TORCHELASTIC_ERROR_FILE``)."""
    from userip.data.schema import Dataset
    from userip.profile.stage import ProfileStageConfig, bind_checkpoints, checkpoint_identity

    run = tmp_path / "run"
    assert userip_main(["prepare", "--source", "synthetic", "--num-users", "30", "--num-items", "12",
                        "--out", str(run)]) == 0  # fmt: skip
    config_file = tmp_path / "profile.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    config = ProfileStageConfig.from_dict(CONFIG)
    bind_checkpoints(run, checkpoint_identity(config, Dataset.load(run / "data"), 3), resume=False)
    proc = _torchrun(_profile_args(run, config_file, "--resume"))
    assert proc.returncode == 1  # torchrun's own code for any failed worker
    lines = [line for line in proc.stderr.splitlines() if line.startswith("userip profile: error: ")]
    assert lines and len(set(lines)) == 1  # one line per rank that got to report, the same on each
    assert "DistributedError" in lines[0] and "3 torch.distributed rank(s)" in lines[0]
    assert "this run is on 2 torch.distributed rank(s)" in lines[0]
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2" in root_cause  # the first worker to end exited with the CLI's error code
    assert "traceback : userip profile: error: DistributedError" in root_cause
    assert proc.stderr.count("Traceback (most recent call last)") <= 1  # torchrun's own; none from a worker
    assert not (run / "lm").exists()  # stopped before the offline LM was built


def test_shard_bounds_balance_examples_and_cover_every_user() -> None:
    users = np.repeat(np.arange(10), [1, 1, 1, 1, 1, 5, 5, 0, 0, 5])  # examples per user
    bounds = shard_bounds(users, 10, 2)
    assert bounds.tolist()[0] == 0 and bounds.tolist()[-1] == 10
    per_rank = [np.sum((users >= a) & (users < b)) for a, b in zip(bounds, bounds[1:])]
    assert per_rank == [10, 10]
    assert shard_bounds(users, 10, 1).tolist() == [0, 10]
    with pytest.raises(DistributedError, match="ranks"):
        shard_bounds(np.array([0, 1]), 2, 3)


def test_local_examples_shift_user_ids(runs: dict[str, Path]) -> None:
    from userip.data.schema import Dataset
    from userip.profile.lm import load_tokenizer
    from userip.prompts import PromptBuilder, PromptConfig, build_examples

    lm_dir = next((runs["single"] / "lm").iterdir())
    builder = PromptBuilder(load_tokenizer(str(lm_dir)), PromptConfig())
    examples = build_examples(Dataset.load(runs["single"] / "data"), builder)
    shard = local_examples(examples, 100, 200)
    assert shard.user_ids.min() == 0 and shard.user_ids.max() == 99 and len(shard) == 100
    first = int(np.flatnonzero(examples.user_ids == 150)[0])
    local = int(np.flatnonzero(shard.user_ids == 50)[0])
    assert np.array_equal(np.asarray(shard[local].input_ids), np.asarray(examples[first].input_ids))
