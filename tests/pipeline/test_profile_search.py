"""`userip experiment` with a profile stage per setting: the profile search (``profile_search``), the
retrained codebook-size sweep (``codebook_sweep``), their caches and their config checks."""

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from userip.feature_bank import FeatureBank
from userip.pipeline.experiment import Experiment, ExperimentConfig, run_experiment
from userip.utils.config import ConfigError, from_dict, to_dict

from .conftest import TINY

SEARCH = {"grid": {"quantization.loss_weight": [0.001, 0.1]}, "seeds": [0, 1, 2], "prune_margin": None}


def _config(root, **overrides) -> ExperimentConfig:
    data = {
        **{k: v for k, v in TINY.items() if k != "seeds"},
        "name": "tiny profile search",
        "run_dir": str(root / "run"),
        "out_dir": str(root / "out"),
        "seeds": [0],
        "tables": ["table2", "figure5"],
        "baselines": ["dcn"],
        "hobby_sizes": [4, 6],
        "requantize_epochs": 2,
        "codebook_sweep": "both",
        "profile_search": SEARCH,
        **overrides,
    }
    return from_dict(ExperimentConfig, data, "tiny profile search")


def _run(config: ExperimentConfig) -> dict:
    """The experiment on one thread, without the linear-probe diagnostics (test_experiment covers them;
    here they would only cost time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Experiment, "diagnostics", lambda self: None)
            return run_experiment(config)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("profile_search"))
    return config, _run(config)


def _stage_dirs(config: ExperimentConfig) -> dict[str, Path]:
    """RUN/profiles/<name>-<digest> by name."""
    return {p.name.rsplit("-", 1)[0]: p for p in sorted((Path(config.run_dir) / "profiles").iterdir())}


def _search_scores(config: ExperimentConfig) -> np.ndarray:
    """scores[candidate, seed]: UserIP-DCN's validation AUC, read from the cell files by the loss weight and
    trainer their keys record (independently of the experiment's bookkeeping)."""
    found = {}
    for path in (config.output_dir / "cells").glob("dcn__userip__seed*.json"):
        record = json.loads(path.read_text())
        key = record["cache_key"]
        if key["trainer"] == to_dict(config.trainer):
            found[(key["profile"]["quantization"]["loss_weight"], record["seed"])] = record["valid_auc"]
    grid = SEARCH["grid"]["quantization.loss_weight"]
    return np.array([[found[(w, s)] for s in SEARCH["seeds"]] for w in grid])


def test_search_keeps_the_simplest_setting_within_noise_and_makes_it_the_main_bank(searched):
    config, out = searched
    ranked = pd.read_csv(config.output_dir / "profile_search.csv")
    scores = _search_scores(config)
    assert list(ranked["quantization.loss_weight"]) == [0.001, 0.1]
    assert np.allclose(ranked.valid_auc_mean, scores.mean(axis=1))
    # The rule by hand: the best mean, the paired t of best - candidate, the first (simplest) within 2 SEs.
    best = int(np.argmax(scores.mean(axis=1)))
    diffs = scores[best] - scores
    ses = diffs.std(axis=1, ddof=1) / math.sqrt(scores.shape[1])
    within = diffs.mean(axis=1) <= config.profile_search.se_threshold * ses
    expected = int(np.flatnonzero(within)[0])
    assert list(ranked.within_noise) == list(within)
    assert list(ranked.chosen) == [c == expected for c in range(2)]
    assert np.allclose(ranked.gap_to_chosen, (scores[expected] - scores).mean(axis=1))
    assert list(ranked.complexity) == [0, 1] and not ranked.pruned.any()
    # The first candidate is the experiment's own setting: its stage is RUN's; the other has its folder.
    assert list(ranked.stage) == [
        ".",
        _stage_dirs(config)["loss_weight=0.1"].relative_to(config.run_dir).as_posix(),
    ]
    # The chosen setting's stage is the main bank: the UserIP-DCN row is its search cell of seed 0.
    chosen_dir = Path(config.run_dir) / ranked.stage[expected]
    report = json.loads((chosen_dir / "bank" / "report.json").read_text())
    assert json.loads((config.output_dir / "profile_report.json").read_text()) == report
    results = pd.read_csv(config.output_dir / "results.csv")
    ours = results[results.variant == "userip"]
    assert np.isclose(ours.valid_auc.iloc[0], scores[expected, 0])
    assert "Profile setting chosen on validation AUC" in out["markdown"]
    assert (config.output_dir / "profile_search.md").read_text().count("\n|") == 2 + 2


def test_each_setting_has_its_folder_sharing_the_data_and_the_offline_lm(searched):
    config, _ = searched
    stages = _stage_dirs(config)
    assert set(stages) == {"loss_weight=0.1", "hobby6"}
    for stage in stages.values():
        assert os.readlink(stage / "data") == "../../data" and os.readlink(stage / "lm") == "../../lm"
        assert not (stage / "data").resolve().is_relative_to(stage)
    # Loss weight and codebook size do not change the offline LM's key: it was pre-trained once.
    assert len([p for p in (Path(config.run_dir) / "lm").iterdir() if not p.name.startswith(".")]) == 1


def test_retrain_sweep_gives_each_size_its_own_stage_and_a_second_curve(searched):
    config, out = searched
    chosen = pd.read_csv(config.output_dir / "profile_search.csv").query("chosen")
    main = FeatureBank.load(Path(config.run_dir) / chosen.stage.iloc[0] / "bank")
    retrained_dir = _stage_dirs(config)["hobby6"]
    retrained = FeatureBank.load(retrained_dir / "bank")
    assert tuple(retrained.codebook_sizes) == (6, 3) and tuple(main.codebook_sizes) == (4, 3)
    assert retrained.version != main.version
    # The sweep is around the chosen setting: the retrained stage records its loss weight.
    record = json.loads((retrained_dir / "profile" / "stage_config.json").read_text())
    assert record["config"]["quantization"]["loss_weight"] == chosen["quantization.loss_weight"].iloc[0]
    requantized = list((config.output_dir / "banks").glob("*/hobby6-*"))
    assert len(requantized) == 1 and FeatureBank.load(requantized[0]).version != retrained.version
    results = pd.read_csv(config.output_dir / "results.csv")
    assert {"userip", "hobby6", "hobby6_retrain"} <= set(results.variant)
    figure = pd.DataFrame(out["tables"]["figure5"])
    assert sorted(zip(figure.codebooks, figure.codebook_size)) == [
        ("re-quantized", 4),
        ("re-quantized", 6),
        ("retrained", 4),
        ("retrained", 6),
    ]
    row = figure[(figure.codebooks == "retrained") & (figure.codebook_size == 6)]
    assert np.isclose(row.auc_mean.iloc[0], results[results.variant == "hobby6_retrain"].auc.iloc[0])
    assert (config.output_dir / "figure5_hobby_codebook.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _mtimes(config: ExperimentConfig) -> dict:
    files = [*(config.output_dir / "cells").glob("*.json"), *Path(config.run_dir).glob("**/bank/report.json")]
    files += list(Path(config.run_dir).glob("**/profile/stage_config.json"))
    return {p: p.stat().st_mtime_ns for p in files}


def test_rerun_reuses_every_stage_and_cell(searched):
    config, _ = searched
    before = _mtimes(config)
    assert len([p for p in before if p.name == "report.json"]) == 3  # RUN, loss_weight=0.1, hobby6
    _run(config)
    assert _mtimes(config) == before
    # The retrained sweep is a row like any other: it can be farmed out alone (and is reused here).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Experiment, "diagnostics", lambda self: None)
        share = run_experiment(config, rows=["hobby6_retrain"])
    assert [(c["variant"], c["seed"]) for c in share["cells"]] == [("hobby6_retrain", 0)]
    assert _mtimes(config) == before


def test_a_changed_setting_gets_its_stage_and_a_changed_record_is_retrained(searched):
    config, _ = searched
    before = _mtimes(config)
    grid = {"quantization.loss_weight": [0.001, 0.03]}
    changed = _config(
        Path(config.run_dir).parent, profile_search={**SEARCH, "grid": grid}, codebook_sweep="requantize"
    )
    _run(changed)
    stages = _stage_dirs(changed)
    assert set(stages) == {"loss_weight=0.1", "loss_weight=0.03", "hobby6"}
    assert {p: t for p, t in _mtimes(changed).items() if p in before} == before  # the others untouched
    assert list(pd.read_csv(changed.output_dir / "profile_search.csv")["quantization.loss_weight"]) == [
        0.001,
        0.03,
    ]
    # A stage whose record no longer holds its setting is retrained, not trusted.
    record_path = stages["loss_weight=0.03"] / "profile" / "stage_config.json"
    record = json.loads(record_path.read_text())
    record["config"]["train"]["num_epochs"] = 7
    record_path.write_text(json.dumps(record))
    version = FeatureBank.load(stages["loss_weight=0.03"] / "bank").version
    _run(changed)
    assert FeatureBank.load(stages["loss_weight=0.03"] / "bank").version != version
    assert json.loads(record_path.read_text())["config"]["train"]["num_epochs"] == 1


def test_cold_start_retrained_sizes_get_the_cold_users_through_the_new_user_path(tmp_path):
    config = _config(
        tmp_path,
        protocol={"name": "cold_start", "history_rows": 3, "cold_user_fraction": 0.25},
        codebook_sweep="retrain",
        profile_search={},
    )
    out = _run(config)
    cold = pd.read_parquet(Path(config.run_dir) / "protocol" / "new_users.parquet")["raw_user_id"]
    from userip.data.schema import Dataset

    dataset = Dataset.load(Path(config.run_dir) / "data")
    cold_ids = dataset.users["user_id"][dataset.users["raw_user_id"].astype(str).isin(set(cold))].to_numpy()
    assert len(cold_ids) == 30
    for bank_dir in (Path(config.run_dir) / "bank", _stage_dirs(config)["hobby6"] / "bank"):
        assert (FeatureBank.load(bank_dir).lookup(cold_ids) >= 0).all()
    assert len(out["tables"]["figure5"]) == 2


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"profile_search": {"grid": {"prompt.no_such": [1]}}}, "unknown key 'prompt.no_such'"),
        ({"profile_search": {"grid": {"prompt.profiles.job.codebook_size": [3]}}}, "no profile named 'job'"),
        ({"profile_search": {"grid": {"prompt.profiles.hobby.codebook_size": [4, 1]}}}, "codebook size"),
        ({"profile_search": {"grid": {"prompt.history_feedback": ["none", "loud"]}}}, "'loud'"),
        # before any stage trains: a 5% floor cannot hold for 27 codes
        ({"profile_search": {"grid": {"prompt.profiles.hobby.codebook_size": [4, 27]}}}, r"1/27"),
        ({"profile": {"quantization": {"balance_min_share": 0.4}}}, r"profile: .*balance_min_share.*1/4"),
        ({"profile_search": {"grid": {"train.num_epochs": [1, 0]}}}, "train.num_epochs"),
        ({"profile_search": {"grid": {"train.num_epochs": []}}}, "profile_search.grid.train.num_epochs"),
        ({"profile_search": {"grid": {"train.num_epochs": [2, 2]}}}, "repeated"),
        ({"profile_search": {"grid": {"train": [1]}}}, "section"),
        ({"profile_search": {"grid": {"train.progress": [True, False]}}}, "changes no number"),
        ({"profile_search": {"grid": {"train.num_epochs": [1, 2]}, "seeds": [0, 1]}}, "at least 3 distinct"),
        ({"profile_search": {"se_threshold": -1}}, "profile_search.se_threshold"),
        ({"profile_search": {"prune_margin": -0.1}}, "profile_search.prune_margin"),
        ({"profile_search": {"grids": {}}}, "grids"),
        ({"codebook_sweep": "sometimes"}, "codebook_sweep"),
        ({"protocol": {"name": "cold_start"}, "tables": ["table2", "figure5"]}, "codebook_sweep: retrain"),
    ],
)
def test_bad_profile_search_or_sweep_fails_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExperimentConfig, data, "cfg")


