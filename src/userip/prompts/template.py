"""The UserIP prompt: profile phrases with soft-token slots, a task description, then the target text.

Layout of one example (one row of a batch; ``K_p`` soft slots after profile p's phrase)::

    [BOS] "This user's hobby is" [z_hobby x4] ", his background is" [z_background x3] ". <task>:" <target>
     BOS   PHRASE (profile 0)     SOFT (p=0)    PHRASE (profile 1)   SOFT (p=1)        TASK      TARGET

Every token carries a ``TokenKind`` and a profile index (-1 outside the profile block); the collator builds
the
4D attention mask of DESIGN.md item 2 from them (see ``userip.prompts.collate``).

The template pieces are identical for every user, so ``PromptBuilder`` tokenizes them once; per example
only the
target ids (and optional slot words) are appended. Pieces are tokenized separately
(``add_special_tokens=False``)
and concatenated, which keeps every profile's phrase tokens identical whatever surrounds them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from userip.utils.config import ConfigError, check_fields, choice

IGNORE_INDEX = -100  # label value ignored by the loss (HF / torch convention)


class TokenKind(enum.IntEnum):
    PAD = 0
    BOS = 1
    PHRASE = 2  # profile p's name text ("This user's hobby is")
    SOFT = 3  # profile p's soft-token slots (or, for LM pre-training, real slot words)
    TASK = 4  # task description, shared by every user
    TARGET = 5  # the user's behaviour text; the only tokens with labels


class TargetMode(enum.Enum):
    HISTORY = "history"  # titles of the user's training interactions in time order (most recent kept)
    REVIEW = "review"  # one example per training interaction with review text


class HistoryFeedback(enum.Enum):
    """What follows each title of a history target (how the user responded to the item)."""

    NONE = "none"  # the title alone: "heat , jumanji"
    LABEL = "label"  # the training label as a word: "heat (liked) , jumanji (disliked)"
    RATING = "rating"  # the rating: "heat (4/5) , jumanji (2/5)"; a NaN rating falls back to the label word


@dataclasses.dataclass(frozen=True)
class ProfileSpec:
    """One latent profile: its name, the phrase its soft tokens follow, how many soft tokens, codebook
    size."""

    name: str
    phrase: str
    num_soft_tokens: int = 1
    codebook_size: int = 4

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ConfigError(f"ProfileSpec.name: expected an identifier such as 'hobby', got {self.name!r}")
        if not self.phrase or not self.phrase.strip():
            raise ConfigError(
                f"ProfileSpec {self.name!r}: the profile phrase is empty; every profile needs a "
                f"phrase such as "
                '"This user\'s hobby is" (its soft tokens attend only to it)'
            )
        check_fields(
            self, positive_ints=("num_soft_tokens", "codebook_size"), where=f"ProfileSpec[{self.name}]"
        )


def default_profiles() -> tuple[ProfileSpec, ...]:
    """The paper's two profiles: hobby (codebook 4) and background (codebook 3), one soft token each."""
    return (
        ProfileSpec("hobby", "This user's hobby is", num_soft_tokens=1, codebook_size=4),
        ProfileSpec("background", ", his background is", num_soft_tokens=1, codebook_size=3),
    )


