"""The no-LM profile mode (``lm: none``, ``userip.profile.no_lm``): no LM is resolved, loaded or run; only the
surrogate + VQ loss moves the table; codes, new users, without-VQ and requantize work; the distributed stage
refuses it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from userip.cli import main as userip_main
from userip.data.schema import Dataset
from userip.feature_bank import KIND_CONTINUOUS, UNKNOWN_CODE, FeatureBank
from userip.lm.offline_config import OfflineLMConfig
from userip.profile import recipe as recipe_module
from userip.profile import stage as stage_module
from userip.profile.distributed import run_profile_stage_distributed
from userip.profile.no_lm import NoLMError, initial_table, setup_without_lm, user_examples
from userip.profile.recipe import load_soft_tokens
from userip.profile.requantize import requantize
from userip.profile.stage import (
    ProfileStageConfig,
    _profile_config,
    add_new_users,
    checkpoint_identity,
    reopen_profile,
    run_profile_stage,
)
from userip.prompts import PromptConfig
from userip.utils.config import ConfigError
from userip.utils.io import read_json

NUM_EPOCHS, BATCH_SIZE = 3, 16


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic run (60 users, 24 items): ``RUN/data`` only."""
    run = tmp_path_factory.mktemp("no_lm") / "prepared"
    argv = ["prepare", "--source", "synthetic", "--num-users", "60", "--num-items", "24", "--out", str(run)]
    assert userip_main(argv) == 0
    return run


def _config(lm: str = "none", **quantization) -> ProfileStageConfig:
    return ProfileStageConfig.from_dict(
        {
            "lm": {"name_or_path": lm},
            "train": {"num_epochs": NUM_EPOCHS, "batch_size": BATCH_SIZE, "progress": False},
            "quantization": {"kmeans_init_samples": 16, "loss_weight": 1.0, **quantization},
            "offline_lm": {"max_steps": 20, "hidden_size": 32, "num_layers": 1},
        }
    )


