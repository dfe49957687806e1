"""CTR training with DistributedDataParallel (``userip train`` under torchrun, 2 gloo CPU processes).

The planted-parity data set of tests/ctr is trained once by 2 ranks and once in this process with the same
settings (global batch, lr, seed, user_id_dropout). The 2-rank run must write the single-process artifacts
once, its saved weights must reproduce its reported test AUC, and its AUC must be close to the single-process
run's. In-process checks: the row split reproduces the single-process batches, a 1-rank DDP trainer gives the
single-process trainer's numbers bit for bit, and a batch size the ranks cannot split is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from tests.ctr.test_trainer import SMALL_DCN, feature_map, planted_dataset, planted_split

from userip.cli import main as userip_main
from userip.ctr.calibration import split_calibration
from userip.ctr.data import build_ctr_data
from userip.ctr.distributed import DistributedTrainer, shard_rows
from userip.ctr.features import FeatureMap
from userip.ctr.models import build_model
from userip.ctr.recipe import train_ctr
from userip.ctr.trainer import CTRTrainerConfig, Trainer, parameter_groups, predict_probs
from userip.data.schema import Dataset
from userip.evaluation import auc
from userip.feature_bank import FeatureBank
from userip.utils.distributed import DistContext
from userip.utils.io import read_json

HERE = Path(__file__).parent
# Global batch 128 = 2 ranks x 64; 1,588 training rows: 13 steps per epoch, the last 52 rows (26 per rank).
TRAINER = {"lr": 0.02, "batch_size": 128, "max_epochs": 6, "patience": 2, "user_id_dropout": 0.1}
ARTIFACTS = {"model.safetensors", "feature_map.json", "encoder.json", "config.json", "metrics.json"}
# The 2 ranks train on exactly the single-process run's batches (shard_rows; same permutation and dropped
# user ids) and DDP averages the two half-batch mean gradients, which is the batch's mean gradient: the runs
# differ by float summation order only. Measured: test AUC equal to 1e-15, Logloss to 1e-7, train losses to
# 1e-5 relative. 0.005 AUC (about one test pair in 200 flipped) leaves room for float noise on other CPUs
# and torch builds; the train-loss check catches ranks that train on the wrong rows or skip the all-reduce.
AUC_TOLERANCE = 0.005
LOSS_RTOL = 1e-4


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "userip.cli", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def make_ctr_run(run: Path, trainer: dict) -> Path:
    """RUN/data (planted parity), RUN/bank whose one profile is the planted factor (user parity), and
    RUN/model.yaml (the small DCN, ``trainer``)."""
    ds = planted_dataset()
    ds.save(run / "data")
    num_users = len(ds.users)
    FeatureBank.build(
        profile_names=["parity"],
        codebooks=[np.eye(2, 4, dtype=np.float32)],
        codes=(np.arange(num_users) % 2).reshape(-1, 1),
        raw_user_ids=ds.users["raw_user_id"].tolist(),
        dataset_hash=ds.content_hash,
    ).write(run / "bank")
    model = {**SMALL_DCN, "hidden_units": [8]}
    (run / "model.yaml").write_text(yaml.safe_dump({"model": model, "trainer": trainer}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ctr_run(tmp_path_factory.mktemp("ctr_ddp"), TRAINER)


def _train_args(run: Path, *extra: str) -> list[str]:
    return ["train", "--model", "dcn", "--run-dir", str(run), "--with-profiles", "--model-config",
            str(run / "model.yaml"), "--no-progress", *extra]  # fmt: skip


def test_two_gloo_ranks_write_single_process_artifacts_and_match_its_auc(
    run_dir: Path, tmp_path: Path
) -> None:
    proc = _torchrun(_train_args(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| split | AUC | Logloss |") == 1  # rank 0 alone prints

    out = run_dir / "ctr" / "dcn+profiles"
    assert [p.name for p in (run_dir / "ctr").iterdir()] == ["dcn+profiles"]
    assert {p.name for p in out.iterdir()} == ARTIFACTS  # no temporary or per-rank files
    assert (run_dir / "logs" / "train.log").is_file() and (run_dir / "logs" / "train.rank1.log").is_file()
    metrics, config = read_json(out / "metrics.json"), read_json(out / "config.json")
    assert metrics["fields"] == ["user_id", "item_id", "parity"]
    assert config["trainer"]["batch_size"] == 128 and config["trainer"]["user_id_dropout"] == 0.1
    assert len(metrics["history"]) >= 3 and all(r["train_loss"] > 0 for r in metrics["history"])

    # The saved weights alone (keys without DDP's `module.`) reproduce the reported test AUC.
    calibration, state = split_calibration(load_file(str(out / "model.safetensors")))
    assert not any(k.startswith("module.") for k in state)
    assert calibration is not None and metrics["calibration"] == dataclasses.asdict(calibration)
    model = build_model(config["model"], FeatureMap.from_dict(read_json(out / "feature_map.json")),
                        **config["model_config"])  # fmt: skip
    model.load_state_dict(state)
    dataset = Dataset.load(run_dir)
    test = build_ctr_data(dataset, FeatureBank.load(run_dir / "bank"))["test"]
    reloaded = auc(test.labels.numpy(), predict_probs(model, test.x_ids))
    assert reloaded == pytest.approx(metrics["test"]["auc"], abs=1e-9)

    # The single-process run with the same settings, in this process.
    single = train_ctr(
        run_dir,
        "dcn",
        with_profiles=True,
        model_config={**SMALL_DCN},
        config=CTRTrainerConfig(**TRAINER),
        output_dir=tmp_path / "single",
    )
    assert single.test["auc"] > 0.75  # the comparison below is between two trained models
    assert abs(metrics["test"]["auc"] - single.test["auc"]) <= AUC_TOLERANCE, (metrics["test"], single.test)
    got, want = metrics["valid"]["auc"], single.valid["auc"]
    assert abs(got - want) <= AUC_TOLERANCE, (got, want)
    np.testing.assert_allclose(
        [r["train_loss"] for r in metrics["history"]],
        [r.train_loss for r in single.fit.history],
        rtol=LOSS_RTOL,
    )


def test_warm_start_trains_its_base_model_distributed_too(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in ("data", "bank"):
        shutil.copytree(run_dir / name, run / name)
    trainer = {**TRAINER, "max_epochs": 3, "warm_start": True}
    model = {**SMALL_DCN, "hidden_units": [8]}
    (run / "model.yaml").write_text(yaml.safe_dump({"model": model, "trainer": trainer}))
    proc = _torchrun(_train_args(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "ctr" / "dcn+profiles"
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    metrics = read_json(out / "metrics.json")
    single = train_ctr(
        run,
        "dcn",
        with_profiles=True,
        model_config={**SMALL_DCN},
        config=CTRTrainerConfig(**trainer),
        save=False,
    )
    # epoch 0 is the extended base model: the base was trained by the 2 ranks as the single process trains it
    assert metrics["history"][0]["epoch"] == 0 and metrics["history"][0]["train_loss"] is None
    got, want = metrics["history"][0]["valid_auc"], single.fit.history[0].valid_auc
    assert abs(got - want) <= AUC_TOLERANCE, (got, want)
    assert metrics["valid"]["auc"] >= got  # a warm start never ends below its start on validation
    assert abs(metrics["test"]["auc"] - single.test["auc"]) <= AUC_TOLERANCE, (metrics["test"], single.test)


def test_batch_size_the_ranks_cannot_split_is_refused(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # torchrun's environment for rank 0 of 2: the check runs before the process group is joined.
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert userip_main(_train_args(run_dir, "--batch-size", "129")) == 2
    err = capsys.readouterr().err
    assert "userip train: error: DistributedError: batch_size 129 is not divisible by the 2 ranks" in err
    assert "Traceback" not in err


def test_shard_rows_split_each_single_process_batch_over_the_ranks() -> None:
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    batch = 8
    for world in (2, 4):
        shards = [shard_rows(perm, r, world) for r in range(world)]
        assert {len(s) for s in shards} == {-(-103 // world)}  # equal shards: equal step counts
        local = batch // world
        steps = -(-103 // batch)
        assert all(-(-len(s) // local) == steps for s in shards)
        for b in range(steps):
            together = torch.cat([s[b * local : (b + 1) * local] for s in shards])
            expected = perm[b * batch : (b + 1) * batch]
            assert set(expected.tolist()) <= set(together.tolist())  # the single-process batch b ...
            assert set(together.tolist()) - set(expected.tolist()) <= set(perm[: (-103) % world].tolist())
    both = torch.cat([shard_rows(perm, r, 2) for r in range(2)])
    assert len(both) == 104 and torch.equal(torch.unique(both), torch.arange(103))  # + 1 wrapped row


@pytest.fixture
def one_rank_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistContext(0, 1, 0, "gloo", torch.device("cpu"))
    dist.destroy_process_group()


def test_one_rank_ddp_trainer_reproduces_the_single_process_trainer(one_rank_group: DistContext) -> None:
    """With one rank DDP's averaged gradient is the gradient: every number must be bit for bit the same,
    which checks that the hooks (rows, batch size, wrapped forward, loss, evaluation) keep the single-process
    arithmetic."""
    train, valid = planted_split(600, 0), planted_split(200, 1)
    config = CTRTrainerConfig(lr=0.02, batch_size=64, max_epochs=3, patience=1, user_id_dropout=0.2)
    runs = []
    for make in (Trainer, lambda m, c: DistributedTrainer(m, c, ctx=one_rank_group)):
        torch.manual_seed(0)
        trainer = make(build_model("dcn", feature_map(), **SMALL_DCN), config)
        runs.append((trainer.fit(train, valid), trainer.model.state_dict()))
    (fit_a, state_a), (fit_b, state_b) = runs
    assert [(r.train_loss, r.valid_auc, r.valid_logloss) for r in fit_a.history] == [
        (r.train_loss, r.valid_auc, r.valid_logloss) for r in fit_b.history
    ]
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # parameter_groups looks through the DDP wrapper for the model's embedding_parameters hook
    wrapped = DistributedTrainer(build_model("dcn", feature_map(), **SMALL_DCN), config, ctx=one_rank_group)
    groups = parameter_groups(wrapped.ddp, weight_decay=0.1, embedding_weight_decay=0.01)
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert [id(p) for p in by_decay[0.01]] == [id(p) for p in wrapped.model.embedding_parameters()]


def test_sparse_embeddings_all_reduce_as_sparse_and_match_the_single_process_run(
    run_dir: Path, tmp_path: Path
) -> None:
    """``sparse_embeddings``: DDP all-reduces the tables' sparse gradients (only the rows in the batches);
    the 2 ranks must still train the single-process run's model (same batches, averaged gradients)."""
    run = tmp_path / "run"
    for name in ("data", "bank"):
        shutil.copytree(run_dir / name, run / name)
    trainer = {**TRAINER, "max_epochs": 3, "sparse_embeddings": True}
    model = {**SMALL_DCN, "hidden_units": [8]}
    (run / "model.yaml").write_text(yaml.safe_dump({"model": model, "trainer": trainer}))
    proc = _torchrun(_train_args(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_json(run / "ctr" / "dcn+profiles" / "metrics.json")
    single = train_ctr(
        run, "dcn", with_profiles=True, model_config=model, config=CTRTrainerConfig(**trainer), save=False
    )
    np.testing.assert_allclose(
        [r["train_loss"] for r in metrics["history"]],
        [r.train_loss for r in single.fit.history],
        rtol=LOSS_RTOL,
    )
    assert abs(metrics["test"]["auc"] - single.test["auc"]) <= AUC_TOLERANCE, (metrics["test"], single.test)
