"""Tiny tokenizers, models and datasets for the prompt tests (no network, built in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from userip.data.schema import Dataset

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
STORIES = SHARED / "models" / "stories260K"

WORDS = [
    "this",
    "user's",
    "hobby",
    "is",
    ",",
    "his",
    "background",
    "is",
    ".",
    "the",
    "recent",
    "items",
    "are",
    ":",
    "toy",
    "story",
    "heat",
    "jumanji",
    "casino",
    "sabrina",
    "balto",
    "nixon",
    "tom",
    "and",
    "huck",
    "sudden",
    "death",
    "goldeneye",
    "great",
    "movie",
    "funny",
    "sad",
    "(",
    ")",
    "/",
    "liked",
    "disliked",
    "loved",
    "meh",
    "1",
    "2",
    "3",
    "4",
    "5",
    "10",
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP oversubscription (15 s -> 0.4 s)."""

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_word_tokenizer(with_bos: bool) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over a fixed word list; [BOS] prepended by the post-processor when asked."""
    specials = ["[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    # No pad token on purpose: the builder must cope.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    return make_word_tokenizer(with_bos=True)


@pytest.fixture
def word_tokenizer_no_bos() -> PreTrainedTokenizerFast:
    return make_word_tokenizer(with_bos=False)


def dataset_from_rows(rows, num_users: int, reviews: list[str] | None = None) -> Dataset:
    """Dataset over 5 titled items from (user, item, timestamp, split) rows."""
    items = pd.DataFrame(
        {
            "item_id": np.arange(5, dtype=np.int64),
            "raw_item_id": [str(i) for i in range(5)],
            "title": ["toy story", "heat", "jumanji", "casino", "sabrina"],
            "categories": [["a"]] * 5,
            "brand": [""] * 5,
            "price": [np.nan] * 5,
        }
    )
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "split"])
    inter["rating"] = np.float32(4.0)
    inter["label"] = np.int8(1)
    if reviews is not None:
        inter["review"] = reviews
    users = pd.DataFrame(
        {"user_id": np.arange(num_users, dtype=np.int64), "raw_user_id": [str(u) for u in range(num_users)]}
    )
    return Dataset(interactions=inter, items=items, users=users, source="test")


def tiny_dataset(with_reviews: bool = False) -> Dataset:
    """4 users, 5 items; user 3 has only valid/test interactions (empty training history)."""
    rows = [  # user, item, timestamp, split
        (0, 0, 30, "train"), (0, 1, 10, "train"), (0, 2, 20, "train"), (0, 3, 40, "test"),
        (1, 4, 5, "train"), (1, 0, 6, "train"),
        (2, 1, 1, "train"), (2, 3, 2, "valid"),
        (3, 2, 1, "valid"), (3, 4, 2, "test"),
    ]  # fmt: skip
    reviews = ["great movie", "", "funny", "sad", "funny sad", "", "great", "", "", ""]
    return dataset_from_rows(rows, 4, reviews if with_reviews else None)
