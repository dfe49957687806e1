"""Soft-token initialisation: value words from the dataset's hints, explicit words, phrase fallback."""

import pandas as pd
import pytest
import torch

from userip.profile.model import (
    SoftTokenConfig,
    SoftTokenTable,
    init_token_ids,
    resolve_value_words,
)
from userip.prompts import PromptBuilder, PromptConfig
from userip.utils.config import ConfigError, from_dict

HINTS = pd.DataFrame(
    {
        "user_id": [0, 1, 2, 3],
        "favourite_category": ["toy", "heat", "toy", ""],
        "price_level": ["unknown", "unknown", "unknown", "unknown"],
    }
)


def test_value_words_come_from_hints_skipping_empty_and_unknown():
    words = resolve_value_words(SoftTokenConfig(), PromptConfig(), HINTS)
    assert words == {"hobby": ["heat", "toy"], "background": []}
    explicit = SoftTokenConfig(value_words={"background": ["great", "sad"]})
    assert resolve_value_words(explicit, PromptConfig(), HINTS)["background"] == ["great", "sad"]
    assert resolve_value_words(SoftTokenConfig(), PromptConfig(), None) == {"hobby": [], "background": []}


def test_rows_start_at_the_mean_embedding_of_the_value_words(word_tokenizer):
    builder = PromptBuilder(word_tokenizer, PromptConfig())
    embeds = torch.randn(len(word_tokenizer), 8, generator=torch.Generator().manual_seed(0))
    config = SoftTokenConfig(init_noise=0.0)
    ids = init_token_ids(builder, config, resolve_value_words(config, builder.config, HINTS))
    table = SoftTokenTable(3, builder.config.num_slots, 8)
    table.initialise(embeds, ids, [1, 1], config, seed=0)
    vocab = word_tokenizer.get_vocab()
    hobby = (embeds[vocab["heat"]] + embeds[vocab["toy"]]) / 2
    background = embeds[builder.phrase_ids[1]].mean(0)  # no value words: the phrase
    torch.testing.assert_close(table.weight[:, 0], hobby.expand(3, 8))
    torch.testing.assert_close(table.weight[:, 1], background.expand(3, 8))
    # The paper's phrase init ignores the value words.
    phrase = init_token_ids(builder, SoftTokenConfig(init="phrase"), {"hobby": ["toy"]})
    assert phrase == [list(i) for i in builder.phrase_ids]


def test_bad_value_words_fail_naming_the_key():
    with pytest.raises(ConfigError, match="soft_tokens.value_words.hobby"):
        SoftTokenConfig(value_words={"hobby": ["toy", ""]})
    with pytest.raises(ConfigError, match="hobbies"):
        resolve_value_words(SoftTokenConfig(value_words={"hobbies": ["toy"]}), PromptConfig(), HINTS)
    config = from_dict(SoftTokenConfig, {"value_words": {"hobby": ["toy"]}}, "soft_tokens")
    assert config.value_words == {"hobby": ["toy"]}