def _fresh_run(prepared_run: Path, tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(prepared_run / "data", run / "data")
    return run


@pytest.fixture
def no_lm_loads(monkeypatch) -> None:
    """Every way the profile stage resolves or loads an LM fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the no-LM mode resolved or loaded an LM")

    for module, name in [
        (stage_module, "resolve_stage_lm"),
        (stage_module, "resolve_lm"),
        (recipe_module, "load_causal_lm"),
        (recipe_module, "load_tokenizer"),
        (stage_module, "setup"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("userip.profile.lm.load_causal_lm", forbidden)
    monkeypatch.setattr("userip.profile.lm.load_tokenizer", forbidden)


def test_stage_runs_without_an_lm_and_writes_codes(prepared_run, tmp_path, no_lm_loads, single_thread):
    run = _fresh_run(prepared_run, tmp_path)
    config = _config()
    result = run_profile_stage(run, config)
    dataset = Dataset.load(run / "data")
    assert not (run / "lm").exists()  # nothing resolved into RUN/lm
    soft_tokens, trained, manifest = load_soft_tokens(run)
    # the table the default offline LM would give: (users, slots, offline_lm.hidden_size)
    assert soft_tokens.shape == (dataset.num_users, config.prompt.num_slots, 32)
    with_rows = np.unique(dataset.profile_rows()["user_id"])
    assert np.array_equal(np.flatnonzero(trained.numpy()), with_rows)
    bank = FeatureBank.load(run / "bank")
    assert (bank.codes[with_rows] != UNKNOWN_CODE).all()
    steps = NUM_EPOCHS * int(np.ceil(len(with_rows) / BATCH_SIZE))
    assert result.steps == steps and result.lm_path == "none" and result.final_lm_loss is None
    report = read_json(run / "bank" / "report.json")
    assert report["lm_loss_history"] == [] and len(report["objective_loss_history"]) == steps
    assert manifest["lm"] == "none" and manifest["final_lm_loss"] is None
    assert read_json(run / "profile" / "stage_config.json")["lm_path"] == "none"
    with pytest.raises(ConfigError, match="used no LM"):  # explanations etc. need an LM: a named error
        reopen_profile(run)


def test_lambda_zero_keeps_the_start_and_lambda_only_switches_the_objective_on(
    prepared_run, tmp_path, no_lm_loads, single_thread
):
    dataset = Dataset.load(prepared_run / "data")
    tables = {}
    for loss_weight in (0.0, 0.001, 1.0):
        run = _fresh_run(prepared_run, tmp_path, f"lambda-{loss_weight}")
        run_profile_stage(run, _config(loss_weight=loss_weight))
        tables[loss_weight] = load_soft_tokens(run)[0]
    # the start, drawn independently: N(0, 0.02^2) (the offline LM's embedding init), seeded by train.seed
    start = torch.randn(dataset.num_users, 2, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    assert torch.allclose(
        initial_table(dataset.num_users, PromptConfig(), OfflineLMConfig(hidden_size=32), 0).weight, start
    )
    assert torch.equal(tables[0.0], start)  # no LM term, no objective: nothing moves the rows
    assert (tables[1.0] - start).abs().max() > 0.01  # the surrogate + VQ loss moves them
    # the loss is divided by lambda: the paper's 0.001 trains the same rows as 1.0 (Adam's eps would not)
    assert torch.allclose(tables[0.001], tables[1.0], atol=1e-6)


def test_new_users_are_fitted_without_an_lm(prepared_run, tmp_path, no_lm_loads, single_thread):
    run = _fresh_run(prepared_run, tmp_path)
    run_profile_stage(run, _config())
    dataset = Dataset.load(run / "data")
    before = FeatureBank.load(run / "bank")
    raw_items = dataset.items["raw_item_id"].astype(str).tolist()
    new_file = tmp_path / "new.csv"
    pd.DataFrame(
        {
            "raw_user_id": ["new-a", "new-a", "new-a", "new-b", "new-b"],
            "raw_item_id": [raw_items[0], raw_items[1], raw_items[2], raw_items[5], raw_items[7]],
            "rating": [5.0, 4.0, 1.0, 2.0, 5.0],
        }
    ).to_csv(new_file, index=False)
    updated = add_new_users(run, new_file)
    codes, known = updated.lookup_raw(["new-a", "new-b"])
    assert known.all() and (codes != UNKNOWN_CODE).all()
    assert np.array_equal(updated.lookup(np.arange(dataset.num_users)), before.codes)  # others unchanged


def test_without_vq_and_requantize_work_without_an_lm(prepared_run, tmp_path, no_lm_loads, single_thread):
    run = _fresh_run(prepared_run, tmp_path)
    config = _config(without_vq=True)
    run_profile_stage(run, config)
    assert FeatureBank.load(run / "bank").kind == KIND_CONTINUOUS
    dataset = Dataset.load(run / "data")
    start = initial_table(dataset.num_users, config.prompt, config.offline_lm, 0).weight
    assert (load_soft_tokens(run)[0] - start).abs().max() > 0.01  # the surrogate alone moved the rows
    bank = requantize(run, dataset, config, config.quantization, [3, 2], tmp_path / "requantized", epochs=2)
    assert bank.codes.shape == (dataset.num_users, 2)


def test_random_lm_and_no_lm_differ(prepared_run, tmp_path, single_thread):
    tables, identities = {}, {}
    for lm in ("none", "random"):
        run = _fresh_run(prepared_run, tmp_path, lm)
        run_profile_stage(run, _config(lm))
        tables[lm] = load_soft_tokens(run)[0]
        identities[lm] = checkpoint_identity(_config(lm), Dataset.load(run / "data"))
    assert (tmp_path / "random" / "lm").exists() and not (tmp_path / "none" / "lm").exists()
    assert tables["none"].shape == tables["random"].shape  # same table shape: only the LM term differs
    assert (tables["none"] - tables["random"]).abs().max() > 0.01
    assert identities["none"] != identities["random"]  # checkpoints (and cache keys) tell them apart


def test_the_distributed_stage_refuses_no_lm(prepared_run, tmp_path):
    with pytest.raises(NoLMError, match="lm none is single-process only"):
        run_profile_stage_distributed(_fresh_run(prepared_run, tmp_path), _config())


def test_review_targets_and_users_without_rows(prepared_run):
    dataset = Dataset.load(prepared_run / "data")
    config = ProfileStageConfig.from_dict(
        {"lm": {"name_or_path": "none"}, "prompt": {"target_mode": "review"}}
    )
    with pytest.raises(NoLMError, match="target_mode 'review'"):
        setup_without_lm(dataset, _profile_config(config, "none"), config.offline_lm)
    examples = user_examples(dataset)
    assert np.array_equal(examples.user_ids, np.unique(dataset.profile_rows()["user_id"]))
    assert examples.subset([int(examples.user_ids[0])]).user_ids.tolist() == [int(examples.user_ids[0])]
