"""`userip run` end to end on a tiny synthetic setting (every stage runs for real)."""

import json
import shutil

import pandas as pd
import pytest

from userip.cli import main
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.pipeline.run import run_pipeline
from userip.utils.config import ConfigError

from .conftest import new_user_rows, tiny_config


def test_every_stage_writes_its_artifacts(tiny_run):
    run_dir, summary = tiny_run
    for path in (
        "data/manifest.json",
        "profile/soft_tokens.safetensors",
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


def test_changed_trainer_retrains_ctr_but_keeps_the_bank(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    bank_mtimes = {p: p.stat().st_mtime_ns for p in (copy / "bank").rglob("*") if p.is_file()}
    config = tiny_config(copy, trainer={"max_epochs": 2, "min_epochs": 0, "patience": 1})
    run_pipeline(config)
    assert {p: p.stat().st_mtime_ns for p in bank_mtimes} == bank_mtimes
    for saved in (copy / "ctr").rglob("config.json"):
        assert json.loads(saved.read_text())["trainer"]["max_epochs"] == 2


def test_unknown_config_key_fails_before_any_work(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("run_dir: x\nseedz: [1]\n")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err  # userip.cli reports every command's error on stderr
    assert "seedz" in err and "seeds" in err
    assert not (tmp_path / "x").exists()


def test_unknown_model_fails_naming_accepted_values(tmp_path):
    with pytest.raises(ConfigError, match="ctr_model.*dcn"):
        tiny_config(tmp_path, ctr_model="nope")


def test_new_users_are_upserted_without_retraining_anyone(tiny_run, tmp_path):
    # Last in this module: it adds a bank version to the shared tiny run.
    run_dir, _ = tiny_run
    dataset = Dataset.load(run_dir)
    before = FeatureBank.load(run_dir / "bank")
    known = dataset.users["raw_user_id"].iloc[0]
    first_item = dataset.items["raw_item_id"].iloc[0]
    rows = new_user_rows(dataset) + [{"raw_user_id": known, "raw_item_id": first_item, "rating": 4}]
    path = tmp_path / "new.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    assert main(["profile", "--run-dir", str(run_dir), "--new-users", str(path)]) == 0
    after = FeatureBank.load(run_dir / "bank")
    assert after.version != before.version
    codes, known_mask = after.lookup_raw(["new0", "new1", "new2"])
    assert known_mask.all() and ((codes >= 0) & (codes < [4, 3])).all()
    # Everyone already in the bank keeps exactly their IDs.
    old_ids = dataset.users["user_id"].to_numpy()
    assert (after.lookup(old_ids) == before.lookup(old_ids)).all()


def test_summary_reports_relative_improvement_and_paired_p_value():
    from scipy import stats

    from userip.pipeline.run import PipelineConfig, summarize

    results = pd.DataFrame(
        {
            "model": ["DCN", "UserIP-DCN"] * 3,
            "seed": [0, 0, 1, 1, 2, 2],
            "auc": [0.70, 0.72, 0.71, 0.74, 0.69, 0.70],
            "logloss": [0.60, 0.58, 0.59, 0.57, 0.61, 0.60],
        }
    )
    md, summary = summarize(results, {}, PipelineConfig(seeds=[0, 1, 2]))
    ours = [0.72, 0.74, 0.70]
    base = [0.70, 0.71, 0.69]
    expected_p = stats.ttest_rel(ours, base).pvalue
    expected_impr = (sum(ours) / 3 - 0.5) / (sum(base) / 3 - 0.5) - 1
    row = next(line for line in md.splitlines() if line.startswith("| UserIP-DCN"))
    assert f"{expected_p:.3g}" in row
    assert f"{100 * expected_impr:+.2f}%" in row


def test_explain_attention_writes_heat_maps_and_numbers(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    png = tmp_path / "fig7.png"
    code = main(["explain", "--run-dir", str(run_dir), "--attention", "--limit", "3", "--out", str(png)])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(png.with_suffix(".csv"))
    assert len(table) == 2 * 3 * 2  # (before, after) x users x (hobby, background)
    weights = table.drop(columns=["when", "user", "profile"]).to_numpy()
    assert weights.min() >= 0.0 and weights.max() == 1.0  # scaled to [0, 1] per row
    assert "after" in capsys.readouterr().out
    assert main(["explain", "--run-dir", str(run_dir), "--attention", "--users", "nobody"]) == 2


def test_set_overrides_reach_the_config_and_a_bad_one_exits_2(tmp_path, capsys):
    from userip.cli import build_parser
    from userip.pipeline.cli import build_config

    args = build_parser(only="run").parse_args(
        ["run", "--run-dir", str(tmp_path), "--set", "trainer.lr=0.02", "--set", "profile.train.num_epochs=2"]
    )
    config = build_config(args)
    assert config.trainer.lr == 0.02 and config.profile.train.num_epochs == 2
    assert main(["run", "--run-dir", str(tmp_path), "--set", "trainer.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # it failed before any work
