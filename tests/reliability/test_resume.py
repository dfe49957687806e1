"""Killed and rerun: a ``userip`` command killed at any moment and rerun with the same command ends with the
same artifacts as an uninterrupted run (bit-identical on CPU): soft tokens, bank codes and codebooks, CTR
metrics. The kills land where state is easiest to lose: a checkpoint taken while the codebooks' k-means
initialisation is still collecting samples (``kmeans_init_samples`` 48 > two batches of 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.reliability.reliability_helpers import ERROR_EXIT, snapshot

from userip.cli import main
from userip.feature_bank import FeatureBank
from userip.profile.stage import (
    CHECKPOINT_OWNER_FILE,
    RESUME_IF_SAME,
    ProfileStageConfig,
    bind_checkpoints,
    checkpoint_identity,
    plan_resume,
)
from userip.profile.trainer import ProfileTrainer
from userip.utils.config import ConfigError
from userip.utils.distributed import DistributedError

HERE = Path(__file__).parent
PROFILE_SECTION = """\
  offline_lm: {max_steps: 5, hidden_size: 32, num_layers: 1}
  train: {lr: 0.02, num_epochs: 2, batch_size: 16, progress: false, checkpoint_every: 2}
  quantization: {kmeans_init_samples: 48}
"""
# 60 users, batches of 16: 4 steps per epoch, 8 in all; checkpoints every 2 steps; k-means after step 3.
RUN_YAML = (
    "source_options: {num_users: 60, num_items: 24}\nprofile:\n"
    + PROFILE_SECTION
    + "trainer: {lr: 0.01, max_epochs: 2, min_epochs: 0, patience: 1}\nseeds: [0]\n"
)
PROFILE_YAML = "\n".join(line[2:] for line in PROFILE_SECTION.splitlines()) + "\n"


class _Killed(BaseException):
    """A kill inside this process: not an Exception, so no error path catches it and nothing is saved."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ``userip run`` of the tiny config (its data and offline LM are reused below)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "run.yaml").write_text(RUN_YAML)
    (root / "profile.yaml").write_text(PROFILE_YAML)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", "--config", str(root / "run.yaml"), "--run-dir", str(root / "ref")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "ref"


def _fresh_copy(reference: Path, target: Path) -> Path:
    """Only the data and the offline LM of the reference: every later stage runs again."""
    for part in ("data", "lm"):
        shutil.copytree(reference / part, target / part)
    return target


def _assert_same_artifacts(run: Path, reference: Path) -> None:
    got = load_file(str(run / "profile" / "soft_tokens.safetensors"))
    want = load_file(str(reference / "profile" / "soft_tokens.safetensors"))
    assert torch.equal(got["soft_tokens"], want["soft_tokens"]), (
        f"soft tokens differ by {(got['soft_tokens'] - want['soft_tokens']).abs().max().item():.3g}"
    )
    bank, ref_bank = FeatureBank.load(run / "bank"), FeatureBank.load(reference / "bank")
    assert np.array_equal(bank.codes, ref_bank.codes)
    for a, b in zip(bank.codebooks, ref_bank.codebooks):
        assert np.array_equal(a, b)


