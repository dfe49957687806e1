"""userip compare: rows of several experiments paired by seed (userip.evaluation.compare)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from userip.cli import main
from userip.evaluation.compare import CompareConfig, CompareRow, compare, probe_lift_kept
from userip.pipeline.experiment_config import ExperimentConfig
from userip.utils.config import ConfigError, from_dict, load_yaml

DATA = {"source": "recbole", "source_options": {"path": "x"}, "prepare": {"seed": 0}}
DATA["protocol"] = {"name": "warm"}
BASE_AUC = [0.70, 0.71, 0.69, 0.70, 0.72]
NOLM_AUC = [0.71, 0.71, 0.70, 0.72, 0.72]
LM_AUC = [0.72, 0.73, 0.71, 0.73, 0.74]


Rows = dict[tuple[str, str], list[float]]


def _experiment(folder: Path, rows: Rows, probes: bool = True, **config) -> Path:
    folder.mkdir(parents=True)
    records = [
        {"model": m, "variant": v, "seed": s, "auc": a, "logloss": 0.6 - a / 10}
        for (m, v), aucs in rows.items()
        for s, a in enumerate(aucs)
    ]
    pd.DataFrame(records).to_csv(folder / "results.csv", index=False)
    (folder / "config.json").write_text(json.dumps({**DATA, "userip_model": "dcn", **config}))
    if probes:
        table = pd.DataFrame({"pos_rate": [0.75, 0.70, 0.5]}, index=["soft_tokens", "codes", "random"])
        table.to_csv(folder / "probes.csv")
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {
        "nolm": _experiment(tmp_path / "nolm", {("dcn", "base"): BASE_AUC, ("dcn", "userip"): NOLM_AUC}),
        "lm": _experiment(tmp_path / "lm", {("dcn", "base"): BASE_AUC, ("dcn", "userip"): LM_AUC}),
    }


def _config(folders: dict[str, Path], tmp_path: Path) -> CompareConfig:
    return CompareConfig(
        name="LM share",
        out_dir=str(tmp_path / "out"),
        base=CompareRow("DCN", str(folders["lm"]), variant="base"),
        rows=[CompareRow("no LM", str(folders["nolm"])), CompareRow("offline LM", str(folders["lm"]))],
        reference="no LM",
    )


def test_p_values_and_gaps_match_scipy(folders: dict[str, Path], tmp_path: Path) -> None:
    table = compare(_config(folders, tmp_path))["table"].set_index("row")
    p_base = stats.ttest_rel(LM_AUC, BASE_AUC).pvalue
    p_ref = stats.ttest_rel(LM_AUC, NOLM_AUC).pvalue
    assert table.at["offline LM", "p vs DCN"] == f"{p_base:.3g}"
    assert table.at["offline LM", "p vs no LM"] == f"{p_ref:.3g}"
    gap = sum(a - b for a, b in zip(LM_AUC, NOLM_AUC)) / len(LM_AUC)
    assert table.at["offline LM", "AUC - no LM"] == f"{gap:+.4f}"
    assert table.at["no LM", "p vs no LM"] == ""  # the reference is not tested against itself
    assert table.at["offline LM", "auc_mean"] == pytest.approx(sum(LM_AUC) / 5)
    # (0.70 - 0.5) / (0.75 - 0.5) of the soft tokens' lift
    assert table.at["offline LM", "codes keep (pos_rate)"] == "80%"
    assert table.at["DCN", "codes keep (pos_rate)"] == ""  # probes describe an experiment's main bank only
    assert (tmp_path / "out" / "compare.md").read_text().startswith("# LM share")
    assert len(pd.read_csv(tmp_path / "out" / "compare.csv")) == 3


def test_an_optional_row_not_run_is_listed(folders: dict[str, Path], tmp_path: Path) -> None:
    config = _config(folders, tmp_path)
    config.rows.append(CompareRow("GPU row", str(tmp_path / "not_yet"), required=False))
    table = compare(config)["table"].set_index("row")
    assert table.at["GPU row", "RelaImpr AUC"] == "not run" and table.at["GPU row", "seeds"] == 0
    config.rows[-1].required = True
    with pytest.raises(ConfigError, match=r"rows\[2\].experiment: .*not_yet.*does not exist"):
        compare(config)


def test_rows_of_other_data_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    other = _experiment(tmp_path / "other", {("dcn", "userip"): LM_AUC}, protocol={"name": "cold_start"})
    config = _config(folders, tmp_path)
    config.rows.append(CompareRow("cold", str(other)))
    with pytest.raises(ConfigError, match=r"rows\[2\] \(cold\).*other data.*protocol"):
        compare(config)


def test_missing_row_and_missing_experiment_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    config = _config(folders, tmp_path)
    config.rows[0].variant = "novq"
    with pytest.raises(ConfigError, match=r"rows\[0\] \(no LM\): no dcn/novq cells.*dcn/userip"):
        compare(config)
    config = _config(folders, tmp_path)
    config.base.experiment = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="base.experiment: .*results.csv does not exist"):
        compare(config)


def test_config_validation() -> None:
    base = {"label": "DCN", "experiment": "x", "variant": "base"}
    with pytest.raises(ConfigError, match="reference: 'nope'"):
        from_dict(CompareConfig, {"name": "n", "out_dir": "o", "base": base, "rows": [
            {"label": "a", "experiment": "x"}], "reference": "nope"})  # fmt: skip
    with pytest.raises(ConfigError, match="labels must be distinct"):
        from_dict(CompareConfig, {"name": "n", "out_dir": "o", "base": base, "rows": [
            {"label": "DCN", "experiment": "x"}]})  # fmt: skip


def test_probe_lift_near_chance_is_nan() -> None:
    table = pd.DataFrame({"t": [0.49, 0.6], "u": [0.515, 0.6]}, index=["soft_tokens", "codes"])
    kept = probe_lift_kept(table)
    assert pd.isna(kept["t"]) and pd.isna(kept["u"])  # below chance; a lift under 0.02 is noise


def test_cli_exit_code_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: n\nout_dir: o\nbase: {label: DCN, experiment: nowhere}\nrows: []\n")
    assert main(["compare", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rows: at least one row is required" in err and "Traceback" not in err


def test_cli_writes_table(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    lm = folders["lm"]
    path.write_text(
        f"name: n\nout_dir: {tmp_path / 'o'}\nbase: {{label: DCN, experiment: {lm}, variant: base}}\n"
        f"rows: [{{label: LM, experiment: {folders['lm']}}}]\n"
    )
    assert main(["compare", "--config", str(path)]) == 0
    assert "| LM |" in capsys.readouterr().out


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("compare_*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_compare_config_loads_names_and_points_at_shipped_experiments(path: Path) -> None:
    text = path.read_text()
    assert text.splitlines()[0] == f"# userip compare --config configs/{path.name}"
    config = from_dict(CompareConfig, load_yaml(path), str(path))
    for row in [config.base, *config.rows]:  # every experiment's config is named in the header
        run_dir = Path(row.experiment).parent.name
        assert any(f"experiment_{run_dir}.yaml" in line for line in text.splitlines()[:20]), run_dir
    # Every row reads an experiment some shipped config writes: a typo in a folder would only show as
    # "not run" (optional rows) or a missing-file error after hours of experiments.
    out_dirs = {
        from_dict(ExperimentConfig, load_yaml(p), str(p)).out_dir for p in CONFIGS.glob("experiment_*.yaml")
    }
    missing = [r.experiment for r in [config.base, *config.rows] if r.experiment not in out_dirs]
    assert not missing, f"{path.name}: rows read folders no shipped experiment config writes: {missing}"
