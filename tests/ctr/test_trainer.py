import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from userip.cli import main as cli_main
from userip.ctr.calibration import split_calibration
from userip.ctr.data import BankMismatchError, SplitTensors
from userip.ctr.features import FeatureMap, Field
from userip.ctr.models import build_model
from userip.ctr.recipe import train_ctr
from userip.ctr.trainer import CTRTrainerConfig, Trainer, parameter_groups, predict_probs
from userip.data.schema import Dataset
from userip.evaluation import auc, logloss
from userip.utils.config import ConfigError, from_dict

NUM_USERS, NUM_ITEMS = 40, 20
FAST = {"lr": 0.02, "batch_size": 128, "max_epochs": 6, "patience": 2}
SMALL_DCN = {"embedding_dim": 4, "num_cross_layers": 1, "hidden_units": (8,), "dropout": 0.0}


def planted_split(n: int, seed: int) -> SplitTensors:
    """Two fields (user, item); the label is 1 with probability 0.9 iff user and item parity agree."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(1, NUM_USERS + 1, (n,), generator=g)
    items = torch.randint(1, NUM_ITEMS + 1, (n,), generator=g)
    agree = (users % 2 == items % 2).float()
    labels = (torch.rand(n, generator=g) < 0.1 + 0.8 * agree).float()
    return SplitTensors(torch.stack([users, items], 1), labels)


def feature_map() -> FeatureMap:
    return FeatureMap((Field("user_id", NUM_USERS + 1), Field("item_id", NUM_ITEMS + 1)))


def planted_dataset(seed: int = 0) -> Dataset:
    """A Dataset whose labels follow the planted parity rule; split 80/10/10 at random."""
    split = planted_split(2000, seed)
    rng = np.random.default_rng(seed)
    labels = split.labels.numpy().astype(np.int8)
    interactions = pd.DataFrame(
        {
            "user_id": split.x_ids[:, 0].numpy() - 1,
            "item_id": split.x_ids[:, 1].numpy() - 1,
            "rating": np.where(labels == 1, 5.0, 2.0).astype(np.float32),
            "label": labels,
            "timestamp": np.arange(len(labels), dtype=np.int64),
            "split": rng.choice(["train", "valid", "test"], len(labels), p=[0.8, 0.1, 0.1]).astype(object),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(NUM_ITEMS, dtype=np.int64),
            "raw_item_id": [f"i{k}" for k in range(NUM_ITEMS)],
            "title": "t",
            "categories": [["c"]] * NUM_ITEMS,
            "brand": "",
            "price": np.nan,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(NUM_USERS, dtype=np.int64),
            "raw_user_id": [f"u{k}" for k in range(NUM_USERS)],
            "parity": ["even" if k % 2 == 0 else "odd" for k in range(NUM_USERS)],
        }
    )
    return Dataset(interactions, items, users, source="planted")


@dataclasses.dataclass
class StubBank:
    """Test double of the feature bank: profile 'parity' = user_id % 2 (the planted factor)."""

    dataset_hash: str
    profile_names: list[str] = dataclasses.field(default_factory=lambda: ["parity"])
    codebook_sizes: list[int] = dataclasses.field(default_factory=lambda: [2])
    version: str = "stub"

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        return (user_ids % 2).reshape(-1, 1)


# ------------------------------------------------------------------------------------------ config
def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="batch_size"):
        CTRTrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        CTRTrainerConfig(lr=-1.0)
    with pytest.raises(ValueError, match="patience"):
        CTRTrainerConfig(patience=0)
    with pytest.raises(ValueError, match="min_epochs"):
        CTRTrainerConfig(max_epochs=5, min_epochs=6)
    with pytest.raises(ConfigError, match="unknown key.*'epochs'"):
        from_dict(CTRTrainerConfig, {"epochs": 3})
    assert from_dict(CTRTrainerConfig, {"lr": 1, "max_epochs": 2}).lr == 1.0


def test_parameter_groups_separate_embeddings():
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    groups = parameter_groups(model, weight_decay=0.1, embedding_weight_decay=0.01)
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert [id(p) for p in by_decay[0.01]] == [id(p) for p in model.embedding_parameters()]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ trainer
class RecordingModel(nn.Module):
    """Logit = a learned bias; records every batch of x_ids it is fed during training."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x_ids.clone())
        return self.bias.expand(x_ids.shape[0])


