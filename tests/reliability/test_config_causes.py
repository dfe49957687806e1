"""Issue 28, causes 1, 3 and 6: settings that mean what they say, checked before any work.

Cause 1: a partial nested setting (``--set train.lr=0.05``, ``--lr``, a file's ``train: {lr: ...}``) updates
the defaults it sits on (the stage's own, not the nested class's), layered file < flags < ``--set``, and the
run records that effective config. Causes 3 and 6: a bad model config, device, seed list, count flag, source
option, table list, new-user file, 64-bit value or one-class label set is a named error (exit code 2, no
traceback) before any work, and every earlier artifact is byte-identical afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.reliability.reliability_helpers import PROFILE_YAML, assert_named_error, snapshot

from userip.cli import build_parser, main
from userip.pipeline.experiment import ExperimentConfig
from userip.pipeline.run import PipelineConfig
from userip.profile.stage import ProfileStageConfig
from userip.utils.config import ConfigError, from_dict, load_yaml, to_dict


# ------------------------------------------------------------------------------ cause 1: partial settings
def _profile_config(tmp_path: Path, *argv: str) -> ProfileStageConfig:
    from userip.profile.cli import build_config

    args = build_parser(only="profile").parse_args(["profile", "--run-dir", str(tmp_path), *argv])
    return build_config(args)


def _run_config(*argv: str) -> PipelineConfig:
    from userip.pipeline.cli import build_config

    return build_config(build_parser(only="run").parse_args(["run", *argv]))


STAGE_TRAIN = ProfileStageConfig().train  # the profile stage's own defaults (lr 0.02 x 15 epochs)
RUN_TRAINER = PipelineConfig().trainer  # the run's tuned CTR trainer


def test_a_partial_profile_setting_keeps_the_stage_defaults(tmp_path: Path) -> None:
    assert (STAGE_TRAIN.lr, STAGE_TRAIN.num_epochs) == (0.02, 15)
    expected = dataclasses.replace(STAGE_TRAIN, lr=0.05)
    assert _profile_config(tmp_path, "--set", "train.lr=0.05").train == expected
    assert _profile_config(tmp_path, "--lr", "0.05").train == expected


def test_file_then_flags_then_set_each_update_the_one_below(tmp_path: Path) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("train: {batch_size: 8, lr: 0.1}\nlm: {dtype: bf16}\n")
    argv = ["--config", str(config), "--lr", "0.03", "--epochs", "4", "--set", "train.num_epochs=2"]
    built = _profile_config(tmp_path, *argv)
    assert built.train == dataclasses.replace(STAGE_TRAIN, batch_size=8, lr=0.03, num_epochs=2)
    assert built.lm.name_or_path == "offline" and built.lm.dtype.value == "bf16"  # the stage's LM kept


def test_a_partial_run_setting_keeps_the_runs_trainer_and_profile_defaults() -> None:
    assert RUN_TRAINER.max_epochs == 60 and RUN_TRAINER.min_epochs == 20  # the run's, not CTRTrainerConfig's
    built = _run_config("--set", "trainer.lr=0.02", "--set", "profile.train.lr=0.05")
    assert built.trainer == dataclasses.replace(RUN_TRAINER, lr=0.02)
    assert built.profile.train == dataclasses.replace(STAGE_TRAIN, lr=0.05)


def test_an_experiment_file_section_keeps_the_stage_defaults(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("profile:\n  train: {lr: 0.05}\n  lm: {device: cpu}\n")
    built = from_dict(ExperimentConfig, load_yaml(path), str(path))
    assert built.profile.train == dataclasses.replace(STAGE_TRAIN, lr=0.05)
    assert built.profile.lm.name_or_path == "offline"


def test_a_base_config_is_updated_not_shared() -> None:
    base = ProfileStageConfig()
    updated = from_dict(ProfileStageConfig, {"train": {"lr": 0.5}}, base=base)
    assert updated.train.lr == 0.5 and base.train.lr == 0.02  # base untouched
    assert updated.prompt == base.prompt and updated.prompt is not base.prompt  # copied, not aliased


def test_the_recorded_profile_config_is_the_effective_one(run_copy: Path) -> None:
    config = run_copy.parent / "p.yaml"
    config.write_text(PROFILE_YAML)
    argv = ["--config", str(config), "--set", "train.lr=0.05"]
    assert main(["profile", "--run-dir", str(run_copy), *argv]) == 0
    recorded = json.loads((run_copy / "profile" / "stage_config.json").read_text())["config"]
    assert recorded == to_dict(_profile_config(run_copy, *argv))
    train = recorded["train"]
    assert (train["lr"], train["num_epochs"], train["log_every"]) == (0.05, 1, STAGE_TRAIN.log_every)


# ------------------------------------------------------------------------------ causes 3 and 6: refusals
@dataclass(frozen=True)
class Case:
    """``make(run)`` writes what the case needs beside the run copy and returns the command line; the output
    must hold every string of ``expect``."""

    name: str
    make: Callable[[Path], list[str]]
    expect: tuple[str, ...]


def _file(run: Path, name: str, text: str) -> str:
    path = run.parent / name
    path.write_text(text)
    return str(path)


def _run(run: Path, *argv: str) -> list[str]:
    """``userip run`` of a tiny config into a fresh folder beside the copy: a refusal must leave it unmade
    (and code that refused too late spends seconds, not minutes, before failing)."""
    text = (
        "source_options: {num_users: 60, num_items: 24}\nseeds: [0]\n"
        "trainer: {max_epochs: 1, min_epochs: 0}\nprofile:\n"
        + "".join(f"  {line}\n" for line in PROFILE_YAML.splitlines())
    )
    config = _file(run, "run.yaml", text)
    return ["run", "--config", config, "--run-dir", str(run.parent / "fresh"), *argv]


def _experiment(run: Path, extra: str = "", *argv: str) -> list[str]:
    text = (
        f"run_dir: {run.parent / 'exp_run'}\nout_dir: {run.parent / 'exp_out'}\n"
        "seeds: [0]\ntables: [table2]\n"
        "source_options: {num_users: 60, num_items: 24}\n"
        "profile:\n" + "".join(f"  {line}\n" for line in PROFILE_YAML.splitlines()) + extra
    )
    return ["experiment", "--config", _file(run, "e.yaml", text), *argv]


def _implicit_with_huge_position(run: Path) -> list[str]:
    rows = ["user_id,item_id,position"]
    rows += [f"u{u},i{(u + i) % 10},{i}" for u in range(8) for i in range(6)]
    rows[5] = "u0,i4,9223372036854775808"  # 2^63: wraps to -2^63 under a bare astype(int64)
    path = _file(run, "interactions.csv", "\n".join(rows) + "\n")
    return [
        "prepare",
        "--source",
        "implicit",
        "--path",
        path,
        "--negatives-per-positive",
        "1",
        "--out",
        str(run),
    ]


def _one_class_labels(run: Path) -> list[str]:
    synthetic = ["--source", "synthetic", "--num-users", "60", "--num-items", "24"]
    return ["prepare", *synthetic, "--label-threshold", "5", "--out", str(run)]


def _empty_new_users(run: Path) -> list[str]:
    return ["profile", "--run-dir", str(run), "--new-users", _file(run, "new.csv", "")]


def _source_options_list(run: Path) -> list[str]:
    config = _file(run, "prep.yaml", "source: synthetic\nsource_options: [num_users, 60]\n")
    return ["prepare", "--config", config, "--out", str(run)]


CASES = [
    # cause 3: the whole config, model config and devices included, before any work
    Case(
        "bad ctr_model_config key",
        lambda r: _run(r, "--set", "ctr_model_config.bogus=1"),
        ("ctr_model_config", "bogus", "accepted"),
    ),
    Case(
        "bad ctr_model_config type",
        lambda r: _run(r, "--set", "ctr_model_config.hidden_units=abc"),
        ("ctr_model_config", "hidden_units", "abc"),
    ),
    Case(
        "bogus trainer device",
        lambda r: _run(r, "--set", "trainer.device=cuda9"),
        ("device", "'cuda9'", "'cpu' or 'cuda[:N]'"),
    ),
    Case("tpu LM device", lambda r: _run(r, "--set", "profile.lm.device=tpu"), ("lm.device", "'tpu'")),
    Case(
        "bogus profile device",
        lambda r: ["profile", "--run-dir", str(r), "--device", "bogus"],
        ("lm.device", "'bogus'"),
    ),
    Case(
        "no CUDA here", lambda r: _run(r, "--set", "trainer.device=cuda"), ("device", "CUDA is not available")
    ),
    Case(
        "bad model key (train --set)",
        lambda r: ["train", "--model", "dcn", "--run-dir", str(r), "--set", "model.bogus=1"],
        ("bogus", "dcn"),
    ),
    Case(
        "bad model_configs key (experiment --set)",
        lambda r: _experiment(r, "", "--set", "model_configs.dcn.bogus=1"),
        ("model_configs.dcn", "bogus"),
    ),
    # cause 6: silent nonsense
    Case(
        "position of 2^63",
        _implicit_with_huge_position,
        ("interactions.csv", "row 5", "'position'", "9223372036854775808", "64-bit"),
    ),
    Case("one-class label threshold", _one_class_labels, ("label_threshold=5", "every label 0")),
    Case(
        "explain --limit -1", lambda r: ["explain", "--run-dir", str(r), "--limit", "-1"], ("--limit", "'-1'")
    ),
    Case("explain -k 0", lambda r: ["explain", "--run-dir", str(r), "-k", "0"], ("-k", "'0'")),
    Case("empty --seeds (run)", lambda r: _run(r, "--seeds", ""), ("--seeds", "at least one")),
    Case(
        "empty --seeds (experiment)",
        lambda r: _experiment(r, "", "--seeds", ","),
        ("--seeds", "at least one"),
    ),
    Case("empty new-user file", _empty_new_users, ("new.csv", "empty")),
    Case(
        "unknown source_options key (run)",
        lambda r: _run(r, "--set", "source_options.bogus=1"),
        ("source_options", "bogus", "num_users"),
    ),
    Case(
        "unknown source_options key (experiment)",
        lambda r: _experiment(r, "", "--set", "source_options.bogus=1"),
        ("source_options", "bogus"),
    ),
    Case("source_options as a list", _source_options_list, ("source_options", "list")),
    Case(
        "--finished-only without cells",
        lambda r: _experiment(r, "", "--finished-only"),
        ("--finished-only", "no finished cells", "exp_out"),
    ),
    Case("tables: []", lambda r: _experiment(r, "tables: []\n"), ("tables", "at least one")),
]


def _artifacts(folder: Path) -> dict[str, str]:
    """``snapshot`` less log files (a refused command logs its one-line error, as every command does)."""
    return {name: digest for name, digest in snapshot(folder).items() if not name.endswith(".log")}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_bad_setting_is_a_named_error_before_any_work(
    case: Case,
    run_copy: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    argv = case.make(run_copy)
    before = _artifacts(run_copy.parent)
    caplog.set_level(logging.ERROR)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's refusal of a flag value: the same exit code, its own one line
        rc = e.code
    captured = capsys.readouterr()
    text = captured.err + captured.out + caplog.text
    assert_named_error(rc, text, case.expect)
    assert _artifacts(run_copy.parent) == before, "a file was written or changed by a refused command"


def test_a_cuda_index_beyond_this_machine_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _run_config("--set", "trainer.device=cuda:1").trainer.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"CTRTrainerConfig.device is 'cuda:2' but this machine has 2 CUDA"):
        _run_config("--set", "trainer.device=cuda:2")
    with pytest.raises(ConfigError, match=r"lm.table_device is 'cuda:5'"):
        _run_config("--set", "profile.lm.table_device=cuda:5")


def test_a_run_recorded_on_cuda_opens_on_a_cpu_machine(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The device rule refuses a CUDA device this machine lacks in what the user asks for; a finished run's
    record (made on a GPU machine, explained on a laptop) says where it ran, and opens on the CPU."""
    from userip.profile.stage import read_stage_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = run_copy / "profile" / "stage_config.json"
    stage = json.loads(path.read_text())
    stage["config"]["lm"].update(device="cuda", table_device="cuda:0")
    path.write_text(json.dumps(stage))
    caplog.set_level(logging.WARNING)
    _, config = read_stage_config(run_copy)
    assert (config.lm.device, config.lm.table_device) == ("cpu", "cpu")
    assert "lm.device is 'cuda' but CUDA is not available" in caplog.text
    stage["config"]["lm"]["device"] = "tpu"  # not a device at all: still refused, named
    path.write_text(json.dumps(stage))
    with pytest.raises(ConfigError, match=r"lm.device must be 'cpu' or 'cuda\[:N\]', got 'tpu'"):
        read_stage_config(run_copy)


def test_stage_config_names_say_their_stage_and_old_names_still_import():
    from userip.ctr.trainer import CTRTrainerConfig, TrainerConfig
    from userip.profile.trainer import ProfileTrainConfig, TrainConfig

    assert TrainConfig is ProfileTrainConfig and TrainerConfig is CTRTrainerConfig
    assert CTRTrainerConfig.__name__ == "CTRTrainerConfig"
    assert ProfileTrainConfig.__name__ == "ProfileTrainConfig"
