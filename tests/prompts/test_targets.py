"""build_examples block by block (bounded transient memory) gives the examples of the whole table at once."""

from __future__ import annotations

import numpy as np
import pytest

from userip.prompts import PromptBuilder, PromptConfig, TargetMode, build_examples

from .conftest import dataset_from_rows

WORDS = ["great", "funny", "sad", "long", "slow", ""]


def _dataset(num_users: int, history_users: int, seed: int = 0):
    """Users with 1-6 rows in user order, random items, times and reviews; the first ``history_users`` users
    also have history rows (so the profile split is the history split of the whole table)."""
    rng = np.random.default_rng(seed)
    rows, reviews = [], []
    for u in range(num_users):
        for _ in range(int(rng.integers(1, 7))):
            split = (
                "history" if u < history_users and rng.random() < 0.5 else str(rng.choice(["train", "test"]))
            )
            rows.append((u, int(rng.integers(0, 5)), int(rng.integers(0, 1000)), split))
            reviews.append(" ".join(rng.choice(WORDS, size=int(rng.integers(0, 4)))).strip())
    return dataset_from_rows(rows, num_users, reviews)


def _arrays(examples) -> tuple[list, list, list, list]:
    return [
        examples.user_ids.tolist(),
        examples.offsets.tolist(),
        examples.target_ids.tolist(),
        examples.skipped_user_ids.tolist(),
    ]


@pytest.mark.parametrize("mode", [TargetMode.HISTORY, TargetMode.REVIEW])
@pytest.mark.parametrize("history_users", [0, 9])
def test_blocks_give_the_examples_of_the_whole_table(word_tokenizer, mode, history_users):
    dataset = _dataset(40, history_users)
    builder = PromptBuilder(word_tokenizer, PromptConfig(target_mode=mode, max_target_tokens=12))
    whole = build_examples(dataset, builder, block_users=10**6)
    assert len(whole) >= 5 and whole.target_ids.dtype == np.int32
    if history_users:  # the table's profile split is history: the users without history rows are skipped
        assert set(whole.user_ids.tolist()) <= set(range(history_users)) and whole.num_skipped_users > 20
    for block in (1, 3, 7, 16):
        assert _arrays(build_examples(dataset, builder, block_users=block)) == _arrays(whole)
    # rows not in user order: one block, the same examples
    shuffled = _dataset(40, history_users)
    shuffled.interactions = shuffled.interactions.iloc[::-1].reset_index(drop=True)
    assert _arrays(build_examples(shuffled, builder, block_users=3)) == _arrays(whole)