def test_epoch_visits_every_row_once_in_shuffled_batches():
    n = 1003  # not a multiple of the batch size
    x_ids = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
    model = RecordingModel()
    trainer = Trainer(model, CTRTrainerConfig(batch_size=100, max_epochs=2))
    trainer.fit(SplitTensors(x_ids, torch.ones(n)))
    assert [len(b) for b in model.seen] == [100] * 10 + [3] + [100] * 10 + [3]
    epoch1 = torch.cat(model.seen[:11])[:, 0]
    epoch2 = torch.cat(model.seen[11:])[:, 0]
    assert sorted(epoch1.tolist()) == list(range(n)) == sorted(epoch2.tolist())
    assert not torch.equal(epoch1, torch.arange(n)) and not torch.equal(epoch1, epoch2)  # shuffled each epoch
    assert model.bias.item() > 0  # all labels are 1: BCE pushes the bias up


def test_learns_planted_signal_and_restores_best(tmp_path):
    train, valid = planted_split(3000, 1), planted_split(600, 2)
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    trainer = Trainer(model, CTRTrainerConfig(**FAST, seed=3))
    fit = trainer.fit(train, valid, checkpoint_path=tmp_path / "best.safetensors")
    aucs = [r.valid_auc for r in fit.history]
    # The checkpoint rule: lowest calibrated valid Logloss among epochs within the tolerance of the best AUC.
    window = [r for r in fit.history if r.valid_auc >= max(aucs) - trainer.config.checkpoint_auc_tolerance]
    chosen = min(window, key=lambda r: r.valid_logloss)
    assert fit.best_epoch == chosen.epoch
    assert fit.best_valid_auc == chosen.valid_auc > 0.8  # Bayes AUC of the planted rule is 0.9
    # The model holds the chosen epoch's weights and calibration, and so does the checkpoint.
    again = trainer.evaluate(valid)
    assert again["auc"] == pytest.approx(chosen.valid_auc, abs=1e-12)
    assert again["logloss"] == pytest.approx(chosen.valid_logloss, abs=1e-9)
    assert again["logloss_raw"] == pytest.approx(chosen.valid_logloss_raw, abs=1e-9)
    assert again["logloss"] <= again["logloss_raw"] + 1e-9  # Platt's fit can only lower the valid NLL
    saved = load_file(str(tmp_path / "best.safetensors"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(saved[name], tensor)
    assert float(saved["calibration.scale"]) == fit.calibration.scale == trainer.calibration.scale
    assert float(saved["calibration.bias"]) == fit.calibration.bias
    assert not model.training

    # Tolerance 0: the best-AUC epoch, as a pure-AUC rule would choose.
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    strict = Trainer(model, CTRTrainerConfig(**FAST, seed=3, checkpoint_auc_tolerance=0.0)).fit(train, valid)
    assert strict.best_epoch == int(np.argmax([r.valid_auc for r in strict.history])) + 1


def test_early_stopping_on_noise():
    train = planted_split(1000, 4)
    noise = SplitTensors(
        planted_split(400, 5).x_ids,
        (torch.rand(400, generator=torch.Generator().manual_seed(6)) < 0.5).float(),
    )
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    fit = Trainer(model, CTRTrainerConfig(lr=0.05, batch_size=64, max_epochs=30, patience=1)).fit(
        train, noise
    )
    assert fit.stopped_early and len(fit.history) < 30
    assert len(fit.history) == fit.best_epoch + 1  # stops right after the first epoch without a gain

    # With a floor it keeps going to min_epochs, then stops at the first epoch without a gain after it.
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    config = CTRTrainerConfig(lr=0.05, batch_size=64, max_epochs=30, patience=1, min_epochs=8)
    floored = Trainer(model, config).fit(train, noise)
    aucs = [r.valid_auc for r in floored.history]
    assert len(aucs) >= 8 and floored.stopped_early
    assert aucs[-1] <= max(aucs[:-1])  # the last epoch gained nothing
    assert all(
        a > max(aucs[:i]) for i, a in enumerate(aucs[8:-1], start=8)
    )  # every epoch after 8 but the last gained
    assert floored.best_epoch == int(np.argmax(aucs)) + 1


def test_same_seed_same_model_different_seed_differs():
    train, test = planted_split(800, 7), planted_split(200, 8)

    def run(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        model = build_model("dcn", feature_map(), **{**SMALL_DCN, "dropout": 0.2})
        trainer = Trainer(model, CTRTrainerConfig(**{**FAST, "max_epochs": 2}, seed=seed))
        trainer.fit(train)
        return trainer.predict(test.x_ids)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_predict_probs_batches_and_restores_mode():
    model = build_model("dcn", feature_map(), **{**SMALL_DCN, "dropout": 0.5})
    x_ids = planted_split(300, 9).x_ids
    model.train()
    probs = predict_probs(model, x_ids, batch_size=7)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x_ids)).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ recipe and CLI
@pytest.fixture
def run_dir(tmp_path):
    planted_dataset().save(tmp_path / "data")
    return tmp_path


def test_train_ctr_writes_artifacts_that_reproduce_predictions(run_dir):
    result = train_ctr(run_dir, "dcn", model_config=SMALL_DCN, config=CTRTrainerConfig(**FAST), seed=5)
    out = run_dir / "ctr" / "dcn"
    assert result.output_dir == out
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "feature_map.json",
        "encoder.json",
        "config.json",
        "metrics.json",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["auc"] == pytest.approx(result.test["auc"])
    assert metrics["valid"]["auc"] == pytest.approx(result.valid["auc"])
    assert result.test["auc"] == pytest.approx(auc(result.test_labels, result.test_probs))
    assert result.test["auc"] > 0.75
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"]["seed"] == 5 and config["model_config"]["embedding_dim"] == 4
    # Reload from the artifacts alone and reproduce the test probabilities.
    fm = FeatureMap.from_dict(json.loads((out / "feature_map.json").read_text()))
    fresh = build_model(config["model"], fm, **config["model_config"])
    calibration, state = split_calibration(load_file(str(out / "model.safetensors")))
    assert calibration == result.fit.calibration and metrics["calibration"] == dataclasses.asdict(calibration)
    fresh.load_state_dict(state)
    probs = predict_probs(fresh, result.data["test"].x_ids, calibration=calibration)
    np.testing.assert_allclose(probs, result.test_probs, atol=1e-6)
    assert result.test["logloss"] == pytest.approx(logloss(result.test_labels, result.test_probs))
    raw = predict_probs(fresh, result.data["test"].x_ids)
    assert result.test["logloss_raw"] == pytest.approx(logloss(result.test_labels, raw), abs=1e-6)


def test_train_ctr_with_profiles_and_bank_checks(run_dir):
    ds = Dataset.load(run_dir)
    result = train_ctr(
        ds,
        "dcn",
        with_profiles=True,
        bank=StubBank(ds.content_hash),
        model_config=SMALL_DCN,
        config=CTRTrainerConfig(**FAST),
    )
    assert result.data.feature_map.names == ["user_id", "item_id", "parity"]
    assert result.output_dir is None  # a Dataset without output_dir writes nothing
    with pytest.raises(BankMismatchError, match="rerun `userip profile`"):
        train_ctr(ds, "dcn", with_profiles=True, bank=StubBank("ffffffffffffffff"))
    with pytest.raises(FileNotFoundError, match="userip profile"):
        train_ctr(run_dir, "dcn", with_profiles=True)  # no RUN/bank
    with pytest.raises(ValueError, match="with_profiles"):
        train_ctr(ds, "dcn", bank=StubBank(ds.content_hash))


def test_train_ctr_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        train_ctr(tmp_path / "missing", "dcn")
    with pytest.raises(ValueError, match="unknown CTR model 'nope'"):
        train_ctr(tmp_path / "missing", "nope")


def test_cli_prints_table_and_writes_metrics(run_dir, tmp_path, capsys):
    cfg = tmp_path / "model.yaml"
    cfg.write_text("model:\n  embedding_dim: 4\n  hidden_units: [8]\ntrainer:\n  patience: 1\n")
    rc = cli_main(
        ["train", "--model", "dcn", "--run-dir", str(run_dir), "--epochs", "2", "--batch-size", "256",
         "--lr", "0.01", "--user-features", "parity", "--model-config", str(cfg), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    metrics = json.loads((run_dir / "ctr" / "dcn" / "metrics.json").read_text())
    assert "| split | AUC | Logloss |" in printed
    assert f"| test | {metrics['test']['auc']:.4f} | {metrics['test']['logloss']:.4f} |" in printed
    assert metrics["fields"] == ["user_id", "item_id", "parity"]
    config = json.loads((run_dir / "ctr" / "dcn" / "config.json").read_text())
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["patience"] == 1
    assert config["model_config"]["hidden_units"] == [8]
    assert (run_dir / "logs" / "train.log").exists()


def test_cli_missing_run_dir(tmp_path, capsys):
    assert cli_main(["train", "--model", "dcn", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_bad_input_ends_with_one_line(run_dir, capsys):
    def error_line(argv: list[str]) -> str:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert re.search(
        "userip train: error: .*unknown CTR model 'nope'",
        error_line(["train", "--model", "nope", "--run-dir", str(run_dir)]),
    )
    assert re.search(
        "userip train: error: .*no feature bank here",
        error_line(["train", "--model", "dcn", "--run-dir", str(run_dir), "--with-profiles"]),
    )
    bad = run_dir / "bad.yaml"
    bad.write_text("trainer:\n  epochs: 3\n")
    assert re.search(
        "userip train: error: .*bad.yaml:trainer: unknown key",
        error_line(["train", "--run-dir", str(run_dir), "--model-config", str(bad)]),
    )


def test_cli_set_reaches_the_trainer_config_and_a_bad_key_exits_2(run_dir, capsys, monkeypatch):
    import userip.ctr.recipe as recipe

    seen = {}

    def fake_train_ctr(run_dir, model, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(recipe, "train_ctr", fake_train_ctr)
    argv = ["train", "--run-dir", str(run_dir), "--lr", "0.5", "--no-progress"]
    assert (
        cli_main(
            [
                *argv,
                "--set",
                "trainer.lr=0.02",
                "--set",
                "trainer.patience=2",
                "--set",
                "model.embedding_dim=4",
            ]
        )
        == 2
    )
    assert "stop here" in capsys.readouterr().err
    config = seen["config"]
    assert (config.lr, config.patience, config.progress) == (0.02, 2, False)
    assert seen["model_config"]["embedding_dim"] == 4
    seen.clear()
    for item, key in (("trainer.no_such_key=1", "no_such_key"), ("trainr.lr=1", "trainr")):
        assert cli_main([*argv, "--set", item]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err
    assert not seen  # failed before training


def test_user_id_dropout_trains_the_unknown_user_row():
    """Without dropout the unknown user's embedding row (field 0, index 0) never moves; with it, it learns,
    and the training tensors themselves are left untouched."""
    train, valid = planted_split(2000, 0), planted_split(500, 1)
    original = train.x_ids.clone()
    moved = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        model = build_model("dcn", feature_map(), **SMALL_DCN)
        before = model.embedding.weight[0].detach().clone()
        Trainer(model, CTRTrainerConfig(**{**FAST, "max_epochs": 2}, user_id_dropout=p)).fit(train, valid)
        moved[p] = float((model.embedding.weight[0].detach() - before).abs().max())
    assert moved[0.0] == 0.0 and moved[0.3] > 1e-4
    assert torch.equal(train.x_ids, original)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_user_id_dropout_must_be_a_share(value):
    with pytest.raises(ValueError, match="user_id_dropout"):
        CTRTrainerConfig(user_id_dropout=value)


def test_train_ctr_warm_start_starts_from_the_base_model_and_cannot_lose_on_valid(run_dir):
    ds = Dataset.load(run_dir)
    config = CTRTrainerConfig(**FAST)
    base = train_ctr(ds, "dcn", model_config=SMALL_DCN, config=config, seed=3)
    result = train_ctr(
        ds,
        "dcn",
        with_profiles=True,
        bank=StubBank(ds.content_hash),
        model_config=SMALL_DCN,
        config=dataclasses.replace(config, warm_start=True),
        seed=3,
    )
    # Epoch 0 is the base model itself (same settings and seed), and the best epoch cannot be below it.
    assert result.fit.history[0].epoch == 0
    assert result.fit.history[0].valid_auc == pytest.approx(base.valid["auc"], abs=1e-12)
    assert result.valid["auc"] >= base.valid["auc"]
    # Without extra fields warm_start changes nothing.
    same = train_ctr(
        ds, "dcn", model_config=SMALL_DCN, config=dataclasses.replace(config, warm_start=True), seed=3
    )
    np.testing.assert_array_equal(same.test_probs, base.test_probs)
