"""`userip experiment` on the tiny run: tables, plots, resume, and config validation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from userip.data.schema import Dataset
from userip.evaluation.metrics import paired_test
from userip.pipeline.experiment import ExperimentConfig, run_experiment
from userip.utils.config import ConfigError, apply_overrides, from_dict, load_yaml

from ..baselines.conftest import make_tiny_lm
from .conftest import TINY


@pytest.fixture(scope="module")
def tiny_experiment(tiny_run, tmp_path_factory):
    run_dir, _ = tiny_run
    data = {
        **{k: v for k, v in TINY.items() if k != "seeds"},
        "name": "tiny",
        "run_dir": str(run_dir),
        "out_dir": str(tmp_path_factory.mktemp("experiment")),
        "seeds": [0, 1],
        "tables": ["table2", "table3", "figure5"],
        "baselines": ["lr", "dcn"],
        "hobby_sizes": [4, 6],
        "requantize_epochs": 2,
        "trainer_search": {"grid": {"lr": [1e-3, 3e-2]}, "seeds": [0, 1, 2]},
    }
    config = from_dict(ExperimentConfig, data, "tiny experiment")
    return config, run_experiment(config)


def test_tables_plots_and_numbers(tiny_experiment):
    config, out = tiny_experiment
    out_dir = config.output_dir
    md = (out_dir / "tables.md").read_text()
    for heading in ("Table 2", "Table 3", "Figure5"):
        assert heading in md
    assert (out_dir / "figure5_hobby_codebook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = pd.read_csv(out_dir / "results.csv")
    # 2 seeds x (lr, dcn, UserIP-DCN, w/o VQ, hobby6): hobby4 is the main bank, trained once.
    assert len(results) == 2 * 5
    table2 = pd.DataFrame(out["tables"]["table2"]).set_index("model")
    ours = results[(results.model == "dcn") & (results.variant == "userip")].sort_values("seed")
    base = results[(results.model == "dcn") & (results.variant == "base")].sort_values("seed")
    assert np.isclose(table2.loc["UserIP-DCN", "auc_mean"], ours["auc"].mean())
    expected_p = paired_test(ours["auc"].to_numpy(), base["auc"].to_numpy()).t_pvalue
    assert table2.loc["UserIP-DCN", "p (paired t vs DCN, AUC)"] == f"{expected_p:.3g}"
    # Logloss is calibrated on validation; the raw one is kept in the cells and beside it in the tables.
    assert results["logloss_raw"].notna().all() and (results["logloss"] != results["logloss_raw"]).any()
    assert np.isclose(
        table2.loc["UserIP-DCN", "logloss_raw_mean"], ours["logloss_raw"].mean()
    ) and np.isclose(table2.loc["UserIP-DCN", "logloss_mean"], ours["logloss"].mean())
    # Best cell bold, second best underlined, in each metric column.
    assert md.count("**") >= 4 and "<u>" in md


def test_trainer_search_keeps_the_simplest_within_noise_and_uses_it(tiny_experiment):
    config, out = tiny_experiment
    search = pd.read_csv(config.output_dir / "trainer_search.csv")
    # 4 rows (LR, DCN, UserIP-DCN, w/o VQ; hobby6 reuses UserIP-DCN's choice) x 2 candidates.
    assert len(search) == 4 * 2 and set(search.lr) == {1e-3, 3e-2}
    threshold = config.trainer_search.se_threshold
    for _, group in search.groupby(["model", "variant"], sort=False):
        assert group.chosen.sum() == 1
        best = group[group.seeds_run == 3].valid_auc_mean.idxmax()
        assert group.gap_to_best[best] == 0
        within = (group.seeds_run == 3) & (group.gap_to_best <= threshold * group.gap_se)
        assert list(group.within_noise) == list(within)
        assert group.index[group.chosen][0] == group.index[within][0]  # the simplest within noise
    assert "Trainer settings chosen on validation AUC" in out["markdown"]
    assert len(out["tables"]["trainer_search"]) == 4
    # The chosen candidate's search cells of seeds 0 and 1 are the final cells of those seeds.
    cells = len(list((config.output_dir / "cells").glob("*.json")))
    assert cells == 10 + search.seeds_run.sum() - 4 * 2


def test_rerun_skips_finished_cells(tiny_experiment):
    config, _ = tiny_experiment
    cells = sorted((config.output_dir / "cells").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in cells]
    run_experiment(config)
    assert [p.stat().st_mtime_ns for p in cells] == mtimes


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"baselines": ["dcn", "xgboost"]}, "xgboost"),
        ({"tables": ["table9"]}, "table9"),
        ({"hobby_sizes": [1]}, "codebook size"),
        ({"sources": "x"}, "sources"),
        ({"source": "netflix"}, "netflix"),
        ({"trainer_search": {"grid": {"momentum": [0.9]}}}, "momentum"),
        ({"trainer_search": {"grid": {"lr": []}}}, "trainer_search.grid.lr"),
        ({"trainer_search": {"grid": {"lr": [-1.0]}}}, "CTRTrainerConfig.lr must be a finite number > 0"),
        ({"trainer_search": {"grid": {"lr": [1e-3]}, "seeds": [0, 1]}}, "at least 3 distinct seeds"),
        ({"trainer_search": {"se_threshold": -1}}, "trainer_search.se_threshold"),
        ({"trainer_search": {"prune_margin": -0.1}}, "trainer_search.prune_margin"),
        ({"trainer": {"calibration": "isotonic"}}, "calibration"),
    ],
)
def test_bad_config_fails_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExperimentConfig, data, "cfg")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"protocol": {"name": "time"}}, "time split"),
        ({"prepare": {"split": "time"}}, "time split"),
        ({"protocol": {"name": "cold_start"}}, "cold_start"),  # default tables include table3/figure5/6
        ({"controls": ["oracle"]}, "controls"),
        ({"controls": ["attributes"]}, "attribute_features"),
        ({"tables": ["table3"], "trainer_search": {"grid": {"warm_start": [False, True]}}}, "warm_start"),
    ],
)
def test_bad_protocol_or_control_fails_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExperimentConfig, data, "cfg")


def test_cold_start_experiment_profiles_cold_users_through_the_new_user_path(tmp_path):
    """Cold users never reach CTR training; their IDs come from their known rows via the new-user path; the
    control rows and diagnostics are written."""
    data = {
        **{k: v for k, v in TINY.items() if k != "seeds"},
        "name": "tiny cold start",
        "run_dir": str(tmp_path / "run"),
        "seeds": [0],
        "tables": ["table2"],
        "baselines": ["dcn"],
        "protocol": {"name": "cold_start", "history_rows": 3, "cold_user_fraction": 0.25},
        "controls": ["bag_of_items"],
    }
    config = from_dict(ExperimentConfig, data, "tiny cold start")
    out = run_experiment(config)
    from userip.data.schema import Dataset
    from userip.feature_bank import FeatureBank

    dataset = Dataset.load(tmp_path / "run")
    cold = set(pd.read_parquet(tmp_path / "run" / "protocol" / "new_users.parquet")["raw_user_id"])
    raw = dataset.users["raw_user_id"].astype(str)
    cold_ids = dataset.users["user_id"][raw.isin(cold)].to_numpy()
    assert len(cold_ids) == 30  # 0.25 x 120 users
    assert not set(dataset.split("train")["user_id"]) & set(cold_ids)
    assert set(dataset.split("test")["user_id"]) | set(dataset.split("valid")["user_id"]) == set(cold_ids)
    bank = FeatureBank.load(tmp_path / "run" / "bank")
    assert (bank.lookup(cold_ids) >= 0).all()  # every cold user got IDs from the new-user path
    names = {row["model"] for row in out["tables"]["table2"]}
    assert names == {"DCN", "UserIP-DCN", "DCN + bag-of-items IDs (control)"}
    diagnostics = (config.output_dir / "diagnostics.md").read_text()
    assert "Linear probes" in diagnostics and "bag_of_items" in diagnostics
    # A rerun reuses everything: the bank already has the cold users, so no new version is written.
    cells = sorted((config.output_dir / "cells").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in cells]
    run_experiment(config)
    assert FeatureBank.load(tmp_path / "run" / "bank").version == bank.version
    assert [p.stat().st_mtime_ns for p in cells] == mtimes


def test_llm_baseline_rows_farmed_out_then_tabled(tiny_run, tmp_path):
    """Every LLM row end to end with the profile stage's own LM; the rows are computed by two runs with
    ``rows`` (as on a GPU machine, with ``--set``-style overrides of where the LM runs), their cells copied
    into one folder, and a run without ``rows`` computes nothing more and writes the tables."""
    run_dir, _ = tiny_run
    lm = make_tiny_lm(Dataset.load(run_dir))  # a chat LM whose tokenizer spells Yes and No (ReLLa's answers)
    lm_dir = tmp_path / "chat_lm"
    lm.model.save_pretrained(lm_dir)
    lm.tokenizer.save_pretrained(lm_dir)
    data = {
        **{k: v for k, v in TINY.items() if k != "seeds"},
        "name": "tiny llm rows",
        "run_dir": str(run_dir),
        "out_dir": str(tmp_path / "experiment"),
        "seeds": [0, 1],
        "tables": ["table2"],
        "baselines": ["dcn"],
        "llm_baselines": ["kar", "kar_nogen", "pepler", "rella", "rella_zeroshot"],
        "llm_baseline_lm": str(lm_dir),
        "kar": {
            "max_new_tokens": 4,
            "encode_max_tokens": 64,
            "adaptor_output_dim": 8,
            "adaptor_hidden_dim": 8,
        },
        "pepler": {"max_epochs": 1, "batch_size": 64, "mlp_hidden_dim": 16},
        "rella": {"num_train_samples": 8, "max_epochs": 1, "num_history_items": 3, "max_valid_rows": 16},
    }
    farmed = {
        "kar,kar_nogen": tmp_path / "share_kar",
        "pepler,rella,rella_zeroshot": tmp_path / "share_llm",
    }
    for rows, out_dir in farmed.items():
        share = apply_overrides(data, [f"out_dir={out_dir}", "pepler.lm_device=cpu", "rella.lm_device=cpu"])
        run_experiment(from_dict(ExperimentConfig, share, "share"), rows.split(","))
        assert not (out_dir / "tables.md").exists()  # a share computes cells only
    out = tmp_path / "experiment"
    (out / "cells").mkdir(parents=True)
    for out_dir in farmed.values():
        for cell in (out_dir / "cells").glob("*.json"):
            shutil.copy(cell, out / "cells" / cell.name)
    shared_cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(shared_cells) == 2 * 5  # five rows x two seeds, none computed twice

    config = from_dict(ExperimentConfig, data, "tiny llm rows")
    # Tables from what is finished: a row short of a seed says so, and nothing is computed for it.
    (held,) = (out / "cells").glob("dcn__pepler__seed1__*.json")
    held = held.rename(tmp_path / held.name)
    partial = run_experiment(config, finished_only=True)
    seeds = {r["model"]: r["seeds"] for r in partial["tables"]["table2"]}
    assert seeds["PEPLER"] == 1 and seeds["ReLLa"] == 2
    assert not (out / "cells" / held.name).exists()
    held.rename(out / "cells" / held.name)
    summary = run_experiment(config)
    rows = {r["model"] for r in summary["tables"]["table2"]}
    assert {"KAR-DCN", "KAR-DCN w/o generation", "PEPLER", "ReLLa", "ReLLa zero-shot"} <= rows
    results = pd.read_csv(out / "results.csv")
    for row in ("kar", "pepler", "rella", "rella_zeroshot"):
        assert sorted(results[results.variant == row].seed) == [0, 1]
    cost = json.loads((tmp_path / "share_kar" / "llm_baseline_cost.json").read_text())
    assert cost["kar"]["seed0"]["llm_calls"] > 0 and cost["kar_nogen"]["seed0"]["llm_calls"] == 0
    assert cost["kar"]["seed1"]["llm_calls"] == 0  # the second seed reused the cached knowledge
    cost = json.loads((tmp_path / "share_llm" / "llm_baseline_cost.json").read_text())
    assert (
        cost["rella"]["seed0"]["train_samples"] > 0 and cost["rella_zeroshot"]["seed0"]["train_samples"] == 0
    )
    assert cost["rella"]["seed0"]["inference_samples"] > 0 and cost["pepler"]["seed0"]["train_tokens"] > 0
    assert list((run_dir / "baselines").iterdir())  # the offline knowledge cache lives in the run
    with pytest.raises(ConfigError, match="rows"):
        run_experiment(config, ["novq"])


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "configs").glob("experiment_*.yaml")),
    ids=lambda p: p.stem,
)
def test_every_shipped_experiment_config_loads_and_names_its_command(path):
    assert path.read_text().splitlines()[0] == f"# userip experiment --config configs/{path.name}"
    config = from_dict(ExperimentConfig, load_yaml(path), str(path))
    assert config.seeds and config.tables


def test_experiment_cli_set_reaches_the_config_and_a_bad_key_exits_2(tmp_path, capsys, monkeypatch):
    import yaml

    import userip.pipeline.experiment as experiment
    from userip.cli import main

    seen = {}

    def fake_run_experiment(config, rows, finished_only):
        seen["config"] = config
        return {"markdown": "tables"}

    monkeypatch.setattr(experiment, "run_experiment", fake_run_experiment)
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "run"), "out_dir": str(tmp_path / "out")})
    )
    argv = ["experiment", "--config", str(path), "--seeds", "0,1"]
    assert main([*argv, "--set", "trainer.lr=0.02", "--set", "seeds=[3]"]) == 0
    assert seen["config"].trainer.lr == 0.02 and seen["config"].seeds == [3]  # --set wins over --seeds
    seen.clear()
    assert main([*argv, "--out-dir", str(tmp_path / "out2"), "--set", "trainer.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "userip experiment: error: ConfigError:" in err and "no_such_key" in err
    assert not seen and not (tmp_path / "out2").exists()  # failed before any work
