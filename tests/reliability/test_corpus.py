"""The reliability corpus: bad inputs and damaged artifacts, each fed to the command that reads it.

Every case must end in a named error on one line (exit code 2, no traceback) that says which file or key is
at fault and what was expected, and every artifact that existed before must be byte-identical afterwards
(``snapshot``): a failure writes nothing downstream.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.reliability.reliability_helpers import PROFILE_YAML, assert_named_error, snapshot

from userip.cli import main
from userip.feature_bank import FeatureBank


@dataclass(frozen=True)
class Case:
    """``damage(run)`` breaks the private run copy and returns the command line; stderr must hold
    every string of ``expect`` ("{run}" is the copy's path)."""

    name: str
    damage: Callable[[Path], list[str]]
    expect: tuple[str, ...]


def _flip_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _checkpoint(run: Path) -> Path:
    folder = run / "profile" / "checkpoints"
    return folder / json.loads((folder / "checkpoint.json").read_text())["tensors"]


def _yaml(run: Path, name: str, text: str) -> str:
    path = run.parent / name
    path.write_text(text)
    return str(path)


def _resume(run: Path) -> list[str]:
    return ["profile", "--run-dir", str(run), "--config", _yaml(run, "p.yaml", PROFILE_YAML), "--resume"]


def _new_users(run: Path) -> list[str]:
    path = run.parent / "new.csv"
    path.write_text("raw_user_id,raw_item_id,rating\nnewbie,i1,5\nnewbie,i2,4\n")
    return ["profile", "--run-dir", str(run), "--new-users", str(path)]


def _case_truncated_checkpoint(run: Path) -> list[str]:
    _truncate(_checkpoint(run))
    return _resume(run)


def _case_flipped_checkpoint(run: Path) -> list[str]:
    _flip_middle(_checkpoint(run))
    return _resume(run)


def _case_truncated_checkpoint_record(run: Path) -> list[str]:
    _truncate(run / "profile" / "checkpoints" / "checkpoint.json")
    return _resume(run)


def _case_checkpoint_record_escapes(run: Path) -> list[str]:
    record = run / "profile" / "checkpoints" / "checkpoint.json"
    meta = json.loads(record.read_text())
    meta["tensors"] = "../../bank/CURRENT.json"
    record.write_text(json.dumps(meta))
    return _resume(run)


def _case_truncated_objective(run: Path) -> list[str]:
    _truncate(next((run / "bank" / "objectives").glob("*.safetensors")))
    return _new_users(run)


def _case_flipped_objective(run: Path) -> list[str]:
    _flip_middle(next((run / "bank" / "objectives").glob("*.safetensors")))
    return _new_users(run)


def _case_flipped_soft_tokens(run: Path) -> list[str]:
    _flip_middle(run / "profile" / "soft_tokens.safetensors")
    return ["explain", "--run-dir", str(run), "--limit", "2"]


def _case_truncated_soft_tokens(run: Path) -> list[str]:
    _truncate(run / "profile" / "soft_tokens.safetensors")
    return ["explain", "--run-dir", str(run), "--limit", "2"]


def _case_corrupt_parquet_in_train(run: Path) -> list[str]:
    _flip_middle(run / "data" / "interactions.parquet", n=256)
    return ["train", "--model", "dcn", "--run-dir", str(run), "--epochs", "1", "--no-progress"]


def _case_truncated_parquet_in_train(run: Path) -> list[str]:
    _truncate(run / "data" / "users.parquet")
    return ["train", "--model", "dcn", "--run-dir", str(run), "--epochs", "1", "--no-progress"]


def _case_truncated_json_gz(run: Path) -> list[str]:
    reviews = run.parent / "reviews.json.gz"
    lines = [json.dumps({"reviewerID": f"u{i}", "asin": f"a{i % 7}", "overall": 5.0}) for i in range(2000)]
    reviews.write_bytes(gzip.compress("\n".join(lines).encode()))
    _truncate(reviews, keep=0.6)
    return ["prepare", "--source", "amazon", "--reviews", str(reviews), "--out", str(run.parent / "amazon")]


def _case_out_is_a_file(run: Path) -> list[str]:
    target = run.parent / "not-a-folder"
    target.write_text("precious")
    return ["prepare", "--source", "synthetic", "--num-users", "20", "--out", str(target)]


def _case_run_dir_is_a_file(run: Path) -> list[str]:
    return ["train", "--model", "dcn", "--run-dir", str(run / "data" / "manifest.json")]


def _case_float_seed(run: Path) -> list[str]:
    config = _yaml(run, "bad.yaml", PROFILE_YAML.replace("progress: false", "progress: false, seed: 1.5"))
    return ["profile", "--run-dir", str(run), "--config", config]


def _case_string_for_bool(run: Path) -> list[str]:
    config = _yaml(run, "bad.yaml", PROFILE_YAML.replace("progress: false", 'progress: "no"'))
    return ["profile", "--run-dir", str(run), "--config", config]


def _case_nan_label_threshold_flag(run: Path) -> list[str]:
    return ["prepare", "--source", "synthetic", "--label-threshold", "nan", "--out", str(run)]


def _case_nan_label_threshold_yaml(run: Path) -> list[str]:
    config = _yaml(run, "prep.yaml", "source: synthetic\nprepare:\n  label_threshold: .nan\n")
    return ["prepare", "--config", config, "--out", str(run)]


def _case_string_for_number_in_trainer(run: Path) -> list[str]:
    config = _yaml(run, "ctr.yaml", "model: {}\ntrainer:\n  lr: fast\n")
    return ["train", "--model", "dcn", "--run-dir", str(run), "--model-config", config]


def _case_serve_float_limit(run: Path) -> list[str]:
    config = _yaml(run, "serve.yaml", "serve:\n  max_items_per_request: 10.5\n")
    return ["serve", "--run-dir", str(run), "--config", config]


def _case_bank_pointer_escapes(run: Path) -> list[str]:
    pointer = run / "bank" / "CURRENT.json"
    data = json.loads(pointer.read_text())
    data["file"] = "../data/users.parquet"
    pointer.write_text(json.dumps(data))
    return ["train", "--model", "dcn", "--run-dir", str(run), "--with-profiles", "--epochs", "1"]


def _case_truncated_ctr_weights(run: Path) -> list[str]:
    _truncate(run / "ctr" / "dcn+profiles" / "model.safetensors", keep=0.9)
    return ["serve", "--run-dir", str(run), "--port", "0"]


def _case_nan_ctr_weights(run: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    from userip.utils.artifacts import save_tensors

    path = run / "ctr" / "dcn+profiles" / "model.safetensors"
    state = load_file(str(path))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state[name] = torch.full_like(state[name], float("nan"))  # what /v1/score answered as invalid JSON
    save_tensors(path, state)  # a diverged model, hashed as written: the NaN check must refuse it
    return ["serve", "--run-dir", str(run), "--port", "0"]


def _case_model_bank_mismatch(run: Path) -> list[str]:
    bank = FeatureBank.load(run / "bank")
    other = FeatureBank.build(
        profile_names=bank.profile_names,
        codebooks=[cb + 1.0 for cb in bank.codebooks],  # same sizes, other codebooks: IDs mean other things
        codes=bank.codes,
        raw_user_ids=bank.raw_user_ids,
        dataset_hash=bank.dataset_hash,
    )
    other.write(run.parent / "other-bank")
    return ["serve", "--run-dir", str(run), "--bank", str(run.parent / "other-bank"), "--port", "0"]


CASES = [
    Case("truncated checkpoint on --resume", _case_truncated_checkpoint, ("profile checkpoint", "ckpt-")),
    Case("bit-flipped checkpoint on --resume", _case_flipped_checkpoint, ("content hash", "ckpt-")),
    Case(
        "truncated checkpoint record", _case_truncated_checkpoint_record, ("checkpoint.json", "invalid JSON")
    ),
    Case(
        "checkpoint record naming another file", _case_checkpoint_record_escapes, ("not a checkpoint file",)
    ),
    Case("truncated objective (--new-users)", _case_truncated_objective, ("objectives", "SHA-256")),
    Case("bit-flipped objective (--new-users)", _case_flipped_objective, ("objectives", "SHA-256")),
    Case("bit-flipped soft tokens (explain)", _case_flipped_soft_tokens, ("soft_tokens.safetensors",)),
    Case("truncated soft tokens (explain)", _case_truncated_soft_tokens, ("soft_tokens.safetensors",)),
    Case("corrupt Parquet page (train)", _case_corrupt_parquet_in_train, ("interactions.parquet",)),
    Case("truncated Parquet (train)", _case_truncated_parquet_in_train, ("users.parquet",)),
    Case("truncated .json.gz (prepare)", _case_truncated_json_gz, ("OSError", "Truncated compressed stream")),
    Case("--out pointing at a file", _case_out_is_a_file, ("--out", "is a file")),
    Case("--run-dir pointing at a file", _case_run_dir_is_a_file, ("--run-dir", "is a file")),
    Case("float seed in YAML", _case_float_seed, ("train.seed", "expected an integer")),
    Case("string for a bool in YAML", _case_string_for_bool, ("train.progress", "expected true or false")),
    Case("nan label threshold (flag)", _case_nan_label_threshold_flag, ("label_threshold", "finite")),
    Case("nan label threshold (YAML)", _case_nan_label_threshold_yaml, ("label_threshold", "finite")),
    Case("string for a float (trainer)", _case_string_for_number_in_trainer, ("lr", "expected a number")),
    Case("float for an int (serve)", _case_serve_float_limit, ("max_items_per_request", "integer", "10.5")),
    Case(
        "bank pointer outside versions/",
        _case_bank_pointer_escapes,
        ("CURRENT.json", "not a file in versions/"),
    ),
    Case("truncated CTR weights (serve)", _case_truncated_ctr_weights, ("model.safetensors", "truncated")),
    Case("NaN in CTR weights (serve)", _case_nan_ctr_weights, ("model.safetensors", "NaN/inf")),
    Case("truncated .json.gz names the file", _case_truncated_json_gz, ("reviews.json.gz",)),
    Case(
        "model/bank mismatch (serve)",
        _case_model_bank_mismatch,
        ("does not match model", "trained with bank"),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_bad_input_is_a_named_error_and_changes_nothing(
    case: Case, run_copy: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    argv = case.damage(run_copy)
    before = snapshot(run_copy.parent)
    caplog.set_level(logging.ERROR)
    rc = main(argv)
    captured = capsys.readouterr()
    text = captured.err + captured.out + caplog.text
    assert_named_error(rc, text, case.expect)
    assert snapshot(run_copy.parent) == before, "an artifact changed after a failed command"


def test_bit_flipped_ctr_weights_are_refused(run_copy: Path) -> None:
    from userip.serving.artifacts import load_model
    from userip.utils.artifacts import CorruptArtifactError

    model_dir = run_copy / "ctr" / "dcn+profiles"
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # lowest mantissa bits of the last weight: still finite, still a plausible float
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError):
        load_model(model_dir)


def test_traceback_opt_in_for_debugging(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USERIP_TRACEBACK", "1")
    with pytest.raises(NotADirectoryError):
        main(_case_run_dir_is_a_file(run_copy))


def test_corrupt_cached_lm_is_rebuilt_not_reused(run_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    from userip.lm.offline import verify_artifact

    (lm,) = (run_copy / "lm").iterdir()
    assert verify_artifact(lm) == []
    _flip_middle(lm / "model.safetensors")
    assert verify_artifact(lm) == ["model.safetensors differs from its recorded SHA-256"]
    caplog.set_level(logging.INFO)
    config = _yaml(run_copy, "p.yaml", PROFILE_YAML)
    assert main(["profile", "--run-dir", str(run_copy), "--config", config]) == 0
    assert "failed verification" in caplog.text and "reusing" not in caplog.text
    assert verify_artifact(lm) == []  # rebuilt in place, verifiable again


def test_run_directory_is_relocatable(base_run: Path, tmp_path: Path) -> None:
    """Nothing inside a run names the run's own absolute location; a copy uses its own LM."""
    from userip.profile.stage import read_stage_config, stage_lm_path

    for path in ("profile/stage_config.json", "profile/profile_manifest.json"):
        assert str(base_run) not in (base_run / path).read_text(), path
    assert str(base_run) not in json.dumps(FeatureBank.load(base_run / "bank").manifest)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(base_run, moved)
    stage, _ = read_stage_config(moved)
    assert stage["lm"] == "offline" and stage["lm_path"].startswith("lm/")
    assert Path(stage_lm_path(moved, stage)).resolve().is_relative_to(moved.resolve())


def test_stale_temporaries_are_cleaned_on_the_next_write(run_copy: Path) -> None:
    versions = run_copy / "bank" / "versions"
    stale, fresh = versions / ".v.parquet.abc123.tmp", versions / ".v.parquet.def456.tmp"
    stale.write_bytes(b"killed mid-write")
    fresh.write_bytes(b"a writer still running")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    bank = FeatureBank.load(run_copy / "bank")
    bank.upsert(["newbie"], bank.codes[:1]).write(run_copy / "bank")
    assert not stale.exists() and fresh.exists()
