"""Issue 28, causes 2, 4 and 7: nothing stale, nothing unverified, nothing destroyed by a failed command.

2. Every cached result (``userip run``'s CTR models and data, experiment cells, re-quantized banks) is keyed
   by everything that made it and validated before reuse: a changed config or a damaged record is recomputed.
4. Every load path verifies what it loads: the run's own LM (``explain``, ``--new-users``), CTR weights whose
   content hash was stripped, the profile manifest.
7. A command that fails leaves every earlier artifact byte-identical (``userip train`` builds its model folder
   under a temporary name and moves it into place only on success).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.reliability.reliability_helpers import ERROR_EXIT, assert_named_error, snapshot

from userip.cli import main
from userip.feature_bank import FeatureBank
from userip.utils.io import atomic_write_json

TINY_SETTINGS = """\
source_options: {num_users: 60, num_items: 24}
profile:
  offline_lm: {max_steps: 5, hidden_size: 32, num_layers: 1}
  train: {num_epochs: 1, batch_size: 16, progress: false, checkpoint_every: 0}
  quantization: {kmeans_init_samples: 32}
trainer: {max_epochs: 1, min_epochs: 0}
seeds: [0]
"""


def _fails_cleanly(argv: list[str], folder: Path, capsys: pytest.CaptureFixture, *expect: str) -> str:
    """Run ``argv``: exit 2, one named error holding every ``expect``, no traceback, ``folder`` unchanged."""
    before = snapshot(folder)
    rc = main(argv)
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert_named_error(rc, text, expect)
    assert snapshot(folder) == before, "an artifact changed after a failed command"
    return text


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- 2. stale results reused
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny ``userip run`` (prepare, offline LM, profile, bank, DCN with and without profiles)."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    with _single_thread():
        assert main(["run", "--config", _run_yaml(run)]) == 0
    return run


def _run_yaml(run: Path) -> str:
    path = run.parent / "run.yaml"
    path.write_text(f"run_dir: {run}\n{TINY_SETTINGS}")
    return str(path)


@pytest.fixture
def pipeline_copy(pipeline_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(pipeline_run, target, ignore=shutil.ignore_patterns("logs"))
    return target


def test_run_retrains_ctr_models_when_the_model_config_changed(pipeline_copy: Path) -> None:
    argv = ["run", "--config", _run_yaml(pipeline_copy), "--set", "ctr_model_config.num_cross_layers=1"]
    assert main(argv) == 0
    configs = sorted((pipeline_copy / "ctr").glob("*/config.json"))
    assert len(configs) == 2
    for path in configs:  # what was trained is what was asked, not the earlier 3-layer models
        assert json.loads(path.read_text())["model_config"]["num_cross_layers"] == 1, path


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda m: {**m, "test": {**m["test"], "auc": math.nan}}, id="NaN AUC"),
        pytest.param(lambda m: {}, id="empty JSON object"),
        pytest.param(lambda m: [m], id="a list"),
    ],
)
def test_run_recomputes_a_cached_model_whose_metrics_are_invalid(
    pipeline_copy: Path, damage, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    damaged = pipeline_copy / "ctr" / "dcn-seed0" / "metrics.json"
    damaged.write_text(json.dumps(damage(json.loads(damaged.read_text()))))
    untouched = snapshot(pipeline_copy / "ctr" / "dcn+profiles-seed0")
    caplog.set_level(logging.INFO)
    assert main(["run", "--config", _run_yaml(pipeline_copy)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "not a usable result" in caplog.text and "dcn-seed0" in caplog.text
    summary = json.loads((pipeline_copy / "results" / "summary.json").read_text())
    assert all(math.isfinite(r["auc"]) and math.isfinite(r["logloss"]) for r in summary["results"])
    assert math.isfinite(json.loads(damaged.read_text())["test"]["auc"])  # retrained, valid again
    assert snapshot(pipeline_copy / "ctr" / "dcn+profiles-seed0") == untouched  # the valid one was reused


def test_run_prepares_again_when_the_prepare_settings_changed(pipeline_copy: Path) -> None:
    argv = ["run", "--config", _run_yaml(pipeline_copy), "--set", "prepare.label_threshold=4.0"]
    assert main(argv) == 0
    manifest = json.loads((pipeline_copy / "data" / "manifest.json").read_text())
    assert manifest["config"]["prepare"]["label_threshold"] == 4.0


@pytest.mark.parametrize("damaged", ["profile/stage_config.json", "bank/report.json", "data/manifest.json"])
def test_run_rebuilds_a_stage_whose_record_is_garbage(
    pipeline_copy: Path, damaged: str, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (pipeline_copy / damaged).write_text("[1, 2]")
    caplog.set_level(logging.INFO)
    assert main(["run", "--config", _run_yaml(pipeline_copy)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert damaged.split("/")[-1] in caplog.text  # the log says which record was not trusted
    assert json.loads((pipeline_copy / damaged).read_text()) != [1, 2]  # rebuilt


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny ``userip experiment`` (Table 2 with DCN, Table 3's re-quantized bank), in ``root``."""
    root = tmp_path_factory.mktemp("experiment")
    with _single_thread(), pytest.MonkeyPatch.context() as patch:
        _skip_diagnostics(patch)
        assert main(["experiment", "--config", _experiment_yaml(root)]) == 0
    return root


