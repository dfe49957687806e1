"""KAR on a tiny synthetic movie set with a tiny LM built from a config: prompts, cache, encoding, model."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch

from userip.baselines import (
    KARConfig,
    KARModel,
    KnowledgeMode,
    build_kar_data,
    build_knowledge,
    build_prompts,
    train_kar,
)
from userip.baselines.llm_text import GENERATIONS_FILE, encode_texts
from userip.ctr.trainer import CTRTrainerConfig
from userip.utils.config import ConfigError, from_dict

from .conftest import NUM_ITEMS, NUM_USERS, make_movie_dataset

FAST_KAR = dict(
    max_new_tokens=4,
    max_history_items=5,
    generation_batch_size=8,
    encode_max_tokens=256,
    adaptor_output_dim=8,
    adaptor_hidden_dim=16,
    num_shared_experts=1,
    num_specific_experts=2,
)
SMALL_DCN = {"embedding_dim": 4, "num_cross_layers": 1, "hidden_units": (8,), "dropout": 0.0}
FAST_TRAINER = CTRTrainerConfig(lr=0.02, batch_size=64, max_epochs=8, patience=3)


def fast_config(**overrides) -> KARConfig:
    return KARConfig(**{**FAST_KAR, **overrides})


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_new_tokens", 0),
        ("max_history_items", -1),
        ("repetition_penalty", 0.0),
        ("adaptor_dropout", 1.0),
        ("backbone", "deepfm"),
        ("mode", "sometimes"),
        ("factors", ()),
        ("prompt_version", " "),
        ("lm_dtype", "fp16"),
        ("num_specific_experts", -1),
    ],
)
def test_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        KARConfig(**{key: value})


def test_config_from_dict_and_unknown_key():
    config = from_dict(KARConfig, {"mode": "no_generation", "factors": ["genre", "plot"]})
    assert config.mode is KnowledgeMode.NO_GENERATION and config.factors == ("genre", "plot")
    with pytest.raises(ConfigError, match="unknown key.*'max_tokens'"):
        from_dict(KARConfig, {"max_tokens": 3})


# ------------------------------------------------------------------------------------------ prompts
def test_user_prompt_holds_recent_train_history_in_time_order(movie_dataset):
    prompts = build_prompts(movie_dataset, fast_config())
    inter = movie_dataset.interactions
    rows = inter[(inter["user_id"] == 3) & (inter["split"] == "train")].sort_values("timestamp")
    titles = movie_dataset.items["title"].to_numpy()[rows["item_id"].to_numpy()]
    prompt = prompts.user_prompts[3]
    assert prompt.startswith("Given a male user who is aged 23 and a writer,")
    positions = [prompt.find(f'"{t}"') for t in titles[-5:]]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)  # the 5 most recent, in order
    assert f'"{titles[0]}"' not in prompt  # older than the 5 most recent
    assert "stars;" in prompt and "00000" not in prompt  # ratings shown, zip code not
    assert prompts.item_prompts[1].startswith("Introduce movie Film B (1991) and describe its attributes")


def test_no_valid_or_test_label_reaches_any_prompt_or_cache(tmp_path, tiny_lm):
    """Plant a unique title and a distinctive rating in valid/test rows only: neither may appear in any user
    prompt, encoded text or cached record. The same marks in a train row do appear (the check can fail)."""
    ds = make_movie_dataset()
    inter = ds.interactions.copy()
    items = ds.items.copy()
    items.loc[NUM_ITEMS - 1, "title"] = "Zanzibar Leak"
    inter = inter[inter["item_id"] != NUM_ITEMS - 1].copy()  # the planted item: only in the rows below
    for split in ("valid", "test"):
        first = inter.index[inter["split"] == split][0]
        inter.loc[first, ["item_id", "rating"]] = [NUM_ITEMS - 1, 3.7]
    planted = type(ds)(inter.reset_index(drop=True), items, ds.users, source="planted")
    planted.validate()
    knowledge = build_knowledge(planted, tiny_lm, fast_config(max_history_items=30), tmp_path)
    cached = (knowledge.cache_folder / GENERATIONS_FILE).read_text()
    for text in [*knowledge.prompts.user_prompts, *knowledge.user_texts, cached]:
        assert "3.7 star" not in text
    for text in [*knowledge.prompts.user_prompts, *knowledge.user_texts]:
        assert "Zanzibar" not in text
    # Positive control: the same marks on a train row reach that user's prompt.
    train_row = inter.index[inter["split"] == "train"][0]
    inter.loc[train_row, ["item_id", "rating"]] = [NUM_ITEMS - 1, 3.7]
    control = type(ds)(inter.reset_index(drop=True), items, ds.users, source="planted")
    user = int(inter.loc[train_row, "user_id"])
    assert (
        '"Zanzibar Leak", 3.7 stars;'
        in build_prompts(control, fast_config(max_history_items=30)).user_prompts[user]
    )


# ------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_and_invalidated_by_prompt_version_decoding_and_split(
    tmp_path, movie_dataset, tiny_lm
):
    first = build_knowledge(movie_dataset, tiny_lm, fast_config(), tmp_path)
    assert first.cost.llm_calls == NUM_USERS + NUM_ITEMS and first.cost.cached_generations == 0
    assert first.cost.prompt_tokens > 0 and 0 < first.cost.new_tokens <= 4 * (NUM_USERS + NUM_ITEMS)

    again = build_knowledge(movie_dataset, tiny_lm, fast_config(), tmp_path)
    assert again.cost.llm_calls == 0 and again.cost.cached_generations == NUM_USERS + NUM_ITEMS
    assert again.cost.cached_encodings == NUM_USERS + NUM_ITEMS
    assert again.user_texts == first.user_texts
    np.testing.assert_array_equal(again.user, first.user)

    for changed in (fast_config(prompt_version="kar-test-v2"), fast_config(max_new_tokens=3)):
        other = build_knowledge(movie_dataset, tiny_lm, changed, tmp_path)
        assert other.cost.llm_calls == NUM_USERS + NUM_ITEMS
        assert other.cache_folder != first.cache_folder

    # Another split of the same interactions (swap valid and test): a new key, so nothing is reused.
    inter = movie_dataset.interactions.copy()
    inter["split"] = inter["split"].replace({"valid": "test", "test": "valid"})
    resplit = type(movie_dataset)(inter, movie_dataset.items, movie_dataset.users, source="resplit")
    other = build_knowledge(resplit, tiny_lm, fast_config(), tmp_path)
    assert other.cost.llm_calls == NUM_USERS + NUM_ITEMS and other.cache_folder != first.cache_folder


def test_interrupted_generation_resumes_with_only_the_missing_prompts(tmp_path, movie_dataset, tiny_lm):
    full = build_knowledge(movie_dataset, tiny_lm, fast_config(), tmp_path)
    path = full.cache_folder / GENERATIONS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])  # a crash mid-write
    resumed = build_knowledge(movie_dataset, tiny_lm, fast_config(), tmp_path)
    assert resumed.cost.cached_generations == 10
    assert resumed.cost.llm_calls == NUM_USERS + NUM_ITEMS - 10
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == NUM_USERS + NUM_ITEMS  # the cut line was dropped, not kept as garbage
    # Greedy decoding in other batches gives the same texts here (no ties in this tiny model).
    assert resumed.item_texts == full.item_texts


# ------------------------------------------------------------------------------------------ encoding
def test_encoding_is_the_masked_mean_of_final_states_independent_of_padding(tiny_lm):
    texts = ["Film A (1990)", "a much longer text about Film B (1991) and its plot and tone"]
    pooled = encode_texts(tiny_lm, texts, max_tokens=64, batch_size=2)  # one padded batch
    for text, row in zip(texts, pooled):
        ids = tiny_lm.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            states = tiny_lm.model(ids, output_hidden_states=True).hidden_states[-1][0]  # (L, H), post-norm
        np.testing.assert_allclose(row, states.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_standardisation_uses_train_users_and_items_only(tmp_path, movie_dataset, tiny_lm):
    # Two users never in train: their vectors must not shape the statistics.
    inter = movie_dataset.interactions.copy()
    inter.loc[inter["user_id"].isin([0, 1]), "split"] = "test"
    ds = type(movie_dataset)(inter, movie_dataset.items, movie_dataset.users, source="cold")
    knowledge = build_knowledge(ds, tiny_lm, fast_config(), tmp_path)
    raw = torch.from_numpy(encode_texts(tiny_lm, knowledge.user_texts, max_tokens=256)).double()
    train_users = torch.tensor(sorted(set(inter.loc[inter["split"] == "train", "user_id"])))
    assert 0 not in train_users and 1 not in train_users
    mean = raw[train_users].mean(0)
    std = raw[train_users].std(0, unbiased=False)
    expected = ((raw - mean) / std).float().numpy()
    np.testing.assert_allclose(knowledge.user, expected, rtol=1e-3, atol=1e-3)
    assert not np.allclose(knowledge.user[0], 0.0)  # a cold user is standardised, not zeroed


# ------------------------------------------------------------------------------------------ model
def test_kar_model_reads_the_adaptor_vectors_as_extra_dense_inputs(movie_dataset, tiny_lm):
    data = build_kar_data(movie_dataset)
    assert data.feature_map.names == ["user_id", "item_id", "kar_user", "kar_item"]
    x = data["train"].x_ids
    inter = movie_dataset.split("train")
    np.testing.assert_array_equal(x[:, 2].numpy(), inter["user_id"].to_numpy() + 1)
    np.testing.assert_array_equal(x[:, 3].numpy(), inter["item_id"].to_numpy() + 1)

    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(NUM_USERS, 6)), rng.normal(size=(NUM_ITEMS, 6))
    model = KARModel(data.feature_map, users, items, fast_config(), SMALL_DCN)
    # DCN's cross net reads F * D + 2 * d = 2 * 4 + 2 * 8 values.
    assert model.backbone.combination.in_features == 2 * 4 + 2 * 8 + 8
    model.eval()
    batch = x[:16]
    before = model(batch)
    assert before.shape == (16,)
    with torch.no_grad():  # another knowledge vector for the first row's user changes only that user's logits
        model.backbone.embedding.user_knowledge[batch[0, 2]] += 1.0
    changed = (model(batch) - before).abs() > 1e-6
    assert changed[0] and torch.equal(changed, batch[:, 2] == batch[0, 2])
    with pytest.raises(ConfigError, match="adaptor_output_dim"):
        KARModel(data.feature_map, users, items, fast_config(adaptor_output_dim=6), SMALL_DCN)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("mode", ["generation", "no_generation"])
def test_train_kar_end_to_end(tmp_path, movie_dataset, tiny_lm, single_thread, mode):
    start = time.perf_counter()
    result = train_kar(
        movie_dataset,
        tiny_lm,
        fast_config(mode=mode),
        seed=1,
        trainer_config=FAST_TRAINER,
        model_config=SMALL_DCN,
        cache_dir=tmp_path / "cache",
        output_dir=tmp_path / "out",
    )
    seconds = time.perf_counter() - start
    assert seconds < 30
    assert result.model_name == ("kar" if mode == "generation" else "kar-nogen")
    assert isinstance(result.model, KARModel) and not result.model.training
    n_test = int((movie_dataset.interactions["split"] == "test").sum())
    assert result.test_probs.shape == (n_test,) and np.isfinite(result.test_probs).all()
    assert math.isfinite(result.test["logloss"]) and result.valid is not None
    # The planted genre rule is learnable from the item field: better than chance.
    assert result.valid["auc"] > 0.6
    cost = result.offline_cost
    expected_calls = NUM_USERS + NUM_ITEMS if mode == "generation" else 0
    assert cost.llm_calls == expected_calls and cost.encoded_texts == NUM_USERS + NUM_ITEMS
    assert cost.wall_seconds > 0 and "tiny" in cost.device
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["offline_cost"]["llm_calls"] == expected_calls
    assert (tmp_path / "out" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["kar"]["mode"] == mode and saved["dataset_hash"] == movie_dataset.content_hash


def test_adaptor_is_trained_jointly(tmp_path, movie_dataset, tiny_lm, single_thread):
    config = fast_config(mode="no_generation")
    result = train_kar(
        movie_dataset,
        tiny_lm,
        config,
        seed=0,
        trainer_config=dataclasses.replace(FAST_TRAINER, max_epochs=2),
        model_config=SMALL_DCN,
        cache_dir=tmp_path,
    )
    torch.manual_seed(0)
    data = build_kar_data(movie_dataset)
    from userip.utils.seed import seed_everything

    seed_everything(0)
    fresh = KARModel(data.feature_map, result.knowledge.user, result.knowledge.item, config, SMALL_DCN)
    trained, initial = result.model.adaptor.gates[0].weight, fresh.adaptor.gates[0].weight
    assert trained.shape == initial.shape and not torch.allclose(trained, initial)
