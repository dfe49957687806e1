"""Fixtures for the LLM baselines: a tiny MovieLens-like dataset and a tiny chat LM built from a config."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig

from userip.baselines.llm_text import TextLM
from userip.data.schema import Dataset
from userip.lm import build_tokenizer
from userip.profile.lm import load_causal_lm

NUM_USERS, NUM_ITEMS, ROWS_PER_USER = 32, 14, 12
# A minimal chat template in the tokenizer's own special tokens (the real SmolLM2 ships its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
GENRES = ("comedy", "drama")


def make_movie_dataset(seed: int = 0, num_users: int = NUM_USERS) -> Dataset:
    """Users with MovieLens' demographics; label = 1 (rating 5) for comedies (even items) and 0 (rating 2) for
    dramas, flipped for 10% of rows; per user, the last 4 rows (by time) are 2 valid then 2 test rows."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": np.arange(NUM_ITEMS, dtype=np.int64),
            "raw_item_id": [f"i{i}" for i in range(NUM_ITEMS)],
            "title": [f"Film {chr(65 + i)} ({1990 + i})" for i in range(NUM_ITEMS)],
            "categories": [[GENRES[i % 2]] for i in range(NUM_ITEMS)],
            "brand": "",
            "price": np.nan,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(num_users, dtype=np.int64),
            "raw_user_id": [f"u{u}" for u in range(num_users)],
            "age": [str(20 + u) for u in range(num_users)],
            "gender": ["M" if u % 2 else "F" for u in range(num_users)],
            "occupation": ["engineer" if u % 3 else "writer" for u in range(num_users)],
            "zip_code": "00000",
        }
    )
    rows = []
    for u in range(num_users):
        for t, item in enumerate(rng.choice(NUM_ITEMS, ROWS_PER_USER, replace=False)):
            liked = (item % 2 == 0) != (rng.random() < 0.1)
            split = "train" if t < ROWS_PER_USER - 4 else ("valid" if t < ROWS_PER_USER - 2 else "test")
            rows.append((u, int(item), 5.0 if liked else 2.0, int(liked), 1000 + t, split))
    inter = pd.DataFrame(
        rows, columns=["user_id", "item_id", "rating", "label", "timestamp", "split"]
    ).astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float32", "label": "int8", "timestamp": "int64"}
    )
    ds = Dataset(inter, items, users, source="tiny-movies")
    ds.validate()
    return ds


def make_tiny_lm(
    dataset: Dataset,
    seed: int = 0,
    extra_texts: Sequence[str] = (),
    vocab_size: int = 400,
    dtype: str = "fp32",
    name: str = "tiny",
) -> TextLM:
    """A random Llama (hidden 16, 1 layer) over a byte-level BPE tokenizer trained on the dataset's titles
    (and ``extra_texts``: words a baseline's prompts should keep short), with a chat template: generation,
    encoding and scoring run for real, in milliseconds."""
    texts = [
        *dataset.items["title"],
        "Given a user who is aged and a this rating history over time is listed",
        *extra_texts,
    ]
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, model="bpe")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return TextLM(load_causal_lm(config, dtype=dtype), tokenizer, name=name)


@pytest.fixture(scope="session")
def movie_dataset() -> Dataset:
    return make_movie_dataset()


@pytest.fixture(scope="session")
def tiny_lm(movie_dataset) -> TextLM:
    return make_tiny_lm(movie_dataset)
