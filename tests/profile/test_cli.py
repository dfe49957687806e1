from __future__ import annotations

import pytest
from safetensors.torch import load_file

from userip.cli import main
from userip.profile.lm import LMLoadError, load_causal_lm
from userip.profile.recipe import load_soft_tokens
from userip.utils.io import read_json

from .conftest import STORIES, history_dataset


def test_profile_cli_stories260k(tmp_path):
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found (shared models folder absent)")
    ds = history_dataset(num_users=6)
    ds.save(tmp_path / "data")
    rc = main(
        ["profile", "--run-dir", str(tmp_path), "--lm", str(STORIES), "--epochs", "1", "--batch-size", "4"]
    )
    assert rc == 0
    soft, trained, manifest = load_soft_tokens(tmp_path)
    assert soft.shape == (6, 2, 64) and trained.all()
    assert manifest["dataset_hash"] == ds.content_hash and manifest["steps"] == 2
    ckpt = read_json(tmp_path / "profile" / "checkpoints" / "checkpoint.json")
    assert ckpt["state"]["step"] == 2
    assert (load_file(str(tmp_path / "profile" / "checkpoints" / ckpt["tensors"]))["table"] == soft).all()
    assert (tmp_path / "logs" / "profile.log").read_text().count("soft tokens ->") == 1


def test_bad_lm_paths(tmp_path):
    with pytest.raises(LMLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing"))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(LMLoadError, match="not a causal language model"):
        load_causal_lm(str(tmp_path / "vit"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_cli_reports_bad_config(tmp_path, capsys):
    history_dataset(num_users=3).save(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch_sise: 3\n")
    assert main(["profile", "--run-dir", str(tmp_path), "--lm", "x", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "userip profile: error: ConfigError:" in err and "batch_sise" in err
    assert "batch_sise" in (tmp_path / "logs" / "profile.log").read_text()  # the log file has it too


def test_set_overrides_reach_the_config_and_a_bad_key_exits_2(tmp_path, capsys):
    from userip.cli import build_parser
    from userip.profile.cli import build_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    args = build_parser(only="profile").parse_args(
        ["profile", "--run-dir", str(tmp_path), "--config", str(cfg), "--lr", "0.2",
         "--set", "train.num_epochs=3", "--set", "quantization.beta=0.5", "--set", "train.lr=0.05"]
    )  # fmt: skip
    config = build_config(args)
    assert (config.train.num_epochs, config.quantization.beta, config.train.lr) == (3, 0.5, 0.05)
    assert main(["profile", "--run-dir", str(tmp_path), "--set", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "Traceback" not in err
    assert not (tmp_path / "profile").exists() and not (tmp_path / "lm").exists()  # no work done