@dataclasses.dataclass
class PromptConfig:
    """Prompt template and target construction.

    ``task_description`` is rendered as ``<task_prefix><task_description><task_suffix>`` after the profile
    block.
    ``template_sees_soft_tokens``: whether the task-description tokens attend to the soft tokens (paper: yes).
    Target tokens always see every soft token.

    ``history_feedback`` (target_mode history only) writes the user's response after each title, so the
    profiles can learn taste and rating tendency, not only what was consumed: ``label`` appends
    `` (<liked_word>)`` or `` (<disliked_word>)`` from the interaction's training label, ``rating`` appends
    `` (<rating>/<max_rating>)`` (`` (4/5)``, `` (3.5/5)``), or the label word where the rating is NaN.
    """

    profiles: tuple[ProfileSpec, ...] = dataclasses.field(default_factory=default_profiles)
    task_description: str = "The user's recent items are"
    task_prefix: str = ". "
    task_suffix: str = ":"
    target_mode: TargetMode = TargetMode.HISTORY
    max_target_tokens: int = 96
    separator: str = ","
    add_bos: bool | None = None  # None: add BOS iff the tokenizer itself adds one (Llama yes, GPT-2 no)
    template_sees_soft_tokens: bool = True
    history_feedback: HistoryFeedback = HistoryFeedback.NONE
    liked_word: str = "liked"
    disliked_word: str = "disliked"
    max_rating: float = 5.0

    def __post_init__(self) -> None:
        self.profiles = tuple(self.profiles)
        if not self.profiles:
            raise ConfigError("PromptConfig.profiles: at least one profile (name + phrase) is required")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ConfigError(f"PromptConfig.profiles: duplicate profile names {names}")
        self.target_mode = choice(TargetMode, self.target_mode, "PromptConfig.target_mode")  # type: ignore[assignment]
        check_fields(self, positive_ints=("max_target_tokens",), positive_numbers=("max_rating",))
        self.history_feedback = choice(  # type: ignore[assignment]
            HistoryFeedback, self.history_feedback, "PromptConfig.history_feedback"
        )
        if self.history_feedback is not HistoryFeedback.NONE and self.target_mode is not TargetMode.HISTORY:
            raise ConfigError(
                f"PromptConfig.history_feedback {self.history_feedback.value!r} applies to "
                f"PromptConfig.target_mode 'history' only, got target_mode {self.target_mode.value!r}; "
                "set history_feedback: none or target_mode: history"
            )
        check_fields(self, words=("liked_word", "disliked_word"))
        for key in ("liked_word", "disliked_word"):
            word = getattr(self, key)
            if self.separator.strip() and self.separator.strip() in word:
                raise ConfigError(
                    f"PromptConfig.{key} {word!r} contains the separator {self.separator!r}, which splits "
                    "the history into titles"
                )
            setattr(self, key, word.strip())
        if self.liked_word == self.disliked_word:
            raise ConfigError(
                f"PromptConfig.liked_word and disliked_word must differ, both are {self.liked_word!r}"
            )

    def feedback_text(self, label: int, rating: float = math.nan) -> str:
        """The text written after a title for one interaction (``""`` for ``history_feedback`` none).

        >>> PromptConfig(history_feedback="rating").feedback_text(1, 4.0)
        ' (4/5)'
        """
        mode = self.history_feedback
        if mode is HistoryFeedback.NONE:
            return ""
        if mode is HistoryFeedback.RATING and not math.isnan(rating):
            return f" ({float(rating):g}/{float(self.max_rating):g})"
        return f" ({self.liked_word if label else self.disliked_word})"

    @property
    def num_profiles(self) -> int:
        return len(self.profiles)

    @property
    def num_slots(self) -> int:
        """Total soft tokens per user (sum of every profile's ``num_soft_tokens``)."""
        return sum(p.num_soft_tokens for p in self.profiles)

    def slot_offsets(self) -> list[int]:
        """Index of profile p's first soft slot in the flattened (num_slots,) axis."""
        out, acc = [], 0
        for p in self.profiles:
            out.append(acc)
            acc += p.num_soft_tokens
        return out


