from __future__ import annotations

import numpy as np
import pytest

from userip.prompts import (
    IGNORE_INDEX,
    ProfileSpec,
    PromptBuilder,
    PromptConfig,
    TargetMode,
    TokenKind,
    build_examples,
)
from userip.utils.config import ConfigError, from_dict

from .conftest import tiny_dataset


def test_layout_with_bos(word_tokenizer):
    cfg = PromptConfig(
        profiles=(
            ProfileSpec("hobby", "this user's hobby is", 2),
            ProfileSpec("bg", ", his background is", 1),
        )
    )
    b = PromptBuilder(word_tokenizer, cfg)
    ex = b.build("toy story , heat", user_id=7)
    kinds = ex.token_kinds.tolist()
    assert kinds[0] == TokenKind.BOS and ex.input_ids[0] == word_tokenizer.bos_token_id
    hobby = b.encode("this user's hobby is")
    n_h = len(hobby)
    assert ex.input_ids[1 : 1 + n_h].tolist() == hobby
    assert kinds[1 + n_h : 3 + n_h] == [TokenKind.SOFT] * 2
    assert ex.soft_slot_ids[1 + n_h : 3 + n_h].tolist() == [0, 1]
    bg_soft = np.flatnonzero((ex.token_kinds == TokenKind.SOFT) & (ex.profile_index == 1))
    assert ex.soft_slot_ids[bg_soft].tolist() == [2]
    target = b.encode(" toy story , heat")
    assert ex.labels[-len(target) :].tolist() == target
    assert (ex.labels[: -len(target)] == IGNORE_INDEX).all()
    assert ex.user_id == 7
    assert (ex.token_kinds[-len(target) :] == TokenKind.TARGET).all()
    assert b.prefix_length == len(ex) - len(target)


def test_no_bos_and_pad_fallback(word_tokenizer_no_bos):
    b = PromptBuilder(word_tokenizer_no_bos)
    assert b.bos_token_id is None
    assert word_tokenizer_no_bos.pad_token_id is None
    assert b.pad_token_id == word_tokenizer_no_bos.eos_token_id  # tokenizer without pad token is handled
    ex = b.build("heat")
    assert ex.token_kinds[0] == TokenKind.PHRASE


def test_slot_words_replace_soft_slots(word_tokenizer):
    b = PromptBuilder(
        word_tokenizer, PromptConfig(profiles=(ProfileSpec("hobby", "this user's hobby is", 3),))
    )
    ex = b.build("heat", slot_texts={"hobby": "funny sad"}, label_slot_words=True)
    soft = ex.token_kinds == TokenKind.SOFT
    assert ex.input_ids[soft].tolist() == b.encode(" funny sad")  # 2 words replace the 3 slots
    assert (ex.soft_slot_ids == -1).all()  # nothing spliced from the table
    assert ex.labels[soft].tolist() == b.encode(" funny sad")
    with pytest.raises(ConfigError, match="unknown profile"):
        b.build("heat", slot_texts={"job": "x"})


def test_target_truncated_to_budget(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(max_target_tokens=2))
    ex = b.build("toy story heat casino")
    assert (ex.token_kinds == TokenKind.TARGET).sum() == 2


def test_bad_config_messages():
    with pytest.raises(ConfigError, match="profile phrase is empty"):
        ProfileSpec("hobby", "  ")
    with pytest.raises(ConfigError, match="at least one profile"):
        PromptConfig(profiles=())
    with pytest.raises(ConfigError, match="target_mode"):
        PromptConfig(target_mode="titles")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PromptConfig, {"profile": []})
    cfg = from_dict(PromptConfig, {"profiles": [{"name": "job", "phrase": "works as", "num_soft_tokens": 2}]})
    assert cfg.num_slots == 2 and cfg.profiles[0].name == "job"


def test_history_targets_time_order_and_skip(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(separator=","))
    ex_set = build_examples(tiny_dataset(), b)
    assert ex_set.user_ids.tolist() == [0, 1, 2]
    assert ex_set.skipped_user_ids.tolist() == [3]  # only valid/test interactions: skipped, not a crash
    ex0 = ex_set[0]
    target = ex0.input_ids[ex0.token_kinds == TokenKind.TARGET].tolist()
    # user 0 train items by time: heat (10), jumanji (20), toy story (30); test item casino excluded
    assert target == b.encode(" heat , jumanji , toy story")
    assert ex_set.lengths.tolist() == [len(ex_set[i]) for i in range(3)]


def test_history_budget_keeps_most_recent(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(max_target_tokens=4))
    ex0 = build_examples(tiny_dataset(), b)[0]
    target = ex0.input_ids[ex0.token_kinds == TokenKind.TARGET].tolist()
    assert target == b.encode(" jumanji , toy story")


def test_review_targets(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(target_mode=TargetMode.REVIEW))
    ex_set = build_examples(tiny_dataset(with_reviews=True), b)
    # train reviews: u0 "funny"(t20) "great movie"(t30) ; u1 "funny sad"; u2 "great"
    assert ex_set.user_ids.tolist() == [0, 0, 1, 2]
    t = ex_set[1].input_ids[ex_set[1].token_kinds == TokenKind.TARGET].tolist()
    assert t == b.encode(" great movie")
    assert ex_set.subset([0]).user_ids.tolist() == [0, 0]
    with pytest.raises(ValueError, match="review column"):
        build_examples(tiny_dataset(), b)
