"""History targets with the user's feedback after each title (history_feedback: none / label / rating)."""

from __future__ import annotations

import numpy as np
import pytest

from userip.prompts import PromptBuilder, PromptConfig, TargetMode, TokenKind, build_examples
from userip.prompts.targets import _history_targets, history_feedback_texts
from userip.prompts.template import HistoryFeedback
from userip.utils.config import ConfigError, from_dict

from .conftest import dataset_from_rows, tiny_dataset


def _old_history_targets(dataset, train, builder):
    """The history target code before history_feedback existed (verbatim), the reference for mode none."""
    budget = builder.config.max_target_tokens
    sep = builder.separator_ids
    titles = dataset.items["title"].fillna("").astype(str).str.strip().to_numpy()
    title_ids = [np.asarray(ids, dtype=np.int32) for ids in builder.encode_many([" " + t for t in titles])]
    has_title = np.array([len(t) > 0 and len(ids) > 0 for t, ids in zip(titles, title_ids)], dtype=bool)
    order = np.lexsort((train["timestamp"].to_numpy(), train["user_id"].to_numpy()))
    users = train["user_id"].to_numpy()[order]
    items = train["item_id"].to_numpy()[order]
    keep = has_title[items]
    users, items = users[keep], items[keep]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=int)
    ends = np.r_[starts[1:], len(users)]
    out_users, pieces = [], []
    for s, e in zip(starts, ends):
        kept: list[np.ndarray] = []
        used = 0
        for item in items[s:e][::-1]:
            t = title_ids[item]
            cost = len(t) + (len(sep) if kept else 0)
            if used + cost > budget:
                if not kept:
                    kept.append(t[-budget:])
                break
            if kept:
                kept.append(np.asarray(sep, dtype=np.int32))
            kept.append(t)
            used += cost
        out_users.append(users[s])
        pieces.append(np.concatenate(kept[::-1]))
    return np.asarray(out_users, dtype=np.int64), pieces


def feedback_dataset():
    """User 0 by time: heat (liked, 4), jumanji (disliked, 2), toy story (liked, 3.5); casino is test data.
    User 1: sabrina (disliked, rating NaN), heat (liked, 5)."""
    rows = [
        (0, 0, 30, "train"), (0, 1, 10, "train"), (0, 2, 20, "train"), (0, 3, 40, "test"),
        (1, 4, 5, "train"), (1, 1, 6, "train"),
    ]  # fmt: skip
    ds = dataset_from_rows(rows, 2)
    ds.interactions["label"] = np.array([1, 1, 0, 1, 0, 1], dtype=np.int8)
    ds.interactions["rating"] = np.array([3.5, 4, 2, 5, np.nan, 5], dtype=np.float32)
    return ds


def targets(builder, dataset):
    ex_set = build_examples(dataset, builder)
    return {
        int(u): ex_set[i].input_ids[ex_set[i].token_kinds == TokenKind.TARGET].tolist()
        for i, u in enumerate(ex_set.user_ids)
    }


def test_label_feedback_words_in_time_order(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(history_feedback="label"))
    t = targets(b, feedback_dataset())
    assert t[0] == b.encode(" heat (liked) , jumanji (disliked) , toy story (liked)")
    assert word_tokenizer.decode(t[0]) == "heat ( liked ) , jumanji ( disliked ) , toy story ( liked )"
    assert word_tokenizer.unk_token_id not in t[0]
    assert t[1] == b.encode(" sabrina (disliked) , heat (liked)")
    custom = PromptBuilder(
        word_tokenizer,
        from_dict(
            PromptConfig, {"history_feedback": "label", "liked_word": " loved ", "disliked_word": "meh"}
        ),
    )
    assert targets(custom, feedback_dataset())[1] == b.encode(" sabrina (meh) , heat (loved)")


def test_rating_feedback_formats_ratings_and_falls_back_to_label(word_tokenizer):
    b = PromptBuilder(word_tokenizer, PromptConfig(history_feedback=HistoryFeedback.RATING))
    t = targets(b, feedback_dataset())
    assert word_tokenizer.decode(t[0]) == "heat ( 4 / 5 ) , jumanji ( 2 / 5 ) , toy story ( 3 . 5 / 5 )"
    assert t[1] == b.encode(" sabrina (disliked) , heat (5/5)")  # NaN rating -> the label word
    cfg = PromptConfig(history_feedback="rating", max_rating=10)
    assert cfg.feedback_text(1, 4.0) == " (4/10)" and cfg.feedback_text(0, np.float32(3.7)) == " (3.7/10)"
    assert cfg.feedback_text(0, float("nan")) == " (disliked)"
    assert PromptConfig().feedback_text(1, 4.0) == ""