def _skip_diagnostics(patch: pytest.MonkeyPatch) -> None:
    """The linear probes take most of a tiny experiment's time and no cell depends on them."""
    import userip.pipeline.experiment

    patch.setattr(userip.pipeline.experiment, "write_diagnostics", lambda *args, **kwargs: None)


def _experiment_yaml(root: Path, requantize_epochs: int = 1) -> str:
    path = root / "experiment.yaml"
    path.write_text(
        f"name: tiny\nrun_dir: {root / 'run'}\nout_dir: {root / 'out'}\n{TINY_SETTINGS}"
        f"tables: [table2, table3]\nbaselines: [dcn]\nrequantize_epochs: {requantize_epochs}\n"
    )
    return str(path)


@pytest.fixture
def experiment_copy(experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _skip_diagnostics(monkeypatch)
    for part in ("run", "out"):
        shutil.copytree(experiment / part, tmp_path / part, ignore=shutil.ignore_patterns("logs"))
    return tmp_path


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c: {**c, "auc": math.nan}, id="NaN AUC"),
        pytest.param(lambda c: {**c, "logloss": "0.6"}, id="string logloss"),
        pytest.param(lambda c: {}, id="empty JSON object"),
    ],
)
def test_experiment_recomputes_an_invalid_cell(
    experiment_copy: Path, damage, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    cells = experiment_copy / "out" / "cells"
    (damaged,) = cells.glob("dcn__base__seed0__*.json")
    damaged.write_text(json.dumps(damage(json.loads(damaged.read_text()))))
    others = {p.name: p.read_bytes() for p in cells.glob("*.json") if p != damaged}
    caplog.set_level(logging.INFO)
    assert main(["experiment", "--config", _experiment_yaml(experiment_copy)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "not a usable result" in caplog.text and damaged.name in caplog.text
    recomputed = json.loads(damaged.read_text())
    assert math.isfinite(recomputed["auc"]) and isinstance(recomputed["logloss"], float)
    assert {p.name: p.read_bytes() for p in cells.glob("*.json") if p != damaged} == others
    results = (experiment_copy / "out" / "results.csv").read_text()
    assert "nan" not in results.lower()


def test_experiment_requantizes_again_when_its_epochs_changed(experiment_copy: Path) -> None:
    (version,) = (experiment_copy / "out" / "banks").iterdir()
    assert len(list(version.glob("novq*"))) == 1
    assert main(["experiment", "--config", _experiment_yaml(experiment_copy, requantize_epochs=2)]) == 0
    # A second bank, keyed by its epochs: the one re-quantized for 1 epoch is not reused.
    assert len(list(version.glob("novq*"))) == 2


def test_an_experiment_that_fails_keeps_its_earlier_outputs(
    experiment_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import userip.pipeline.experiment

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("cell failed")

    monkeypatch.setattr(userip.pipeline.experiment, "train_ctr", fail)
    config = Path(_experiment_yaml(experiment_copy))
    config.write_text(config.read_text().replace("seeds: [0]", "seeds: [0, 1]"))  # cells to compute
    before = snapshot(experiment_copy)
    rc = main(["experiment", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == ERROR_EXIT and "cell failed" in err and "Traceback" not in err
    after = snapshot(experiment_copy)
    for changed in ("out/experiment.log", "experiment.yaml"):  # the command's own log; its input
        before.pop(changed, None)
        after.pop(changed, None)
    assert after == before


def test_reuse_rule_keys_and_validates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The one rule every cache goes through: reused only under the same key and when its check passes."""
    from userip.utils.artifacts import CorruptArtifactError, check_record, reuse_cached

    path = tmp_path / "cell.json"

    def check(record: object, where: Path) -> None:
        check_record(record, where, {"auc": (int, float)}, finite=("auc",))

    key = {"trainer": {"lr": 0.01}, "dataset": "abc", "shape": (1, 2)}
    assert reuse_cached(path, key, "cell", check) is None  # nothing cached
    atomic_write_json(path, {"auc": 0.7, "cache_key": key})
    assert reuse_cached(path, key, "cell", check) == {"auc": 0.7}
    caplog.set_level(logging.INFO)
    assert reuse_cached(path, {**key, "dataset": "other"}, "cell", check) is None
    assert "made from other inputs (dataset differ)" in caplog.text
    atomic_write_json(path, {"auc": math.nan, "cache_key": key})
    assert reuse_cached(path, key, "cell", check) is None
    assert "field 'auc' is nan, expected a finite number" in caplog.text
    with pytest.raises(CorruptArtifactError, match="field 'test.auc' is missing"):
        check_record({"test": {}}, "metrics.json", {"test.auc": float})


# ------------------------------------------------------------------------------- 4. unverified loads
def _lm_weights(run: Path) -> Path:
    (lm,) = (run / "lm").iterdir()
    return lm / "model.safetensors"


def _flip_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def _noise(path: Path) -> None:
    """A well-formed safetensors file with slightly different weights (what a silent swap looks like)."""
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(0)
    state = {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in state.items()
    }
    save_file(state, str(path), metadata={"format": "pt"})


def _new_users(run: Path) -> list[str]:
    path = run.parent / "new.csv"
    path.write_text("raw_user_id,raw_item_id,rating\nnewbie,i00,5\nnewbie,i01,4\n")
    return ["profile", "--run-dir", str(run), "--new-users", str(path)]


def test_explain_refuses_a_flipped_lm(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    _flip_middle(_lm_weights(run_copy))
    argv = ["explain", "--run-dir", str(run_copy), "--limit", "2"]
    _fails_cleanly(argv, run_copy.parent, capsys, "CorruptArtifactError", "model.safetensors", "SHA-256")


def test_new_users_refuse_a_noised_lm(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    _noise(_lm_weights(run_copy))
    argv = _new_users(run_copy)
    _fails_cleanly(argv, run_copy.parent, capsys, "CorruptArtifactError", "model.safetensors", "SHA-256")


def test_a_truncated_lm_is_named(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    weights = _lm_weights(run_copy)
    weights.write_bytes(weights.read_bytes()[:3000])
    argv = ["explain", "--run-dir", str(run_copy), "--limit", "2"]
    _fails_cleanly(argv, run_copy.parent, capsys, str(weights.parent), "model.safetensors")


def test_ctr_weights_without_their_content_hash_are_refused(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = run_copy / "ctr" / "dcn+profiles" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # same tensors, the hash metadata stripped
    argv = ["serve", "--run-dir", str(run_copy), "--port", "0"]
    _fails_cleanly(argv, run_copy.parent, capsys, "model.safetensors", "records no content hash")


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        pytest.param("[1, 2]", "expected a JSON object", id="a list"),
        pytest.param('{"lm": "lm/x", "dataset_hash": "d", "num_users": 3}', "'value_words'", id="no words"),
        pytest.param(
            '{"lm": "lm/x", "dataset_hash": "d", "num_users": 3, "value_words": {"hobby": 3}}',
            "'value_words.hobby'",
            id="words not a list",
        ),
    ],
)
def test_new_users_refuse_a_garbage_profile_manifest(
    run_copy: Path, manifest: str, field: str, capsys: pytest.CaptureFixture
) -> None:
    (run_copy / "profile" / "profile_manifest.json").write_text(manifest)
    _fails_cleanly(_new_users(run_copy), run_copy.parent, capsys, "profile_manifest.json", field)


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        pytest.param("[1]", "expected a JSON object", id="a list"),
        pytest.param("{}", "'format_version'", id="{}"),
    ],
)
def test_train_refuses_a_garbage_data_manifest(
    run_copy: Path, manifest: str, field: str, capsys: pytest.CaptureFixture
) -> None:
    (run_copy / "data" / "manifest.json").write_text(manifest)
    argv = ["train", "--model", "dcn", "--run-dir", str(run_copy), "--epochs", "1"]
    _fails_cleanly(argv, run_copy.parent, capsys, "data/manifest.json", field)


# ------------------------------------------------------------------------------- 7. failed commands destroy
def test_training_against_another_datasets_bank_keeps_the_earlier_model(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    bank = FeatureBank.load(run_copy / "bank")
    FeatureBank.build(
        profile_names=bank.profile_names,
        codebooks=bank.codebooks,
        codes=bank.codes,
        raw_user_ids=bank.raw_user_ids,
        dataset_hash="0123456789abcdef",  # built from another data set
    ).write(run_copy.parent / "other-bank")
    argv = ["train", "--model", "dcn", "--run-dir", str(run_copy), "--with-profiles"]
    argv += ["--bank", str(run_copy.parent / "other-bank"), "--epochs", "1"]
    _fails_cleanly(argv, run_copy.parent, capsys, "BankMismatchError", "0123456789abcdef")
    assert (run_copy / "ctr" / "dcn+profiles" / "metrics.json").is_file()


def test_a_run_that_fails_keeps_its_earlier_config_and_results(
    pipeline_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import userip.pipeline.run

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("ctr stage failed")

    monkeypatch.setattr(userip.pipeline.run, "stage_ctr", fail)
    argv = ["run", "--config", _run_yaml(pipeline_copy), "--set", "seeds=[0,1]"]
    _fails_cleanly(argv, pipeline_copy, capsys, "ctr stage failed")


def test_training_that_fails_midway_keeps_the_earlier_model(
    run_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import userip.ctr.recipe

    def fail(*args: object, **kwargs: object) -> None:  # after the checkpoint was written, before metrics
        raise ValueError("scoring failed")

    monkeypatch.setattr(userip.ctr.recipe, "score_test", fail)
    argv = ["train", "--model", "dcn", "--run-dir", str(run_copy), "--with-profiles", "--epochs", "1"]
    _fails_cleanly(argv, run_copy.parent, capsys, "scoring failed")
    assert not [p for p in (run_copy / "ctr").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_converted_gguf_model_is_verified_before_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The GGUF conversion is a cache too: keyed by the GGUF's SHA-256, its files checked on every reuse."""
    from userip.lm import gguf
    from userip.utils.artifacts import folder_hashes

    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF stand-in")
    sha = gguf.file_sha256(source)
    folder = tmp_path / "cache" / f"gguf-{sha[:16]}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    files = folder_hashes(folder)
    atomic_write_json(folder / gguf.CONVERTED_MANIFEST, {"sha256": sha, "files": files})
    converted: list[Path] = []
    monkeypatch.setattr(gguf, "_convert", lambda path, out, digest: converted.append(out))
    assert gguf.converted_folder(source, tmp_path / "cache") == folder and not converted  # verified: reused
    (folder / "model.safetensors").write_bytes(b"weightz")
    caplog.set_level(logging.WARNING)
    assert gguf.converted_folder(source, tmp_path / "cache") == folder and converted == [folder]
    assert "model.safetensors differs from its recorded SHA-256" in caplog.text
