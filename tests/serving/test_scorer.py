"""The scoring library against the training pipeline's own encoding, unknown IDs, and bank reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.serving.serving_helpers import BANKLESS_USER, shifted_bank

from userip.ctr.data import build_ctr_data
from userip.ctr.encoding import FeatureEncoder, Vocabulary
from userip.ctr.features import FeatureMap, Field, FieldSource
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.serving.artifacts import ArtifactError
from userip.serving.config import ServeConfig
from userip.serving.scorer import BankReloadError, Scorer, ScoringError
from userip.utils.config import ConfigError, from_dict


def _test_pairs(run_dir: Path) -> tuple[np.ndarray, np.ndarray, Dataset]:
    ds = Dataset.load(run_dir)
    test = ds.split("test")
    users = ds.users["raw_user_id"].to_numpy()[test["user_id"].to_numpy()]
    items = ds.items["raw_item_id"].to_numpy()[test["item_id"].to_numpy()]
    return users, items, ds


@pytest.mark.parametrize("model", ["dcn", "dcn+profiles", "gender"])
def test_scores_equal_the_trained_model_on_the_training_encoding(run_dir: Path, model: str) -> None:
    scorer = Scorer.from_run_dir(run_dir, model=model)
    users, items, ds = _test_pairs(run_dir)
    features = ("gender",) if model == "gender" else ()
    bank = FeatureBank.load(run_dir / "bank") if "dcn+" in model or model == "gender" else None
    x = build_ctr_data(ds, bank, features)["test"].x_ids
    # Scores are calibrated with the Platt fit recorded at training time (metrics.json), not raw sigmoids.
    recorded = json.loads((run_dir / "ctr" / model / "metrics.json").read_text())["calibration"]
    assert recorded != {"scale": 1.0, "bias": 0.0}
    with torch.inference_mode():
        logits = scorer.model(x).double().numpy()
    expected = 1.0 / (1.0 + np.exp(-(recorded["scale"] * logits + recorded["bias"])))
    result = scorer.score(users, items)
    np.testing.assert_allclose(result.probs, expected, rtol=0, atol=1e-6)
    assert np.abs(result.probs - 1.0 / (1.0 + np.exp(-logits))).max() > 1e-3  # not the raw probabilities
    assert scorer.describe()["calibration"] == recorded
    assert result.probs.dtype == np.float32
    assert (result.bank_version is None) == (model == "dcn")


def test_unknown_ids_get_reserved_indices_and_are_flagged(run_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles")
    users = ["user1", "nobody", BANKLESS_USER, 1]  # int 1 -> "1": not a raw id of this dataset
    items = ["item0", "item1", "no-such-item", "item2"]
    result = scorer.score(users, items)
    assert result.unknown_user.tolist() == [False, True, True, True]
    assert result.unknown_item.tolist() == [False, False, True, False]
    # An unknown user is the all-zero user row: same score as any other unknown user.
    a = scorer.score(["nobody", "somebody-else"], ["item3", "item3"]).probs
    assert a[0] == a[1]
    # The bankless user keeps its user_id index but gets profile index 0.
    x = scorer.encode([BANKLESS_USER, "user1"], ["item0", "item0"]).x_ids
    assert x[0, 0] > 0 and x[0, 2:].tolist() == [0, 0] and (x[1, 2:] > 0).all()
    assert scorer.score([BANKLESS_USER], ["item0"]).probs[0] == scorer.predict_ids(x[:1])[0]


def test_single_user_broadcast_and_id_types(run_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles")
    items = ["item0", "item5", "item9"]
    one = scorer.score("user3", items)
    many = scorer.score(["user3"] * 3, items)
    np.testing.assert_array_equal(one.probs, many.probs)
    assert scorer.score(["user3"], []).probs.shape == (0,)
    with pytest.raises(ScoringError, match="2 entries but item_ids has 3"):
        scorer.score(["user3", "user4"], items)
    for bad in (1.5, None, True, b"user3"):
        with pytest.raises(ScoringError, match="strings or integers"):
            scorer.score([bad], ["item0"])


def test_reload_switches_versions_and_keeps_old_on_failure(run_dir: Path, bank_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    v1 = scorer.snapshot.version
    before = scorer.score("user3", ["item0", "item1"])
    assert not scorer.reload_bank().changed  # nothing published

    v2_bank = shifted_bank(FeatureBank.load(bank_dir))
    v2_bank.write(bank_dir)
    result = scorer.reload_bank()
    assert (result.changed, result.previous_version, result.version) == (True, v1, v2_bank.version)
    after = scorer.score("user3", ["item0", "item1"])
    assert after.bank_version == v2_bank.version
    assert not np.array_equal(before.probs, after.probs)

    (bank_dir / "CURRENT.json").write_text("{not json")  # a broken publish
    with pytest.raises(BankReloadError, match="still serving bank version"):
        scorer.reload_bank()
    assert scorer.snapshot.version == v2_bank.version
    assert "unreadable bank pointer" in scorer.describe()["last_reload_error"]
    np.testing.assert_array_equal(scorer.score("user3", ["item0", "item1"]).probs, after.probs)


def test_reload_refuses_a_bank_that_does_not_fit_the_model(run_dir: Path, bank_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    old = FeatureBank.load(bank_dir)
    wider = FeatureBank.build(
        profile_names=old.profile_names,
        codebooks=[np.zeros((5, 8)), np.zeros((3, 8))],
        codes=np.zeros_like(old.codes),
        raw_user_ids=old.raw_user_ids,
        dataset_hash=old.dataset_hash,
    )
    wider.write(bank_dir)
    with pytest.raises(BankReloadError, match="'hobby' has 5 codes; the model was trained with 4"):
        scorer.reload_bank()
    foreign = FeatureBank.build(
        profile_names=old.profile_names,
        codebooks=old.codebooks,
        codes=old.codes,
        raw_user_ids=old.raw_user_ids,
        dataset_hash="another-dataset",
    )
    foreign.write(bank_dir)
    with pytest.raises(BankReloadError, match="built from dataset 'another-dataset'"):
        scorer.reload_bank()
    continuous = FeatureBank.build(
        profile_names=old.profile_names,
        codebooks=old.codebooks,
        codes=old.codes,
        raw_user_ids=old.raw_user_ids,
        dataset_hash=old.dataset_hash,
        kind="continuous",
        profile_vectors=np.zeros((len(old.codes), 2, 4)),
    )
    with pytest.raises(BankReloadError, match="without-VQ"):
        scorer.set_bank(continuous)
    assert scorer.snapshot.version == old.version


def test_missing_artifacts_and_bad_config_are_named(run_dir: Path, tmp_path: Path) -> None:
    assert Scorer.from_run_dir(run_dir).model_name == "dcn+profiles"  # preferred among several
    with pytest.raises(ArtifactError, match="no complete trained model"):
        Scorer.from_run_dir(run_dir, model="pnn")
    with pytest.raises(ArtifactError, match="run `userip train` first"):
        Scorer.from_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="max_items_per_request"):
        from_dict(ServeConfig, {"max_items_per_request": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {"max_itemz": 3})
    fm = FeatureMap((Field("user_id", 3), Field("item_id", 3), Field("age", 3, FieldSource.USER)))
    encoder = FeatureEncoder({"user_id": Vocabulary((0, 1)), "item_id": Vocabulary((0, 1))})
    with pytest.raises(ValueError, match="needs its raw values"):
        Scorer(torch.nn.Identity(), fm, encoder, ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="profile fields .* but no feature bank"):
        fm = FeatureMap((Field("user_id", 3), Field("item_id", 3), Field("hobby", 3, FieldSource.PROFILE)))
        Scorer(torch.nn.Identity(), fm, encoder, ["a", "b"], ["x", "y"])
