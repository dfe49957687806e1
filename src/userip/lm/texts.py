"""What the offline LM reads: the tokenizer's corpus and required words, each user's slot words, and the
pre-training examples (the UserIP prompt with hint words in the slots; short-target windows; plain titles).

Only the training split is used (targets and hints both come from it), so nothing leaks from valid/test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from transformers import (
    PreTrainedTokenizerFast,
)

from userip.data.schema import Dataset
from userip.lm.offline_config import OfflineLMConfig, SlotHintMode
from userip.lm.tokenizer import build_tokenizer, unknown_words
from userip.prompts import (
    IGNORE_INDEX,
    PromptBuilder,
    PromptConfig,
    PromptExample,
    TargetMode,
    TokenKind,
    build_examples,
)
from userip.prompts.targets import history_feedback_texts
from userip.utils.config import ConfigError


def tokenizer_texts(dataset: Dataset, prompt_config: PromptConfig) -> tuple[list[str], list[str]]:
    """(corpus, required texts) for the tokenizer.

    The corpus is item metadata (titles, categories, brands: descriptions of items, not of user behaviour, so
    using all items leaks nothing) and, in review mode, the training split's reviews. Required texts are the
    template pieces, the history feedback texts (" (liked)", " (4/5)") and every hint word, which must never
    be ``<unk>``.
    """
    items = dataset.items
    corpus = items["title"].fillna("").astype(str).tolist()
    corpus += [" ".join(map(str, cats)) for cats in items["categories"] if cats is not None and len(cats)]
    corpus += items["brand"].fillna("").astype(str).tolist()
    if prompt_config.target_mode is TargetMode.REVIEW and dataset.has_reviews:
        corpus += dataset.split("train")["review"].fillna("").astype(str).tolist()
    required = [p.phrase for p in prompt_config.profiles]
    required += [prompt_config.task_prefix + prompt_config.task_description + prompt_config.task_suffix]
    required += [prompt_config.separator]
    if prompt_config.target_mode is TargetMode.HISTORY:  # " (liked)", " (4/5)": never <unk> either
        required += [t for t in history_feedback_texts(dataset.profile_rows(), prompt_config)[1] if t]
    if dataset.hints is not None:
        for column in dataset.hints.columns:
            if column != "user_id":
                required += sorted({str(v) for v in dataset.hints[column].dropna() if str(v).strip()})
    required += sorted({str(c) for cats in items["categories"] if cats is not None for c in cats})
    return corpus, required


def build_dataset_tokenizer(
    dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig
) -> PreTrainedTokenizerFast:
    """The offline LM's tokenizer: trained on the dataset's words; every template and hint word is in it."""
    corpus, required = tokenizer_texts(dataset, prompt_config)
    tokenizer = build_tokenizer(
        corpus,
        config.vocab_size,
        required_texts=required + [config.missing_hint_word],
        model=config.tokenizer_model,
    )
    missing = unknown_words(tokenizer, required)
    if missing:  # cannot happen for the word model (required words are added); BPE never emits <unk>
        raise ConfigError(f"offline LM tokenizer: template/hint words map to <unk>: {missing[:10]}")
    return tokenizer


def slot_words_per_user(
    dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig
) -> dict[int, dict[str, str]]:
    """user_id -> {profile name: hint word(s) for its slots} used in pre-training (empty slots for NONE)."""
    profile_names = [p.name for p in prompt_config.profiles]
    if config.slot_hint_mode is SlotHintMode.NONE:
        return {}
    unknown = sorted(set(config.slot_hint_columns) - set(profile_names))
    if unknown:
        raise ConfigError(
            f"OfflineLMConfig.slot_hint_columns names profile(s) {unknown} that the prompt does not have; "
            f"prompt profiles: {profile_names}"
        )
    hints = dataset.hints
    if hints is None:
        raise ConfigError(
            "offline LM pre-training with slot_hint_mode 'hints' needs dataset.hints (derived profile words "
            "from the training split); this dataset has none. Prepare it with hints, or set "
            "slot_hint_mode: none"
        )
    missing_cols = sorted(set(config.slot_hint_columns.values()) - set(hints.columns))
    if missing_cols:
        raise ConfigError(
            f"OfflineLMConfig.slot_hint_columns: hint column(s) {missing_cols} not in dataset.hints "
            f"(columns: {[c for c in hints.columns if c != 'user_id']})"
        )
    out: dict[int, dict[str, str]] = {}
    columns = list(config.slot_hint_columns.items())
    for row in hints.itertuples(index=False):
        words = {}
        for profile, column in columns:
            value = getattr(row, column)
            text = (
                ""
                if value is None or (isinstance(value, float) and math.isnan(value))
                else str(value).strip()
            )
            words[profile] = text or config.missing_hint_word
        out[int(row.user_id)] = words
    return out


def pretraining_examples(
    dataset: Dataset, builder: PromptBuilder, config: OfflineLMConfig
) -> tuple[list[PromptExample], list[PromptExample]]:
    """(prompt examples with slot words, plain title examples), from the training split only.

    The targets are exactly those of profile inference (``userip.prompts.build_examples``: the user's training
    titles, most recent kept); the slots hold the user's hint words under the same mask.
    """
    prompt_config = builder.config
    example_set = build_examples(dataset, builder)
    words = slot_words_per_user(dataset, prompt_config, config)
    empty_slots: dict[str, list[int]] = {p.name: [] for p in prompt_config.profiles}
    slot_ids_cache: dict[tuple[tuple[str, str], ...], dict[str, list[int]]] = {}
    prompt_examples = []
    for i in range(len(example_set)):
        user_id = int(example_set.user_ids[i])
        target = example_set.target_ids[example_set.offsets[i] : example_set.offsets[i + 1]].tolist()
        user_words = words.get(user_id)
        if user_words is None:
            # SlotHintMode.NONE, or a user without a hint row: the slots stay empty.
            slot_ids = empty_slots
        else:
            key = tuple(sorted(user_words.items()))
            if key not in slot_ids_cache:  # few distinct hint combinations: tokenize each once
                slot_ids_cache[key] = {
                    **empty_slots,
                    **{n: builder.encode(" " + w) for n, w in user_words.items()},
                }
            slot_ids = slot_ids_cache[key]
        prompt_examples.append(builder.build_from_ids(target, user_id=user_id, slot_ids=slot_ids))

    plain_examples = []
    if config.plain_title_ratio > 0:
        train_items = np.unique(dataset.split("train")["item_id"].to_numpy())
        titles = dataset.items["title"].fillna("").astype(str).to_numpy()[train_items]
        bos = [] if builder.bos_token_id is None else [builder.bos_token_id]
        for ids in builder.encode_many([" " + t for t in titles if t.strip()]):
            ids = bos + ids[: config.max_length - len(bos)]
            kinds = [TokenKind.BOS] * len(bos) + [TokenKind.TARGET] * (len(ids) - len(bos))
            plain_examples.append(
                PromptExample(
                    user_id=-1,
                    input_ids=np.asarray(ids, dtype=np.int64),
                    token_kinds=np.asarray(kinds, dtype=np.int8),
                    profile_index=np.full(len(ids), -1, dtype=np.int8),
                    soft_slot_ids=np.full(len(ids), -1, dtype=np.int64),
                    labels=np.asarray([IGNORE_INDEX] * len(bos) + ids[len(bos) :], dtype=np.int64),
                )
            )
    return prompt_examples, plain_examples


def short_target_example(
    example: PromptExample, separator_ids: Sequence[int], max_titles: int, rng: np.random.Generator
) -> PromptExample:
    """``example`` with its target cut to a random window of 1..``max_titles`` consecutive titles.

    Titles are the pieces between separator tokens (with history feedback, title + feedback stay one piece);
    the template part (everything before the target) is kept.
    """
    is_target = example.token_kinds == TokenKind.TARGET
    start = int(np.argmax(is_target)) if is_target.any() else len(example)
    target = example.input_ids[start:].tolist()
    sep = list(separator_ids)
    titles: list[list[int]] = [[]]
    i = 0
    while i < len(target):
        if sep and target[i : i + len(sep)] == sep:
            titles.append([])
            i += len(sep)
        else:
            titles[-1].append(target[i])
            i += 1
    titles = [t for t in titles if t]
    if len(titles) <= 1:
        return example
    count = int(rng.integers(1, min(max_titles, len(titles)) + 1))
    first = int(rng.integers(0, len(titles) - count + 1))
    window: list[int] = []
    for title in titles[first : first + count]:
        window += (sep if window else []) + title
    n = len(window)
    return PromptExample(
        user_id=example.user_id,
        input_ids=np.concatenate([example.input_ids[:start], np.asarray(window, dtype=np.int64)]),
        token_kinds=np.concatenate(
            [example.token_kinds[:start], np.full(n, TokenKind.TARGET, dtype=np.int8)]
        ),
        profile_index=np.concatenate([example.profile_index[:start], np.full(n, -1, dtype=np.int8)]),
        soft_slot_ids=np.concatenate([example.soft_slot_ids[:start], np.full(n, -1, dtype=np.int64)]),
        labels=np.concatenate([example.labels[:start], np.asarray(window, dtype=np.int64)]),
    )