def test_good_grid_spellings_build_one_candidate_per_point():
    grid = {
        "prompt.history_feedback": ["none", "label"],
        "quantization.loss_weight": [0.001, 0.01],
        "train.num_epochs": [15, 30],
        "prompt.profiles.background.codebook_size": [3, 9],
    }
    config = from_dict(ExperimentConfig, {"profile_search": {"grid": grid}}, "cfg")
    candidates = config.profile_search.candidates(config.profile)
    assert len(candidates) == 16 and to_dict(candidates[0]) == to_dict(config.profile)
    last = candidates[-1]
    assert last.prompt.history_feedback.value == "label" and last.quantization.loss_weight == 0.01
    assert last.train.num_epochs == 30 and [p.codebook_size for p in last.prompt.profiles] == [4, 9]
    assert config.profile_search.complexity()[:3] == [0, 1, 1] and config.profile_search.complexity()[-1] == 4


def test_experiment_cli_refuses_a_bad_profile_grid_with_exit_2(tmp_path, capsys):
    from userip.cli import main

    path = tmp_path / "exp.yaml"
    data = {
        **TINY,
        "run_dir": str(tmp_path / "run"),
        "profile_search": {"grid": {"quantization.weight": [1]}},
    }
    path.write_text(yaml.safe_dump(data))
    assert main(["experiment", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "quantization.weight" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_sweep_sizes_past_the_balance_floor_get_a_scaled_floor_and_others_keep_theirs(tmp_path):
    config = from_dict(
        ExperimentConfig,
        {"run_dir": str(tmp_path / "run"), "hobby_sizes": [4, 16, 81], "codebook_sweep": "both"},
        "cfg",
    )
    experiment = Experiment(config)
    main = config.profile
    # a feasible size keeps the config, so its stage folder and cells are those of earlier runs
    assert experiment._retrain_profile("hobby16_retrain").quantization == main.quantization
    assert experiment._sweep_quantization([16, 3]) is main.quantization
    wide = experiment._retrain_profile("hobby81_retrain")
    assert [p.codebook_size for p in wide.prompt.profiles] == [81, 3]
    assert wide.quantization.balance_min_share == pytest.approx(main.quantization.balance_min_share * 4 / 81)
    wide.quantization.check_codebook_sizes([81, 3])


def _stage_probes_bench():
    """bench/bench_stage_probes.py as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).parents[2] / "bench" / "bench_stage_probes.py"
    spec = importlib.util.spec_from_file_location("bench_stage_probes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_stage_probes_bench_probes_every_searched_stage_on_valid_targets(searched, capsys):
    """bench/bench_stage_probes.py: one probe row per stage (RUN/profile and each RUN/profiles/<setting>),
    the bag and random rows beside them, and a RESULT line naming the best stage per target."""
    bench = _stage_probes_bench()
    config, _ = searched
    run_dir = Path(config.run_dir)
    # RUN/profile plus every cached setting (earlier tests of this module may have added one).
    stages = {"run", *_stage_dirs(config)}
    assert {"loss_weight=0.1", "hobby6"} <= stages and set(bench.stage_folders(run_dir)) == stages
    markdown = run_dir.parent / "probes.md"
    assert bench.main(["--run-dir", str(run_dir), "--markdown", str(markdown), "--lm-reliance"]) == 0
    out = capsys.readouterr().out
    result = dict(part.split("=", 1) for part in out.strip().splitlines()[-1].removeprefix("RESULT ").split())
    assert result["stages"] == str(len(stages))
    for stage in (*stages, "bag_of_items", "random"):
        assert f"| {stage} |" in out
    best = {k: float(v) for k, v in result.items() if k.startswith("best_") and not k.endswith("_stage")}
    assert best and all(0.0 <= v <= 1.0 for v in best.values())
    assert markdown.read_text().strip() in out
    # The LM-reliance table: one row per stage, NLLs > 0, reliance = (mean - own) / mean as printed.
    lines = out.splitlines()
    header = lines.index("| stage | own | other_user | mean | initial | examples | reliance |")
    rows = [line.split("|")[1:-1] for line in lines[header + 2 :] if line.startswith("| ")]
    reliance = {cells[0].strip(): [float(c) for c in cells[1:]] for cells in rows}
    assert set(reliance) == stages
    for own, other, mean, initial, examples, share in reliance.values():
        assert min(own, other, mean, initial) > 0 and examples > 0
        assert share == pytest.approx((mean - own) / mean, abs=2e-4)
    assert float(result["max_reliance"]) == pytest.approx(max(r[-1] for r in reliance.values()), abs=1e-4)


def test_stage_probes_bench_refuses_a_folder_without_stages(tmp_path, capsys):
    bench = _stage_probes_bench()
    assert bench.main(["--run-dir", str(tmp_path)]) == 2
    assert "no profile stage" in capsys.readouterr().err