@dataclasses.dataclass
class PromptExample:
    """One tokenized prompt. All arrays have shape (L,)."""

    user_id: int
    input_ids: np.ndarray  # int64; soft slots hold a placeholder id (their embedding is replaced)
    token_kinds: np.ndarray  # int8 TokenKind
    profile_index: np.ndarray  # int8; profile of PHRASE/SOFT tokens, -1 elsewhere
    soft_slot_ids: (
        np.ndarray
    )  # int64; flattened slot index for positions spliced from the table, -1 elsewhere
    labels: np.ndarray  # int64; IGNORE_INDEX except target tokens

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Tokenizes the fixed template once and assembles per-example token arrays.

    Works with any Hugging Face tokenizer (``__call__`` with ``add_special_tokens``). A tokenizer without a
    pad
    token is fine: padding is never attended and never labelled, so ``pad_token_id`` falls back to eos/unk/0.
    """

    def __init__(self, tokenizer: Any, config: PromptConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        cfg = self.config
        add_bos = cfg.add_bos
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if add_bos is None:
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        if add_bos and bos_id is None:
            raise ConfigError("PromptConfig.add_bos is true but the tokenizer has no bos_token_id")
        self.bos_token_id: int | None = bos_id if add_bos else None
        self.phrase_ids = [self.encode(p.phrase) for p in cfg.profiles]
        for spec, ids in zip(cfg.profiles, self.phrase_ids):
            if not ids:
                raise ConfigError(f"profile {spec.name!r}: phrase {spec.phrase!r} tokenizes to nothing")
        self.task_ids = self.encode(cfg.task_prefix + cfg.task_description + cfg.task_suffix)
        self.separator_ids = self.encode(cfg.separator) if cfg.separator else []
        self.slot_offsets = cfg.slot_offsets()
        self._prefix = self._build_prefix()

    # ------------------------------------------------------------------ tokenization helpers
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Batch-tokenize (fast tokenizers do this in parallel Rust code)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @property
    def pad_token_id(self) -> int:
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    @property
    def placeholder_id(self) -> int:
        """Token id stored at soft slots; any valid id works since its embedding is replaced."""
        return self.pad_token_id

    # ------------------------------------------------------------------ assembly
    def _build_prefix(self) -> tuple[np.ndarray, ...]:
        """Token arrays of the profile block with soft slots (identical for every user), then TASK."""
        ids, kinds, prof, slots = [], [], [], []
        if self.bos_token_id is not None:
            ids.append(self.bos_token_id), kinds.append(TokenKind.BOS), prof.append(-1), slots.append(-1)
        for p, (spec, phrase) in enumerate(zip(self.config.profiles, self.phrase_ids)):
            ids += phrase
            kinds += [TokenKind.PHRASE] * len(phrase)
            prof += [p] * len(phrase)
            slots += [-1] * len(phrase)
            ids += [self.placeholder_id] * spec.num_soft_tokens
            kinds += [TokenKind.SOFT] * spec.num_soft_tokens
            prof += [p] * spec.num_soft_tokens
            slots += list(range(self.slot_offsets[p], self.slot_offsets[p] + spec.num_soft_tokens))
        ids += self.task_ids
        kinds += [TokenKind.TASK] * len(self.task_ids)
        prof += [-1] * len(self.task_ids)
        slots += [-1] * len(self.task_ids)
        return (
            np.asarray(ids, dtype=np.int64),
            np.asarray(kinds, dtype=np.int8),
            np.asarray(prof, dtype=np.int8),
            np.asarray(slots, dtype=np.int64),
        )

    @property
    def prefix_length(self) -> int:
        """Length of the template before the target (with soft slots, without slot words)."""
        return len(self._prefix[0])

    def build_from_ids(
        self,
        target_ids: Sequence[int],
        user_id: int = -1,
        slot_ids: Mapping[str, Sequence[int]] | None = None,
        label_slot_words: bool = False,
    ) -> PromptExample:
        """Assemble one example from target token ids.

        ``slot_ids`` (profile name -> token ids) puts real words in a profile's slots instead of soft tokens,
        under the same mask (SOFT kind, not spliced); used to pre-train a small LM on hint words.
        ``label_slot_words`` also puts those words in the labels.
        """
        target = np.asarray(list(target_ids)[: self.config.max_target_tokens], dtype=np.int64)
        if slot_ids:
            unknown = sorted(set(slot_ids) - {p.name for p in self.config.profiles})
            if unknown:
                raise ConfigError(
                    f"slot words for unknown profile(s) {unknown}; profiles: "
                    f"{[p.name for p in self.config.profiles]}"
                )
            ids, kinds, prof, slots, labels = self._prefix_with_slot_words(slot_ids, label_slot_words)
        else:
            ids, kinds, prof, slots = self._prefix
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        n = len(target)
        return PromptExample(
            user_id=int(user_id),
            input_ids=np.concatenate([ids, target]),
            token_kinds=np.concatenate([kinds, np.full(n, TokenKind.TARGET, dtype=np.int8)]),
            profile_index=np.concatenate([prof, np.full(n, -1, dtype=np.int8)]),
            soft_slot_ids=np.concatenate([slots, np.full(n, -1, dtype=np.int64)]),
            labels=np.concatenate([labels, target]),
        )

    def build(
        self,
        target_text: str,
        user_id: int = -1,
        slot_texts: Mapping[str, str] | None = None,
        label_slot_words: bool = False,
    ) -> PromptExample:
        """Assemble one example from target text (prefixed with a space, as it follows ``task_suffix``)."""
        slot_ids = {name: self.encode(" " + text) for name, text in (slot_texts or {}).items()}
        return self.build_from_ids(self.encode(" " + target_text), user_id, slot_ids, label_slot_words)

    def _prefix_with_slot_words(
        self, slot_ids: Mapping[str, Sequence[int]], label_slot_words: bool
    ) -> tuple[np.ndarray, ...]:
        ids, kinds, prof, slots = (list(a) for a in self._prefix)
        out = ([], [], [], [], [])  # ids, kinds, prof, slots, labels
        for i, kind in enumerate(kinds):
            p = prof[i]
            if kind == TokenKind.SOFT and self.config.profiles[p].name in slot_ids:
                name = self.config.profiles[p].name
                if slots[i] != self.slot_offsets[p]:  # the words replace all of p's slots, once
                    continue
                words = list(slot_ids[name])
                out[0].extend(words)
                out[1].extend([TokenKind.SOFT] * len(words))
                out[2].extend([p] * len(words))
                out[3].extend([-1] * len(words))
                out[4].extend(words if label_slot_words else [IGNORE_INDEX] * len(words))
                continue
            for lst, v in zip(out, (ids[i], kind, p, slots[i], IGNORE_INDEX)):
                lst.append(v)
        dtypes = (np.int64, np.int8, np.int8, np.int64, np.int64)
        return tuple(np.asarray(lst, dtype=dt) for lst, dt in zip(out, dtypes))
