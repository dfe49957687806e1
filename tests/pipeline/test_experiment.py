"""`userip experiment` on the tiny run: tables, plots, resume, and config validation."""

import numpy as np
import pandas as pd
import pytest

from userip.evaluation.metrics import paired_test
from userip.pipeline.experiment import ExperimentConfig, run_experiment
from userip.utils.config import ConfigError, from_dict

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
    # Best cell bold, second best underlined, in each metric column.
    assert md.count("**") >= 4 and "<u>" in md


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
    ],
)
def test_bad_config_fails_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExperimentConfig, data, "cfg")
