"""PEPLER end to end on the tiny movie dataset and the tiny Llama (conftest): training, selection on
validation, the text target and its labels, the frozen/fine-tuned LM, outputs, and config validation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from userip.baselines.pepler import (
    IGNORE_INDEX,
    PEPLERConfig,
    PEPLERModel,
    PEPLERResult,
    build_text_targets,
    item_description,
    train_pepler,
)
from userip.ctr.recipe import CTRResult
from userip.data.schema import Dataset
from userip.evaluation import logloss
from userip.utils.artifacts import load_tensors
from userip.utils.config import ConfigError

# The default rating head (3 sigmoid layers) sits on a plateau for many steps at lr 1e-3 on 256 rows; these
# settings leave it in a few epochs (measured: valid AUC ~0.75-0.8 by epoch 5).
FAST = {"lr": 3e-3, "batch_size": 16}
# A one-layer head at lr 1e-2 learns the label within an epoch or two: for the selection test.
QUICK = {"lr": 1e-2, "batch_size": 32, "mlp_layers": 1}


def _with_interactions(dataset: Dataset, inter) -> Dataset:
    ds = Dataset(inter, dataset.items, dataset.users, source=dataset.source)
    ds.validate()
    return ds


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text_max_tokens", 0),
        ("mlp_hidden_dim", 0),
        ("mlp_layers", 1.5),
        ("batch_size", True),
        ("patience", 0),
        ("text_reg", -1.0),
        ("rating_reg", 0.0),
        ("lr", math.nan),
        ("init_range", 0),
        ("weight_decay", -0.1),
        ("train_lm", "yes"),
        ("text_source", "reviews"),
        ("lm_dtype", "fp16"),
        ("lm_device", "gpu0"),
        ("prompt_version", " "),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"PEPLERConfig\.{field}\b"):
        PEPLERConfig(**{field: value})


def test_review_text_source_needs_reviews(movie_dataset, tiny_lm):
    with pytest.raises(ConfigError, match=r"PEPLERConfig\.text_source"):
        build_text_targets(movie_dataset, tiny_lm.tokenizer, PEPLERConfig(text_source="review"))


# ---------------------------------------------------------------------------------------------- text
def test_text_target_is_the_item_description_without_labels_or_test_rows(movie_dataset, tiny_lm):
    inter = movie_dataset.interactions.copy()
    test_row = np.flatnonzero(inter["split"].to_numpy() == "test")[0]
    inter.loc[inter.index[test_row], "rating"] = 4.37  # a distinctive rating in a test row (label kept)
    dataset = _with_interactions(movie_dataset, inter)
    targets = build_text_targets(dataset, tiny_lm.tokenizer, PEPLERConfig())
    assert targets.source == "item"
    items = dataset.items
    assert targets.texts == [f"{t}: {c[0]}" for t, c in zip(items["title"], items["categories"], strict=True)]
    train = dataset.split("train")
    np.testing.assert_array_equal(targets.row_keys, train["item_id"].to_numpy())  # one text per item
    joined = " ".join(targets.texts).lower()
    for word in ("4.37", "star", "rating", "liked", "label", "click"):
        assert word not in joined
    assert item_description("Toy Story (1995)", np.array(["Animation", "Comedy"])) == (
        "Toy Story (1995): Animation, Comedy"
    )
    assert item_description("Untitled", []) == "Untitled"


def test_review_text_comes_from_train_rows_only(movie_dataset, tiny_lm):
    inter = movie_dataset.interactions.copy()
    split = inter["split"].to_numpy()
    reviews = np.array([f"train note {k}" for k in range(len(inter))], dtype=object)
    reviews[split == "valid"] = "valid zanzibar"
    reviews[split == "test"] = "test zanzibar 4.37 stars"
    train_rows = np.flatnonzero(split == "train")
    reviews[train_rows[0]] = ""  # a train row without a review falls back to its item's description
    inter["review"] = reviews
    dataset = _with_interactions(movie_dataset, inter)
    targets = build_text_targets(dataset, tiny_lm.tokenizer, PEPLERConfig())
    assert targets.source == "review"
    assert not any("zanzibar" in t or "4.37" in t for t in targets.texts)
    texts = [targets.texts[k] for k in targets.row_keys]
    assert texts[0] == targets.texts[int(dataset.split("train")["item_id"].iloc[0])]
    assert texts[1:] == [f"train note {k}" for k in train_rows[1:]]


def test_sampled_negatives_get_no_text(movie_dataset, tiny_lm):
    """Implicit data: a sampled negative records nothing the user did, so its row has no text target (all
    labels -100, zero tokens) and the loss of a batch of such rows is 0, not NaN."""
    inter = movie_dataset.interactions.copy()
    inter["sampled"] = (1 - inter["label"]).astype("int8")
    inter["event"] = np.arange(len(inter), dtype=np.int64)
    dataset = Dataset(inter, movie_dataset.items, movie_dataset.users, source="implicit-like")
    targets = build_text_targets(dataset, tiny_lm.tokenizer, PEPLERConfig())
    sampled = dataset.split("train")["sampled"].to_numpy() == 1
    assert sampled.any() and (~sampled).any()
    assert (targets.row_keys[sampled] == targets.empty_key).all()
    assert (targets.row_keys[~sampled] < targets.empty_key).all()
    text, mask = targets.batch(torch.as_tensor(targets.row_keys[sampled][:4]))
    assert not mask.any() and (PEPLERModel.lm_labels(text, mask) == IGNORE_INDEX).all()
    model = PEPLERModel(tiny_lm.model, dataset.num_users, dataset.num_items)
    loss = model.text_loss(torch.arange(4), torch.arange(4), text, mask)
    assert loss.item() == 0.0


def test_lm_labels_cover_text_tokens_only(movie_dataset, tiny_lm):
    config = PEPLERConfig(text_max_tokens=6)  # shorter than the titles, so truncation is exercised
    targets = build_text_targets(movie_dataset, tiny_lm.tokenizer, config)
    keys = torch.as_tensor(targets.row_keys[:5])
    text, mask = targets.batch(keys)
    labels = PEPLERModel.lm_labels(text, mask)
    # Independent computation: the raw tokens of each row's text, cut, then eos; -100 elsewhere.
    tok = tiny_lm.tokenizer
    rows = []
    for key in keys.tolist():
        tokens = tok(targets.texts[key], add_special_tokens=False).input_ids[:6] + [tok.eos_token_id]
        rows.append(tokens)
    width = max(len(r) for r in rows)
    expected = torch.tensor(
        [[IGNORE_INDEX] * 2 + r + [IGNORE_INDEX] * (width - len(r)) for r in rows], dtype=torch.long
    )
    assert text.shape == (5, width)
    torch.testing.assert_close(labels, expected, rtol=0, atol=0)
    assert not (labels == tok.bos_token_id).any()  # no special token but the closing eos

    # The loss equals the LM's own (shifted, -100-masked) loss on the same input.
    torch.manual_seed(0)
    model = PEPLERModel(tiny_lm.model, movie_dataset.num_users, movie_dataset.num_items)
    users, items = torch.arange(5), torch.tensor(movie_dataset.split("train")["item_id"].to_numpy()[:5])
    ours = model.text_loss(users, items, text, mask)
    words = tiny_lm.model.get_input_embeddings()(text)
    prompt = torch.stack([model.user_embeddings(users), model.item_embeddings(items)], 1)
    attention = torch.cat([torch.ones(5, 2, dtype=torch.long), mask.long()], 1)
    theirs = tiny_lm.model(
        inputs_embeds=torch.cat([prompt, words], 1), attention_mask=attention, labels=expected
    ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_text_loss_trains_the_prompts_through_the_frozen_lm(movie_dataset, tiny_lm):
    targets = build_text_targets(movie_dataset, tiny_lm.tokenizer, PEPLERConfig())
    torch.manual_seed(0)
    model = PEPLERModel(tiny_lm.model, movie_dataset.num_users, movie_dataset.num_items)
    text, mask = targets.batch(torch.as_tensor(targets.row_keys[:4]))
    model.train()
    assert not tiny_lm.model.training  # the frozen LM stays in eval mode
    model.text_loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), text, mask).backward()
    assert model.user_embeddings.weight.grad[:4].abs().sum() > 0
    assert model.item_embeddings.weight.grad[:4].abs().sum() > 0
    assert model.user_embeddings.weight.grad[4:].abs().sum() == 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_lm.model.parameters())


# ---------------------------------------------------------------------------------------------- training
def test_trains_end_to_end_and_writes_outputs(movie_dataset, tiny_lm, single_thread, tmp_path):
    before = _state(tiny_lm.model)
    config = PEPLERConfig(max_epochs=3, patience=3, **FAST)
    result = train_pepler(movie_dataset, tiny_lm, config, seed=0, output_dir=tmp_path)
    assert isinstance(result, PEPLERResult) and isinstance(result, CTRResult)
    assert result.model_name == "pepler" and result.text_source == "item"
    assert math.isfinite(result.valid["auc"]) and math.isfinite(result.test["auc"])
    assert math.isfinite(result.test["logloss"])
    assert [r.epoch for r in result.fit.history] == [1, 2, 3]
    assert all(math.isfinite(r.train_loss) and r.valid_auc is not None for r in result.fit.history)
    assert not result.model.training

    # Test probabilities are aligned with the dataset's test rows, in order.
    test = movie_dataset.split("test")
    np.testing.assert_array_equal(result.test_labels, test["label"].to_numpy(np.float32))
    with torch.no_grad():
        logits = result.model.score(
            torch.tensor(test["user_id"].to_numpy()), torch.tensor(test["item_id"].to_numpy())
        )
    # Calibrated on validation (userip.ctr.calibration) like every CTR row; the raw Logloss is kept.
    calibration = result.fit.calibration
    np.testing.assert_allclose(result.test_probs, calibration.probs(logits.numpy()), rtol=1e-6)
    raw = torch.sigmoid(logits).numpy()
    assert result.test["logloss_raw"] == pytest.approx(logloss(result.test_labels, raw), abs=1e-6)
    assert len(result.data["test"]) == len(test)

    # The frozen LM is bit-identical after training.
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Cost: one LM pass per training row per epoch; tokens = text tokens + eos, no padding.
    tok = tiny_lm.tokenizer
    lengths = {
        i: len(tok(t, add_special_tokens=False).input_ids[:20]) + 1
        for i, t in enumerate(build_text_targets(movie_dataset, tok, config).texts)
    }
    train_items = movie_dataset.split("train")["item_id"].to_numpy()
    cost = result.offline_cost
    assert cost.train_samples == 3 * len(train_items)
    assert cost.train_tokens == 3 * sum(lengths[int(i)] for i in train_items)
    assert cost.train_seconds > 0 and cost.inference_samples == 0 and "tiny" in cost.device

    # Outputs: the trainable parts only, then config, then metrics.
    tensors = load_tensors(tmp_path / "model.safetensors", "PEPLER weights")
    assert set(tensors) == set(result.model.trainable_state_dict())
    assert not any(name.startswith("lm.") for name in tensors)
    assert tensors["user_embeddings.weight"].shape == (movie_dataset.num_users, 16)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(result.test)
    assert metrics["offline_cost"]["train_samples"] == cost.train_samples
    assert metrics["best_epoch"] == result.fit.best_epoch
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pepler"]["lr"] == config.lr and saved["text_source"] == "item"


def test_fine_tuning_changes_a_copy_of_the_lm(movie_dataset, tiny_lm, single_thread):
    before = _state(tiny_lm.model)
    config = PEPLERConfig(max_epochs=1, train_lm=True, **FAST)
    result = train_pepler(movie_dataset, tiny_lm, config, seed=0)
    tuned = result.model.lm.state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in before)
    assert result.model.lm is not tiny_lm.model
    after = tiny_lm.model.state_dict()  # the caller's LM is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_learns_the_label(movie_dataset, tiny_lm, single_thread):
    """Label = comedy (even item), 10% flipped: a model that learned it scores ~0.9 AUC on the 64 test rows.
    The default 3-layer sigmoid head leaves its plateau within 6 epochs at FAST settings for seeds 0-4
    (test AUC measured 0.73-0.91); 0.65 leaves room for that noise while ruling out chance (0.5)."""
    config = PEPLERConfig(max_epochs=6, patience=6, **FAST)
    result = train_pepler(movie_dataset, tiny_lm, config, seed=0)
    assert result.test["auc"] > 0.65
    assert result.valid["auc"] > 0.65


def test_best_epoch_is_chosen_on_validation(movie_dataset, tiny_lm, single_thread):
    """Validation labels are flipped (comedies disliked there) while train and test keep the rule, so every
    epoch that learns the rule lowers validation AUC: the selection must keep the best validation epoch,
    stop after `patience` epochs without a gain, and report that epoch's validation metrics."""
    inter = movie_dataset.interactions.copy()
    valid = inter["split"].to_numpy() == "valid"
    inter.loc[valid, "label"] = (1 - inter.loc[valid, "label"]).astype("int8")
    inter.loc[valid, "rating"] = np.where(inter.loc[valid, "label"] == 1, 5.0, 2.0).astype("float32")
    dataset = _with_interactions(movie_dataset, inter)
    config = PEPLERConfig(max_epochs=8, patience=2, **QUICK)
    result = train_pepler(dataset, tiny_lm, config, seed=0)
    aucs = [r.valid_auc for r in result.fit.history]
    best = int(np.argmax(aucs)) + 1
    assert result.fit.best_epoch == best
    assert result.fit.best_valid_auc == pytest.approx(max(aucs))
    assert result.fit.stopped_early and len(aucs) == best + 2  # two consecutive bad epochs, then stop
    # The model holds the best epoch's weights: its validation AUC is that epoch's.
    assert result.valid["auc"] == pytest.approx(aucs[best - 1], abs=1e-12)
    assert result.valid["auc"] > aucs[-1]
    # The same data with validation labels as they should be trains past that epoch.
    normal = train_pepler(movie_dataset, tiny_lm, config, seed=0)
    assert normal.test["auc"] > 0.8


def test_seed_reproduces_and_rating_only(movie_dataset, tiny_lm, single_thread):
    config = PEPLERConfig(max_epochs=1, **FAST)
    a = train_pepler(movie_dataset, tiny_lm, config, seed=3)
    b = train_pepler(movie_dataset, tiny_lm, config, seed=3)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    no_text = train_pepler(movie_dataset, tiny_lm, dataclasses.replace(config, text_reg=0.0), seed=3)
    assert no_text.offline_cost.train_samples == 0 and no_text.offline_cost.train_tokens == 0
    assert math.isfinite(no_text.test["auc"])
