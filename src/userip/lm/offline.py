"""The offline default LLM: a small causal LM built from a config, pre-trained briefly on the dataset's own
texts, cached, and then used *frozen* for profile inference.

Why: no weights can be downloaded here, and soft tokens fit under a frozen *random* LM barely lower the loss
and mean nothing (DESIGN.md, "Signal without pretrained weights"). What a real LLM brings to UserIP-Tuning is
world knowledge linking profile words ("sports", "budget") to behaviour (the titles a sporty, thrifty user
buys). The offline LM learns exactly that link from the dataset itself: it is pre-trained on the UserIP
prompt with each user's *derived* profile words (the dataset layer's hints: favourite category, price level)
written as real words in the soft-token slots, under the same profile-isolating mask, predicting the user's
training-split title history. Frozen afterwards, it gives fresh soft tokens (fit without hints) a space in
which a user's behaviour is best explained by a point near the right profile word.

Only the training split is used (targets and hints both come from it), so nothing leaks from valid/test.

Artifacts are ordinary Hugging Face folders (``save_pretrained`` of model and tokenizer, plus
``userip_lm.json``), so every consumer loads them with ``AutoModelForCausalLM.from_pretrained(path)`` like any
hub model. They are cached under a key made of the dataset's content hash and a hash of the configs, written
into a temporary folder and renamed into place, so a crash never leaves a half-written model behind. The
manifest records every file's SHA-256; a cached folder whose files no longer match (or that records none) is
rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from userip.data.preprocess import PROFILE_HINT_COLUMNS
from userip.data.schema import Dataset
from userip.lm.gguf import SMOLLM2_SPEC, converted_folder, smollm2_gguf_path
from userip.lm.tokenizer import TokenizerModel, build_tokenizer, unknown_words
from userip.prompts import (
    IGNORE_INDEX,
    PromptBuilder,
    PromptConfig,
    PromptExample,
    TargetMode,
    TokenKind,
    build_examples,
    collate,
)
from userip.prompts.targets import history_feedback_texts
from userip.prompts.template import HistoryFeedback
from userip.utils.artifacts import folder_hashes, verify_folder
from userip.utils.config import ConfigError, choice, to_dict
from userip.utils.io import user_cache_dir
from userip.utils.seed import seed_everything

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LM_MANIFEST = "userip_lm.json"  # written last inside the folder; its presence marks a complete artifact
OFFLINE_SPEC = "offline"
RANDOM_SPEC = "random"


class Architecture(enum.Enum):
    LLAMA = "llama"  # LlamaForCausalLM: RoPE positions, RMSNorm, SwiGLU (like stories260K / Llama-2)
    GPT2 = "gpt2"  # GPT2LMHeadModel: learned positions, LayerNorm, GELU


class SlotHintMode(enum.Enum):
    HINTS = "hints"  # the user's derived profile words fill the slots (the design that gives signal)
    NONE = "none"  # slots left empty: the LM learns the template and titles only (ablation)


def _default_slot_hint_columns() -> dict[str, str]:
    return dict(PROFILE_HINT_COLUMNS)


@dataclasses.dataclass
class OfflineLMConfig:
    """Shape and pre-training of the offline LM.

    ``slot_hint_columns`` maps a profile name of the prompt to a column of ``dataset.hints`` whose value is
    written into that profile's slots during pre-training; profiles not listed get empty slots.
    ``short_target_fraction``: share of the prompt examples whose target is, each epoch, a random window of 1
    to ``short_target_max_titles`` consecutive titles of the user's history instead of the whole history. Why:
    in a long history the titles themselves reveal the profile (in-context), so an LM trained only on whole
    histories learns to ignore the slot words; with few titles the slot words are the only evidence.
    ``plain_title_ratio``: extra examples per epoch, as a fraction of the prompt examples, that are bare item
    titles (no profile block), so the LM also models titles unconditionally.
    ``max_steps`` caps the optimizer steps (``None``: ``epochs`` full passes), to keep pre-training within a
    time budget on large datasets (default: 300 steps, about 45 s of one core on the default synthetic set).
    ``tie_word_embeddings`` is off on purpose: the hint words ("low", "high", "kitchen") are never predicted,
    and with tied weights the output softmax drags all such never-target words to one shared vector, which
    erased the price-level words' differences (measured: the LM then ignored the background slot entirely;
    untied, it used both slots and its loss fell further).
    """

    architecture: Architecture = Architecture.LLAMA
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None  # None: 4 * hidden_size
    tie_word_embeddings: bool = False  # untied: see the class docstring
    vocab_size: int = 4096  # cap for the trained tokenizer; required words are added beyond it
    tokenizer_model: TokenizerModel = TokenizerModel.WORD
    max_length: int = 256  # position budget; must cover the template + slot words + max_target_tokens
    epochs: int = 6
    max_steps: int | None = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    slot_hint_mode: SlotHintMode = SlotHintMode.HINTS
    slot_hint_columns: dict[str, str] = dataclasses.field(default_factory=_default_slot_hint_columns)
    missing_hint_word: str = "unknown"
    short_target_fraction: float = 0.5
    short_target_max_titles: int = 3
    plain_title_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        where = "OfflineLMConfig"
        self.architecture = choice(Architecture, self.architecture, f"{where}.architecture")  # type: ignore[assignment]
        self.tokenizer_model = choice(TokenizerModel, self.tokenizer_model, f"{where}.tokenizer_model")  # type: ignore[assignment]
        self.slot_hint_mode = choice(SlotHintMode, self.slot_hint_mode, f"{where}.slot_hint_mode")  # type: ignore[assignment]
        positive = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "max_length": self.max_length,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"OfflineLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"OfflineLMConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.architecture is Architecture.LLAMA and (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"OfflineLMConfig: Llama's rotary embeddings need an even head size; hidden_size/num_heads = "
                f"{self.hidden_size // self.num_heads}"
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(
                f"OfflineLMConfig.intermediate_size must be >= 1 or null, got {self.intermediate_size}"
            )
        if self.vocab_size < 16:
            raise ConfigError(f"OfflineLMConfig.vocab_size must be >= 16, got {self.vocab_size}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"OfflineLMConfig.max_steps must be >= 0 or null, got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"OfflineLMConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigError(f"OfflineLMConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"OfflineLMConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError(f"OfflineLMConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 <= self.short_target_fraction <= 1:
            raise ConfigError(
                f"OfflineLMConfig.short_target_fraction must be in [0, 1], got {self.short_target_fraction}"
            )
        if self.short_target_max_titles < 1:
            raise ConfigError(
                f"OfflineLMConfig.short_target_max_titles must be >= 1, got {self.short_target_max_titles}"
            )
        if self.plain_title_ratio < 0:
            raise ConfigError(f"OfflineLMConfig.plain_title_ratio must be >= 0, got {self.plain_title_ratio}")
        if not isinstance(self.slot_hint_columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.slot_hint_columns.items()
        ):
            raise ConfigError(
                "OfflineLMConfig.slot_hint_columns must map profile names to hint columns, e.g. "
                f"{_default_slot_hint_columns()}; got {self.slot_hint_columns!r}"
            )
        if not self.missing_hint_word.strip():
            raise ConfigError("OfflineLMConfig.missing_hint_word must be a non-empty word")

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


@dataclasses.dataclass
class PretrainResult:
    """What pre-training measured (also stored in the artifact's ``userip_lm.json``)."""

    steps: int
    epochs_run: float
    num_prompt_examples: int
    num_plain_examples: int
    initial_loss: float  # mean target loss over the first few steps
    final_loss: float  # mean target loss over the last few steps
    epoch_losses: list[float]
    wall_seconds: float


# ---------------------------------------------------------------------------------------------- texts


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


# ---------------------------------------------------------------------------------------------- model


def build_model_config(config: OfflineLMConfig, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The HF config of the offline LM (vocabulary = the trained tokenizer's)."""
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if config.architecture is Architecture.LLAMA:
        return LlamaConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.resolved_intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_length,
            **common,
        )
    return GPT2Config(
        n_embd=config.hidden_size,
        n_inner=config.resolved_intermediate_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_positions=config.max_length,
        **common,
    )


def build_model(config: OfflineLMConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A freshly initialised (seeded) causal LM of the configured shape."""
    torch.manual_seed(config.seed)
    model_config = build_model_config(config, tokenizer)
    model_cls = LlamaForCausalLM if config.architecture is Architecture.LLAMA else GPT2LMHeadModel
    return model_cls(model_config)


# ---------------------------------------------------------------------------------------------- pre-training


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


def pretrain_model(
    model: PreTrainedModel,
    prompt_examples: Sequence[PromptExample],
    plain_examples: Sequence[PromptExample],
    builder: PromptBuilder,
    config: OfflineLMConfig,
    progress: bool = True,
) -> PretrainResult:
    """Train ``model`` in place with AdamW + warmup/cosine on the examples; returns the loss record."""
    if not prompt_examples and not plain_examples:
        raise ConfigError("offline LM pre-training: no training examples (empty training split?)")
    longest = max(len(e) for e in [*prompt_examples, *plain_examples])
    if longest > config.max_length:
        raise ConfigError(
            f"OfflineLMConfig.max_length ({config.max_length}) is shorter than the longest pre-training "
            f"prompt ({longest} tokens: template + slot words + up to max_target_tokens="
            f"{builder.config.max_target_tokens}); raise max_length or lower max_target_tokens"
        )
    rng = np.random.default_rng(config.seed)
    num_plain = min(len(plain_examples), int(round(config.plain_title_ratio * len(prompt_examples))))
    per_epoch = len(prompt_examples) + num_plain
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(config.warmup_fraction * total_steps), max(total_steps, 1)
    )
    losses: list[float] = []
    epoch_losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="offline LM pre-training", unit="step", disable=not progress)
    step = 0
    while step < total_steps:
        short = rng.random(len(prompt_examples)) < config.short_target_fraction
        pool: list[PromptExample] = [
            short_target_example(e, builder.separator_ids, config.short_target_max_titles, rng) if cut else e
            for e, cut in zip(prompt_examples, short)
        ]
        if num_plain:
            pool += [plain_examples[j] for j in rng.choice(len(plain_examples), num_plain, replace=False)]
        order = rng.permutation(len(pool))
        epoch_sum, epoch_n = 0.0, 0
        for b in range(0, len(order), config.batch_size):
            if step >= total_steps:
                break
            batch = collate(
                [pool[j] for j in order[b : b + config.batch_size]],
                builder.pad_token_id,
                builder.config.template_sees_soft_tokens,
            )
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                labels=batch.labels,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss = float(out.loss.detach())
            losses.append(loss)
            epoch_sum, epoch_n = epoch_sum + loss, epoch_n + 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if epoch_n:
            epoch_losses.append(epoch_sum / epoch_n)
            log.info(
                "offline LM epoch %d: mean loss %.4f (%d steps)", len(epoch_losses), epoch_losses[-1], step
            )
    bar.close()
    model.eval()
    window = max(1, min(10, len(losses) // 10))
    return PretrainResult(
        steps=step,
        epochs_run=step / steps_per_epoch,
        num_prompt_examples=len(prompt_examples),
        num_plain_examples=num_plain,
        initial_loss=float(np.mean(losses[:window])) if losses else float("nan"),
        final_loss=float(np.mean(losses[-window:])) if losses else float("nan"),
        epoch_losses=epoch_losses,
        wall_seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------- cache


def default_cache_dir(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``RUN/lm`` inside a run; otherwise ``$USERIP_CACHE_DIR/lm`` (default ``~/.cache/userip/lm``)."""
    if run_dir is not None:
        return Path(run_dir) / "lm"
    return user_cache_dir("lm")


def _prompt_key_fields(prompt_config: PromptConfig) -> dict[str, Any]:
    """The prompt settings that change pre-training (codebook sizes do not).

    Without history feedback its settings change nothing, so they are left out: such keys stay those of
    configs written before the option existed, and the feedback words do not split the cache.
    """
    fields = to_dict(prompt_config)
    for profile in fields["profiles"]:
        profile.pop("codebook_size", None)
    if prompt_config.history_feedback is HistoryFeedback.NONE:
        for key in ("history_feedback", "liked_word", "disliked_word", "max_rating"):
            fields.pop(key, None)
    return fields


def cache_key(dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig, kind: str) -> str:
    """Folder name: ``<kind>-<dataset content hash>-<hash of configs>``."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "lm": to_dict(config),
        "prompt": _prompt_key_fields(prompt_config),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{kind}-{dataset.content_hash}-{digest}"


def is_complete_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / LM_MANIFEST).is_file()


def verify_artifact(path: str | os.PathLike[str]) -> list[str]:
    """What is wrong with a cached LM folder (empty: its files match the SHA-256s its manifest recorded)."""
    try:
        manifest = read_lm_manifest(path)
    except (OSError, ValueError) as e:
        return [f"{LM_MANIFEST} unreadable ({e})"]
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        return [f"{LM_MANIFEST} records no file hashes (written before verification existed)"]
    return verify_folder(path, recorded)


def _reusable(path: Path, what: str) -> bool:
    if not is_complete_artifact(path):
        return False
    problems = verify_artifact(path)
    if problems:
        log.warning("%s cache %s failed verification (%s); rebuilding it", what, path, "; ".join(problems))
        return False
    return True


def read_lm_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``userip_lm.json`` of a cached offline/random LM folder."""
    return json.loads((Path(path) / LM_MANIFEST).read_text(encoding="utf-8"))


def _save_atomically(
    final: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, manifest: dict[str, Any]
) -> Path:
    """Save into a temporary sibling folder (manifest last), then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {**manifest, "files": folder_hashes(tmp, exclude=(LM_MANIFEST,))}
        (tmp / LM_MANIFEST).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if final.exists():
            # Replace an existing artifact: move it aside first (rename of a non-empty folder over another
            # fails), then remove it once the new one is in place.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _manifest(
    kind: str, dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig, model: PreTrainedModel
) -> dict[str, Any]:
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset_content_hash": dataset.content_hash,
        "dataset_source": dataset.source,
        "lm_config": to_dict(config),
        "prompt_config": to_dict(prompt_config),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def pretrain_offline_lm(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Build tokenizer and LM, pre-train on the train split with hint words in the slots, save; return path.

    Always trains (and replaces any cached artifact with the same key); use ``load_or_pretrain`` to reuse one.
    """
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    final = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, OFFLINE_SPEC)
    seed_everything(config.seed)
    tokenizer = build_dataset_tokenizer(dataset, prompt_config, config)
    builder = PromptBuilder(tokenizer, prompt_config)
    prompt_examples, plain_examples = pretraining_examples(dataset, builder, config)
    model = build_model(config, tokenizer)
    log.info(
        "pre-training the offline LM (%s, hidden %d, %d layers, vocab %d, %d parameters) on %d users' "
        "prompts (+%d plain titles available) of dataset %s",
        config.architecture.value, config.hidden_size, config.num_layers, len(tokenizer),
        sum(p.numel() for p in model.parameters()), len(prompt_examples), len(plain_examples),
        dataset.content_hash,
    )  # fmt: skip
    result = pretrain_model(model, prompt_examples, plain_examples, builder, config, progress=progress)
    log.info(
        "offline LM pre-trained: loss %.3f -> %.3f in %d steps, %.1f s",
        result.initial_loss, result.final_loss, result.steps, result.wall_seconds,
    )  # fmt: skip
    manifest = _manifest(OFFLINE_SPEC, dataset, prompt_config, config, model)
    manifest["pretraining"] = dataclasses.asdict(result)
    return _save_atomically(final, model, tokenizer, manifest)


def load_or_pretrain(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The cached offline LM for (dataset, configs) if complete, else pre-train and cache it."""
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    path = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, OFFLINE_SPEC)
    if _reusable(path, "offline LM"):
        log.info("offline LM: reusing %s (verified)", path)
        return path
    return pretrain_offline_lm(dataset, prompt_config, config, cache_dir=path.parent, progress=progress)


def load_or_build_random(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The ablation LM: the offline LM's tokenizer and architecture, seeded random weights, never trained."""
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    path = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, RANDOM_SPEC)
    if _reusable(path, "random LM"):
        return path
    tokenizer = build_dataset_tokenizer(dataset, prompt_config, config)
    model = build_model(config, tokenizer)
    log.info("random LM (untrained, seed %d) saved for the ablation: %s", config.seed, path)
    return _save_atomically(
        path, model, tokenizer, _manifest(RANDOM_SPEC, dataset, prompt_config, config, model)
    )


# ---------------------------------------------------------------------------------------------- resolver


def resolve_lm(
    spec: str,
    dataset: Dataset | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> str:
    """Turn the CLI's ``--lm`` value into something ``AutoModelForCausalLM.from_pretrained`` accepts.

    ``offline`` (default): the cached pre-trained offline LM (built on first use). ``random``: the same shape,
    untrained (ablation). ``smollm2`` or a ``.gguf`` file: a GGUF model converted once to a plain model folder
    (``userip.lm.gguf``), cached by the file's SHA-256 in ``cache_dir`` or the user cache (shared by runs).
    Anything else is a local folder or a Hugging Face hub id (``gpt2``, ``meta-llama/Llama-2-7b-hf``) passed
    through unchanged.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--lm: expected 'offline', 'random', a model folder or a hub id; got {spec!r}")
    spec = spec.strip()
    if spec == SMOLLM2_SPEC or spec.endswith(".gguf"):
        gguf_path = smollm2_gguf_path() if spec == SMOLLM2_SPEC else Path(spec).expanduser()
        return str(converted_folder(gguf_path, cache_dir if cache_dir is not None else default_cache_dir()))
    cache = cache_dir if cache_dir is not None else default_cache_dir(run_dir)
    if spec in (OFFLINE_SPEC, RANDOM_SPEC):
        if dataset is None:
            raise ConfigError(f"--lm {spec}: the {spec} LM is built from the dataset; none was given")
        if spec == OFFLINE_SPEC:
            return str(load_or_pretrain(dataset, prompt_config, config, cache, progress=progress))
        return str(load_or_build_random(dataset, prompt_config, config, cache))

    path = Path(spec).expanduser()
    looks_like_path = (
        spec.startswith(("/", "./", "../", "~")) or os.sep + os.sep in spec or spec.count("/") > 1
    )
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"--lm {spec}: is a file; expected a model folder (with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--lm {spec}: folder has no config.json; expected a Hugging Face model folder "
                "(save_pretrained output)"
            )
        return str(path)
    if looks_like_path:
        raise FileNotFoundError(f"--lm {spec}: no such model folder")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ConfigError(
            f"--lm {spec!r}: neither 'offline', 'random', an existing model folder, nor a valid hub id "
            "(such as 'gpt2' or 'meta-llama/Llama-2-7b-hf')"
        ) from None
    return spec  # a hub id: loaded (from the local HF cache when offline) by from_pretrained