def test_budget_keeps_most_recent_whole_units(word_tokenizer):
    def user0(budget):
        cfg = PromptConfig(history_feedback="label", max_target_tokens=budget)
        b = PromptBuilder(word_tokenizer, cfg)
        return b, targets(b, feedback_dataset())[0]

    # " toy story (liked)" is 5 tokens, " jumanji (disliked)" 4, the separator 1.
    b, t = user0(10)
    assert t == b.encode(" jumanji (disliked) , toy story (liked)")
    b, t = user0(9)  # jumanji's unit does not fit whole: dropped, not cut
    assert t == b.encode(" toy story (liked)")
    b, t = user0(3)  # a single over-long unit keeps its end, so the feedback survives
    assert t == b.encode(" (liked)")


@pytest.mark.parametrize("separator", [",", ""])
@pytest.mark.parametrize("budget", [1, 2, 4, 7, 96])
def test_none_is_identical_to_the_old_code(word_tokenizer, separator, budget):
    rng = np.random.default_rng(budget)
    n_users = 30
    rows = [
        (u, int(rng.integers(0, 5)), int(rng.integers(0, 50)), str(rng.choice(["train", "train", "valid"])))
        for u in range(n_users)
        for _ in range(int(rng.integers(0, 9)))
    ]
    ds = dataset_from_rows(rows, n_users)
    ds.items.loc[3, "title"] = "  "  # an empty title is dropped in both
    ds.interactions["label"] = rng.integers(0, 2, len(rows)).astype(np.int8)
    b = PromptBuilder(word_tokenizer, PromptConfig(max_target_tokens=budget, separator=separator))
    train = ds.split("train")
    new_users, new_pieces = _history_targets(ds, train, b)
    old_users, old_pieces = _old_history_targets(ds, train, b)
    assert new_users.tolist() == old_users.tolist() and len(new_users) > 10
    assert [p.tolist() for p in new_pieces] == [p.tolist() for p in old_pieces]
    assert all(p.dtype == np.int32 for p in new_pieces)
    for ds_ in (tiny_dataset(), feedback_dataset()):  # and the fixtures of the other tests
        got, old = (
            _history_targets(ds_, ds_.split("train"), b),
            _old_history_targets(ds_, ds_.split("train"), b),
        )
        assert [p.tolist() for p in got[1]] == [p.tolist() for p in old[1]]


def test_each_title_and_suffix_is_tokenized_once(word_tokenizer, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [(u, int(rng.integers(0, 5)), t, "train") for u in range(40) for t in range(10)]
    ds = dataset_from_rows(rows, 40)
    ds.interactions["label"] = rng.integers(0, 2, len(rows)).astype(np.int8)
    ds.interactions["rating"] = rng.integers(1, 6, len(rows)).astype(np.float32)
    b = PromptBuilder(word_tokenizer, PromptConfig(history_feedback="rating"))
    seen: list[str] = []
    original = b.encode_many
    monkeypatch.setattr(b, "encode_many", lambda texts: seen.extend(texts) or original(texts))
    monkeypatch.setattr(b, "encode", lambda text: pytest.fail(f"per-row encode of {text!r}"))
    ex_set = build_examples(ds, b)
    assert len(ex_set) == 40
    assert len(seen) == 5 + 5 and len(set(seen)) == len(seen)  # 5 titles + 5 distinct ratings, 400 rows
    codes, texts = history_feedback_texts(ds.split("train"), b.config)
    assert sorted(texts) == [f" ({r}/5)" for r in range(1, 6)] and codes.shape == (400,)


def test_feedback_config_errors():
    with pytest.raises(ConfigError, match=r"history_feedback.*target_mode"):
        PromptConfig(target_mode=TargetMode.REVIEW, history_feedback="label")
    with pytest.raises(ConfigError, match=r"history_feedback.*target_mode"):
        from_dict(PromptConfig, {"target_mode": "review", "history_feedback": "rating"})
    assert PromptConfig(target_mode="review").history_feedback is HistoryFeedback.NONE
    with pytest.raises(ConfigError, match="PromptConfig.history_feedback: 'stars' is not one of"):
        PromptConfig(history_feedback="stars")
    with pytest.raises(ConfigError, match="PromptConfig.liked_word must be a non-empty"):
        PromptConfig(liked_word="  ")
    with pytest.raises(ConfigError, match="PromptConfig.disliked_word must be a non-empty"):
        from_dict(PromptConfig, {"disliked_word": None})
    with pytest.raises(ConfigError, match="must differ"):
        PromptConfig(liked_word="ok", disliked_word="ok")
    with pytest.raises(ConfigError, match="contains the separator"):
        PromptConfig(liked_word="good, really")
    with pytest.raises(ConfigError, match="PromptConfig.max_rating"):
        PromptConfig(max_rating=0)
    cfg = from_dict(PromptConfig, {"history_feedback": "rating", "max_rating": 10})
    assert cfg.history_feedback is HistoryFeedback.RATING and cfg.max_rating == 10.0
