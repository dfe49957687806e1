"""Fixtures for the profile tests: tiny config-built LMs, a word tokenizer and a small Dataset."""

from __future__ import annotations

import numpy as np
import pytest
from tests.prompts.conftest import (  # noqa: F401
    STORIES,
    _one_torch_thread,
    dataset_from_rows,
    make_word_tokenizer,
)
from transformers import GPT2Config, LlamaConfig

from userip.data.schema import Dataset
from userip.profile.lm import load_causal_lm


def gpt2_config(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128)


def llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


@pytest.fixture
def word_tokenizer():
    return make_word_tokenizer(with_bos=True)


@pytest.fixture
def tiny_llama(word_tokenizer):
    import torch

    torch.manual_seed(0)
    return load_causal_lm(llama_config(len(word_tokenizer)), dtype="fp32", device="cpu")


def history_dataset(num_users: int = 12, seed: int = 0) -> Dataset:
    """Users with 2-5 training interactions over 5 titled items (enough for a few batches)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = int(rng.integers(2, 6))
        for t, item in enumerate(rng.integers(0, 5, size=n)):
            rows.append((u, int(item), t, "train"))
        rows.append((u, int(rng.integers(0, 5)), n, "test"))
    return dataset_from_rows(rows, num_users)


def make_setup(lm, tokenizer, dataset, prompt_config=None, seed: int = 0):
    """(ProfileModel, ExampleSet) with a phrase-initialised table."""
    from userip.profile.model import ProfileModel, SoftTokenConfig, SoftTokenTable
    from userip.prompts import PromptBuilder, PromptConfig, build_examples

    builder = PromptBuilder(tokenizer, prompt_config or PromptConfig())
    cfg = builder.config
    table = SoftTokenTable(dataset.num_users, cfg.num_slots, lm.get_input_embeddings().weight.shape[1])
    table.initialise(
        lm.get_input_embeddings().weight,
        builder.phrase_ids,
        [p.num_soft_tokens for p in cfg.profiles],
        SoftTokenConfig(),
        seed,
    )
    return ProfileModel(lm, table, cfg), build_examples(dataset, builder)
