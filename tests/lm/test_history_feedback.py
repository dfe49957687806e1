"""The offline LM follows PromptConfig.history_feedback: its cache key, tokenizer and pre-training targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from userip.lm import build_dataset_tokenizer, cache_key, unknown_words
from userip.lm.offline import _prompt_key_fields, pretraining_examples, short_target_example, tokenizer_texts
from userip.prompts import PromptBuilder, PromptConfig, TokenKind

from .conftest import make_toy_dataset

FEEDBACK_KEYS = {"history_feedback", "liked_word", "disliked_word", "max_rating"}


@pytest.fixture(scope="module")
def rated_dataset():
    """The toy dataset with varied ratings 1..5 (label = rating > 3) and one rating missing."""
    ds = make_toy_dataset()
    rng = np.random.default_rng(3)
    rating = rng.integers(1, 6, len(ds.interactions)).astype(np.float32)
    ds.interactions["label"] = (rating > 3).astype(np.int8)
    rating[0] = np.nan
    ds.interactions["rating"] = rating
    return ds


def test_cache_key_follows_history_feedback(toy_dataset, tiny_lm_config):
    def key(**prompt):
        return cache_key(toy_dataset, PromptConfig(max_target_tokens=32, **prompt), tiny_lm_config, "offline")

    keys = {mode: key(history_feedback=mode) for mode in ("none", "label", "rating")}
    assert len(set(keys.values())) == 3
    assert key(history_feedback="label", liked_word="loved") != keys["label"]
    assert key(history_feedback="rating", max_rating=10) != keys["rating"]
    # Without feedback its settings change nothing: the key ignores them and stays that of older configs.
    assert key(liked_word="loved", max_rating=10) == keys["none"] == key()
    fields = {f.name for f in dataclasses.fields(PromptConfig)}
    assert set(_prompt_key_fields(PromptConfig())) == fields - FEEDBACK_KEYS
    assert set(_prompt_key_fields(PromptConfig(history_feedback="label"))) == fields


@pytest.mark.parametrize("mode", ["label", "rating"])
def test_pretraining_targets_carry_the_feedback(rated_dataset, tiny_lm_config, mode):
    prompt_config = PromptConfig(max_target_tokens=32, history_feedback=mode)
    tokenizer = build_dataset_tokenizer(rated_dataset, prompt_config, tiny_lm_config)
    _, required = tokenizer_texts(rated_dataset, prompt_config)
    if mode == "label":
        assert " (liked)" in required and " (disliked)" in required
    else:  # the ratings, and the label word of the one NaN rating
        assert {f" ({r}/5)" for r in range(1, 6)} < set(required)
        assert (" (liked)" in required) != (" (disliked)" in required)
    assert unknown_words(tokenizer, required) == []
    builder = PromptBuilder(tokenizer, prompt_config)
    prompts, _ = pretraining_examples(rated_dataset, builder, tiny_lm_config)
    example = next(e for e in prompts if e.user_id == 0)
    target = example.labels[example.labels >= 0]
    assert tokenizer.unk_token_id not in target.tolist()

    inter = rated_dataset.interactions
    train = inter[(inter.user_id == 0) & (inter.split == "train")].sort_values("timestamp")
    units = [
        f"{title} {prompt_config.feedback_text(label, rating).strip()}"
        for title, label, rating in zip(rated_dataset.items.title[train.item_id], train.label, train.rating)
    ]
    spaced = [tokenizer.decode(tokenizer(u, add_special_tokens=False)["input_ids"]) for u in units]
    decoded = tokenizer.decode(target)
    assert decoded.endswith(spaced[-1]) and " , ".join(spaced).endswith(decoded)
    # Short pre-training windows cut between units, never inside one: every window ends with its feedback.
    rng = np.random.default_rng(0)
    for _ in range(20):
        window = short_target_example(example, builder.separator_ids, 2, rng)
        assert window.input_ids[window.token_kinds == TokenKind.TARGET][-1] == target[-1]
        assert tokenizer.decode(window.labels[window.labels >= 0]) in " , ".join(spaced)