def _kill_during_profile(args: list[str], before_step: int) -> subprocess.CompletedProcess:
    """``userip ARGS`` in a child process SIGKILLed just before profile step ``before_step``."""
    paths = os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE.parents[1])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": paths}
    cmd = [sys.executable, str(HERE / "kill_worker.py"), str(before_step), "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_profile_killed_then_resumed_is_bit_identical(reference: Path, tmp_path: Path) -> None:
    run = _fresh_copy(reference, tmp_path / "run")
    args = ["profile", "--run-dir", str(run), "--config", str(reference.parent / "profile.yaml")]
    killed = _kill_during_profile(args, before_step=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = run / "profile" / "checkpoints"
    saved = load_file(str(checkpoint / json.loads((checkpoint / "checkpoint.json").read_text())["tensors"]))
    assert not saved["aux.quantizer.quantizers.0.initialized"]  # killed while k-means collected samples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resumed from step 2" in (run / "logs" / "profile.log").read_text()
    _assert_same_artifacts(run, reference)
    assert 0 < saved["aux.quantizer.quantizers.0.init_samples"].shape[0] < 48  # what resumed them


def test_interrupted_run_continues_its_profile_stage(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`userip run` killed in the profile stage (after its checkpoint at step 4) and rerun: the stage goes on
    from step 4, not from step 0, and every artifact equals the uninterrupted run's."""
    run = _fresh_copy(reference, tmp_path / "run")
    command = ["run", "--config", str(reference.parent / "run.yaml"), "--run-dir", str(run)]
    original = ProfileTrainer._step

    def step(self, group):  # noqa: ANN001, ANN202
        if self.state.step >= 5:
            raise _Killed
        return original(self, group)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(ProfileTrainer, "_step", step)
        with pytest.raises(_Killed):
            main(command)
        monkeypatch.setattr(ProfileTrainer, "_step", original)
        assert not (run / "bank").exists() and (run / "profile" / "checkpoints" / "checkpoint.json").exists()
        assert main(command) == 0
    finally:
        torch.set_num_threads(threads)
    log = (run / "logs" / "run.log").read_text()
    assert "resumed from step 4" in log
    _assert_same_artifacts(run, reference)
    for name in ("dcn-seed0", "dcn+profiles-seed0"):
        got = json.loads((run / "ctr" / name / "metrics.json").read_text())
        assert got["test"] == json.loads((reference / "ctr" / name / "metrics.json").read_text())["test"]


class _Data:
    content_hash = "data-a"


def test_checkpoints_belong_to_the_stage_that_wrote_them(tmp_path: Path) -> None:
    """The resume rule on its own: the same stage continues, another config starts fresh (its checkpoints
    are removed first, so they can never be continued by mistake), and ``--resume`` refuses checkpoints of
    another number of ranks or another data set by name."""
    config_a = ProfileStageConfig()
    config_b = ProfileStageConfig.from_dict({"quantization": {"loss_weight": 0.5}})
    a, b = checkpoint_identity(config_a, _Data()), checkpoint_identity(config_b, _Data())
    folder = tmp_path / "profile" / "checkpoints"
    assert plan_resume(tmp_path, a, RESUME_IF_SAME) is False  # nothing there yet
    bind_checkpoints(tmp_path, a, resume=False)
    (folder / "checkpoint.json").write_text("{}")  # stands for the trainer's checkpoint
    quiet_train = dataclasses.replace(config_a.train, progress=False, log_every=7)  # changes no number
    quiet = checkpoint_identity(dataclasses.replace(config_a, train=quiet_train), _Data())
    assert plan_resume(tmp_path, quiet, RESUME_IF_SAME) is True
    assert plan_resume(tmp_path, b, RESUME_IF_SAME) is False
    bind_checkpoints(tmp_path, b, resume=False)
    assert not (folder / "checkpoint.json").exists()
    assert json.loads((folder / CHECKPOINT_OWNER_FILE).read_text()) == b
    assert plan_resume(tmp_path, b, False) is False
    with pytest.raises(DistributedError, match="one process .* 2 torch.distributed rank"):
        plan_resume(tmp_path, checkpoint_identity(config_b, _Data(), world_size=2), True)
    other = type("Other", (), {"content_hash": "data-b"})()
    with pytest.raises(ConfigError, match="another data set"):
        plan_resume(tmp_path, checkpoint_identity(config_b, other), True)


def test_resume_of_a_distributed_checkpoint_in_one_process_is_a_named_error(run_copy: Path) -> None:
    from userip.data.schema import Dataset

    config = ProfileStageConfig.from_dict({"train": {"progress": False}})
    bind_checkpoints(run_copy, checkpoint_identity(config, Dataset.load(run_copy / "data"), 2), resume=False)
    before = snapshot(run_copy)
    code, err = _run_cli(["profile", "--run-dir", str(run_copy), "--resume"])
    assert code == ERROR_EXIT
    assert "DistributedError" in err and "2 torch.distributed rank(s)" in err
    assert "same number of ranks" in err
    assert "Traceback" not in err
    assert snapshot(run_copy) == before


def test_new_users_rerun_is_a_no_op(run_copy: Path, tmp_path: Path) -> None:
    """`--new-users FILE` run again (after a kill that came after the bank write, or after success) leaves the
    bank as the first run wrote it instead of refusing its own input."""
    path = tmp_path / "new.csv"
    path.write_text("raw_user_id,raw_item_id,rating\nnewbie,i01,5\nnewbie,i02,4\nother,i03,2\nother,i01,5\n")
    command = ["profile", "--run-dir", str(run_copy), "--new-users", str(path)]
    code, err = _run_cli(command)
    assert code == 0, err
    after_first = snapshot(run_copy / "bank")
    codes, known = FeatureBank.load(run_copy / "bank").lookup_raw(["newbie", "other"])
    assert known.all()
    code, err = _run_cli(command)
    assert code == 0, err
    assert "Traceback" not in err
    assert snapshot(run_copy / "bank") == after_first
    again, _ = FeatureBank.load(run_copy / "bank").lookup_raw(["newbie", "other"])
    assert np.array_equal(again, codes)


def _run_cli(args: list[str]) -> tuple[int, str]:
    """``userip ARGS`` in this process; (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()
