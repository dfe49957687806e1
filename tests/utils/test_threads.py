"""userip.utils.threads: usable CPUs, threads from work size, overrides, the CLI's wait policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from userip.cli import main
from userip.ctr.features import FeatureMap, Field
from userip.ctr.models import build_model
from userip.ctr.trainer import CTRTrainerConfig, Trainer
from userip.utils import threads
from userip.utils.config import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_usable_cpus_is_the_affinity_mask_bounded_by_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    no_file = tmp_path / "missing"
    assert threads.usable_cpus(no_file) == 8
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert threads.usable_cpus(quota) == 8
    quota.write_text("250000 100000\n")  # docker --cpus 2.5: three threads can be busy
    assert threads.usable_cpus(quota) == 3
    quota.write_text("20000 100000\n")  # a fifth of a CPU still gets one thread
    assert threads.usable_cpus(quota) == 1
    quota.write_text("garbage")
    assert threads.usable_cpus(quota) == 8


def test_usable_cpus_are_shared_among_local_torchrun_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.usable_cpus(tmp_path / "missing") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert threads.usable_cpus(tmp_path / "missing") == 1


@pytest.mark.parametrize(
    ("flops", "cpus", "expected"),
    [(1e7, 16, 1), (0.0, 16, 1), (2.5e9, 16, 2), (3e12, 16, 16), (3e12, 2, 2), (5e9, 1, 1)],
)
def test_threads_for_work_gives_one_thread_per_grain_within_the_cpus(flops, cpus, expected):
    assert threads.threads_for_work(flops, cpus) == expected


def test_requested_threads_reads_the_override_and_refuses_nonsense(monkeypatch):
    assert threads.requested_threads() is None
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.requested_threads() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(threads.THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=threads.THREADS_ENV):
            threads.requested_threads()


def test_set_intra_op_threads_precedence(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.set_intra_op_threads(None, 1e6, "tiny") == 1
    assert torch.get_num_threads() == 1
    assert threads.set_intra_op_threads(None, 1e13, "big") == 2
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.set_intra_op_threads(None, 1e13, "big, overridden") == 1
    assert threads.set_intra_op_threads(2, 1e6, "stage setting wins") == 2
    assert torch.get_num_threads() == 2


def test_dense_flops_per_row_counts_non_embedding_parameters():
    model = nn.Sequential(nn.Embedding(1000, 4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    dense = (4 * 3 + 3) + (3 * 1 + 1)  # the two Linear layers; the 4,000 embedding entries are lookups
    assert threads.dense_flops_per_row(model) == 3 * 2 * dense


def test_ctr_trainer_runs_a_small_model_on_one_thread_unless_asked(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    model = build_model("dcn", FeatureMap((Field("user", 50), Field("item", 30))), embedding_dim=4)
    torch.set_num_threads(2)
    Trainer(model, CTRTrainerConfig(batch_size=256))
    assert torch.get_num_threads() == 1  # a DCN step is far below one thread's grain
    Trainer(model, CTRTrainerConfig(batch_size=256, num_threads=2))
    assert torch.get_num_threads() == 2


def test_prefer_passive_wait_keeps_a_users_setting(monkeypatch):
    monkeypatch.delenv(threads.WAIT_POLICY_ENV, raising=False)
    threads.prefer_passive_wait()
    assert os.environ[threads.WAIT_POLICY_ENV] == "PASSIVE"
    monkeypatch.setenv(threads.WAIT_POLICY_ENV, "ACTIVE")
    threads.prefer_passive_wait()
    assert os.environ[threads.WAIT_POLICY_ENV] == "ACTIVE"


def test_the_cli_sets_the_wait_policy_before_torch_is_imported():
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it: importing the CLI must not load torch.
    code = "import sys, userip.cli; assert 'torch' not in sys.modules, 'userip.cli imported torch'"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_cli_threads_flag_sets_the_override_and_refuses_zero(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0", "train", "--help"])
    assert exc.value.code == 2
    assert "positive whole number" in capsys.readouterr().err
    monkeypatch.setenv(threads.THREADS_ENV, "")  # restored after the test: main sets it for the process
    # No data there: a named error, after the override was set.
    assert main(["--threads", "3", "train", "--run-dir", str(tmp_path / "no_run")]) == 2
    assert os.environ[threads.THREADS_ENV] == "3"
