"""`userip run` end to end on a tiny synthetic setting (every stage runs for real)."""

import json

import pandas as pd
import pytest

from userip.cli import main
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.pipeline.run import run_pipeline
from userip.utils.config import ConfigError

from .conftest import tiny_config


def test_every_stage_writes_its_artifacts(tiny_run):
    run_dir, summary = tiny_run
    for path in (
        "data/manifest.json",
        "profile/soft_tokens.safetensors",
        "profile/aux.safetensors",
        "bank/report.json",
        "results/summary.md",
        "results/summary.json",
        "results/results.csv",
        "logs",
    ):
        assert (run_dir / path).exists(), path
    assert list((run_dir / "lm").iterdir()), "the offline LM is cached in RUN/lm"
    dataset = Dataset.load(run_dir)
    bank = FeatureBank.load(run_dir / "bank", expected_dataset_hash=dataset.content_hash)
    assert bank.profile_names == ["hobby", "background"]
    assert bank.codebook_sizes == [4, 3]
    codes = bank.lookup(dataset.users["user_id"].to_numpy())
    assert codes.shape == (dataset.num_users, 2)
    assert ((codes >= -1) & (codes < [4, 3])).all()


def test_summary_compares_dcn_with_and_without_profiles(tiny_run):
    run_dir, summary = tiny_run
    results = pd.read_csv(run_dir / "results" / "results.csv")
    assert sorted(results["model"]) == ["DCN", "UserIP-DCN"]
    assert results["auc"].between(0, 1).all() and (results["logloss"] > 0).all()
    md = (run_dir / "results" / "summary.md").read_text()
    assert "| DCN |" in md and "| UserIP-DCN |" in md and "RelaImpr AUC" in md
    # Recovery against the synthetic generator's true profiles is part of the summary.
    assert "hobby" in json.dumps(summary["recovery"])


def test_rerun_reuses_finished_stages(tiny_run):
    run_dir, _ = tiny_run
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "bank").rglob("*") if p.is_file()}
    ctr_metrics = sorted((run_dir / "ctr").rglob("metrics.json"))
    ctr_mtimes = [p.stat().st_mtime_ns for p in ctr_metrics]
    run_pipeline(tiny_config(run_dir))
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert [p.stat().st_mtime_ns for p in ctr_metrics] == ctr_mtimes


def test_unknown_config_key_fails_before_any_work(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("run_dir: x\nseedz: [1]\n")
    assert main(["run", "--config", str(config)]) == 2
    out = capsys.readouterr().out
    assert "seedz" in out and "seeds" in out
    assert not (tmp_path / "x").exists()


def test_unknown_model_fails_naming_accepted_values(tmp_path):
    with pytest.raises(ConfigError, match="ctr_model.*dcn"):
        tiny_config(tmp_path, ctr_model="nope")
