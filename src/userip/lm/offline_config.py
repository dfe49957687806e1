"""The offline LM's config: its shape, its pre-training and which hint words fill the profile slots."""

from __future__ import annotations

import dataclasses
import enum

from userip.data.preprocess import PROFILE_HINT_COLUMNS
from userip.lm.tokenizer import TokenizerModel
from userip.utils.config import ConfigError, check_fields, choice

OFFLINE_SPEC = "offline"  # --lm value: the offline LM pre-trained on the dataset (userip.lm.offline)
RANDOM_SPEC = "random"  # --lm value: the same shape, untrained (ablation)


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
        check_fields(
            self,
            positive_ints=(
                "hidden_size",
                "num_layers",
                "num_heads",
                "max_length",
                "epochs",
                "batch_size",
                "short_target_max_titles",
            ),
            optional_positive_ints=("intermediate_size",),
            optional_counts=("max_steps",),
            int_ranges={"vocab_size": (16, None)},
            positive_numbers=("learning_rate", "max_grad_norm"),
            nonnegative_numbers=("weight_decay", "plain_title_ratio"),
            fractions=("warmup_fraction",),
            words=("missing_hint_word",),
        )
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
        if not 0 <= self.short_target_fraction <= 1:
            raise ConfigError(
                f"OfflineLMConfig.short_target_fraction must be in [0, 1], got {self.short_target_fraction}"
            )
        if not isinstance(self.slot_hint_columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.slot_hint_columns.items()
        ):
            raise ConfigError(
                "OfflineLMConfig.slot_hint_columns must map profile names to hint columns, e.g. "
                f"{_default_slot_hint_columns()}; got {self.slot_hint_columns!r}"
            )

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size
