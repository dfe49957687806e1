"""Frozen causal LM + per-user soft tokens spliced into ``inputs_embeds`` (paper 2.3, eq. 4)."""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from userip.data.preprocess import PROFILE_HINT_COLUMNS, UNKNOWN_PRICE_LEVEL
from userip.prompts import IGNORE_INDEX, PromptBatch, PromptBuilder, PromptConfig
from userip.utils.config import ConfigError, check_fields, choice


class SoftTokenInit(enum.Enum):
    VALUE_WORDS = "value_words"  # mean embedding of the words naming the profile's values + small noise
    PHRASE = "phrase"  # mean embedding of the profile's phrase tokens + small noise
    RANDOM = "random"  # normal with the embedding matrix's std


def _default_value_word_columns() -> dict[str, str]:
    return dict(PROFILE_HINT_COLUMNS)


@dataclasses.dataclass
class SoftTokenConfig:
    """How each user's soft tokens start.

    ``value_words`` (default) starts a profile's slots at the mean embedding of the words that name its
    values (hobby: the category names; background: low / medium / high), i.e. prompt tuning's text
    initialisation with the profile's vocabulary instead of its name. Why: with ``phrase`` both profiles start
    at nearly the same point (their phrases share most words) and nothing ties a slot to its profile, so on
    the synthetic default the background token took up the hobby and the hobby token, for some users, the
    price level (recovery NMI hobby 0.60, background 0.09); starting each slot among its own value words,
    where the offline LM learnt to read that profile, gave hobby 0.92 and background 0.75 and a lower LM
    loss (bench/bench_recovery.py). The words come from ``value_words[profile]`` when given, else from the
    dataset's derived hint column ``value_word_columns[profile]`` (training split only; "unknown" and empty
    values skipped); a profile with neither falls back to its phrase.
    """

    init: SoftTokenInit = SoftTokenInit.VALUE_WORDS
    init_noise: float = 0.1  # noise std as a fraction of the embedding matrix's std (breaks user symmetry)
    value_words: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    value_word_columns: dict[str, str] = dataclasses.field(default_factory=_default_value_word_columns)

    def __post_init__(self) -> None:
        self.init = choice(SoftTokenInit, self.init, "soft_tokens.init")  # type: ignore[assignment]
        check_fields(self, nonnegative_numbers=("init_noise",), where="soft_tokens")
        for name, words in self.value_words.items():
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ConfigError(
                    f"soft_tokens.value_words.{name}: expected a list of non-empty words, got {words!r}"
                )


def resolve_value_words(
    config: SoftTokenConfig, prompt_config: PromptConfig, hints: pd.DataFrame | None
) -> dict[str, list[str]]:
    """Profile name -> the words its soft tokens start from ([] -> the phrase), per ``SoftTokenConfig``."""
    names = [p.name for p in prompt_config.profiles]
    unknown = sorted(set(config.value_words) - set(names))
    if unknown:
        raise ConfigError(f"soft_tokens.value_words names profile(s) {unknown}; the prompt has {names}")
    out: dict[str, list[str]] = {}
    for name in names:
        column = config.value_word_columns.get(name)
        if name in config.value_words:
            out[name] = list(config.value_words[name])
        elif hints is not None and column in hints.columns:
            values = {str(v).strip() for v in hints[column].dropna()}
            out[name] = sorted(values - {"", UNKNOWN_PRICE_LEVEL})
        else:
            out[name] = []
    return out


def init_token_ids(
    builder: PromptBuilder, config: SoftTokenConfig, value_words: dict[str, list[str]]
) -> list[list[int]]:
    """Per profile, the token ids whose mean embedding starts its soft tokens (for ``initialise``)."""
    if config.init is not SoftTokenInit.VALUE_WORDS:
        return [list(ids) for ids in builder.phrase_ids]
    out = []
    for spec, phrase_ids in zip(builder.config.profiles, builder.phrase_ids):
        ids = [i for word in value_words.get(spec.name, []) for i in builder.encode(word)]
        out.append(ids or list(phrase_ids))
    return out


class SoftTokenTable(nn.Module):
    """(num_users, num_slots, hidden) fp32 table, a buffer (not a Parameter): rows are gathered per batch
    as leaf
    tensors and updated row-wise, so no dense gradient of the whole table ever exists. May live on CPU."""

    def __init__(self, num_users: int, num_slots: int, hidden_size: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_users, num_slots, hidden_size, device=device))

    @property
    def num_users(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def initialise(
        self,
        input_embeds: torch.Tensor,
        init_ids: Sequence[Sequence[int]],
        slots_per_profile: Sequence[int],
        config: SoftTokenConfig,
        seed: int,
    ) -> None:
        """Deterministic by ``seed``; ``input_embeds`` is the LM's (vocab, hidden) input embedding matrix and
        ``init_ids[p]`` the token ids whose mean embedding starts profile p's slots (``init_token_ids``)."""
        emb = input_embeds.detach().float().cpu()
        std = emb.std().item()
        if config.init is SoftTokenInit.RANDOM:
            self.initialise_random(std, seed)
            return
        D = self.weight.shape[-1]
        base = torch.cat([emb[list(ids)].mean(0).expand(k, D) for ids, k in zip(init_ids, slots_per_profile)])
        self.weight.copy_(
            (base + _seeded_normal(self.weight.shape, seed) * (config.init_noise * std)).to(
                self.weight.device
            )
        )

    @torch.no_grad()
    def initialise_random(self, std: float, seed: int) -> None:
        """Every row from N(0, std^2), deterministic by ``seed`` (the same draw as ``initialise``'s noise)."""
        self.weight.copy_((_seeded_normal(self.weight.shape, seed) * std).to(self.weight.device))


def _seeded_normal(shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def initial_soft_token_table(
    num_users: int,
    input_embeds: torch.Tensor,
    builder: PromptBuilder,
    config: SoftTokenConfig,
    value_words: dict[str, list[str]],
    seed: int,
    device: str | torch.device = "cpu",
) -> SoftTokenTable:
    """A (num_users, S, D) table started per ``config`` for ``builder``'s prompt: the one way the profile
    stage, new-user inference, explanations and benchmarks start soft tokens. ``input_embeds`` is the LM's
    (vocab, D) input embedding matrix, ``value_words`` the words of ``resolve_value_words``."""
    prompt = builder.config
    table = SoftTokenTable(num_users, prompt.num_slots, input_embeds.shape[1], device)
    table.initialise(
        input_embeds,
        init_token_ids(builder, config, value_words),
        [p.num_soft_tokens for p in prompt.profiles],
        config,
        seed,
    )
    return table


class SoftTokenModel(nn.Module):
    """The soft-token table and the profile vectors read from it: what the profile trainer optimises.

    Alone (``lm: none``, ``userip.profile.no_lm``) it has no LM: rows are gathered to ``device`` for the
    surrogate + VQ loss. ``ProfileModel`` adds the frozen LM (rows then go to the LM's device)."""

    def __init__(
        self, table: SoftTokenTable, prompt_config: PromptConfig, device: str | torch.device | None = None
    ):
        super().__init__()
        self.table = table
        self.prompt_config = prompt_config
        self._device = torch.device(device) if device is not None else None

    @property
    def device(self) -> torch.device:
        """Where a training step runs: the table's device unless given."""
        return self._device if self._device is not None else self.table.weight.device

    def gather_rows(self, user_ids: torch.Tensor) -> torch.Tensor:
        """(B, S, D) fp32 soft tokens of ``user_ids``, moved to ``device`` (no grad)."""
        rows = self.table.weight[user_ids.to(self.table.weight.device, non_blocking=True)]
        return rows.to(self.device, non_blocking=True)

    def profile_embeds_from(self, soft_embeds: torch.Tensor) -> torch.Tensor:
        """(B, S, D) soft tokens -> (B, P, D): mean over each profile's soft tokens (differentiable)."""
        return profile_means(soft_embeds, self.prompt_config)

    @torch.no_grad()
    def profile_embeds(self, user_ids: torch.Tensor) -> torch.Tensor:
        """(B, P, D) fp32 profile vectors of ``user_ids`` from the table (on the table's device)."""
        rows = self.table.weight[user_ids.to(self.table.weight.device)]
        return self.profile_embeds_from(rows)


class ProfileModel(SoftTokenModel):
    """Frozen LM + soft-token table. ``forward`` returns summed target-token NLL and the token count."""

    def __init__(self, lm: PreTrainedModel, table: SoftTokenTable, prompt_config: PromptConfig):
        if any(p.requires_grad for p in lm.parameters()):
            raise ValueError("ProfileModel expects a frozen LM (use userip.profile.lm.freeze)")
        super().__init__(table, prompt_config)
        self.lm = lm
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations.

        Memory math for a Llama-2-7B shape (32 layers, D 4096, MLP 11008, vocab 32000) in bf16 at batch
        64 x 256 (T = 16,384 tokens): the weights take 13.5 GB. Without checkpointing autograd keeps, per
        layer and token, what the input-gradient backward needs (norm inputs and their fp32 upcasts, q/k/v,
        attention output, gate/up/act/product): measured (bench/bench_activation_memory.py) at the 7B's ratio,
        16.1 D bf16 values (132 kB), ~2 D of them attention probabilities that the GPU's memory-efficient
        attention does not keep: ~115 kB x 32 layers x T = 60 GB, + 13.5 GB weights + ~6 GB for the target
        logits (bf16, fp32 upcast and gradient) = ~80 GB: no room on an 80 GB card. With checkpointing only
        each layer's input stays (D values, 8 kB per token and layer: 4.3 GB) plus one layer's activations
        during its recompute (~1.9 GB) and the logits: ~26 GB in all. The cost is one more forward per step
        (6 P T instead of 4 P T FLOPs). Frozen weights never get gradients.
        Results do not change (``tests/profile/test_step_device.py`` checks loss and gradients).
        """
        self.activation_checkpointing = enabled
        for module in self.lm.modules():
            if not isinstance(module, GradientCheckpointingLayer):
                continue
            if enabled and "forward" not in vars(module):
                module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))
            elif not enabled and "forward" in vars(module):
                del module.forward

    @property
    def lm_device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def device(self) -> torch.device:
        """Rows go to the LM's device (``gather_rows``)."""
        return self.lm_device

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def embed_inputs(self, batch: PromptBatch, soft_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) input embeddings in the LM dtype with the soft tokens spliced into their slots."""
        if soft_embeds is None:
            soft_embeds = self.gather_rows(batch.user_ids)
        input_embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, L, D), no grad (frozen)
        slot_mask = batch.soft_slot_ids >= 0  # (B, L)
        slot_index = batch.soft_slot_ids.clamp(min=0)[..., None].expand(-1, -1, soft_embeds.shape[-1])
        spliced = soft_embeds.to(input_embeds.dtype).gather(1, slot_index)  # (B, L, D)
        return torch.where(slot_mask[..., None], spliced, input_embeds)

    def forward(
        self, batch: PromptBatch, soft_embeds: torch.Tensor | None = None, per_example: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LM loss on target tokens only.

        ``batch`` must already be on the LM's device with the mask in the LM's dtype.
        ``soft_embeds`` (B, S, D): the batch rows' soft tokens (a differentiable leaf during training);
        default:
        gathered from the table. Returns (summed NLL, number of target tokens): scalars, or (B,) each when
        ``per_example``.
        """
        input_embeds = self.embed_inputs(batch, soft_embeds)
        labels = batch.labels  # (B, L)
        # Host-side counts from collate: no device-to-host read (a GPU step never waits here).
        if batch.num_target_tokens == 0:
            raise ValueError("batch has no target tokens")
        # Only positions that predict a target token need logits: skip the template prefix (vocab matmul).
        first_target = batch.first_target
        L = labels.shape[1]
        keep = L - first_target + 1
        out = self.lm(
            inputs_embeds=input_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = out.logits[:, :-1]  # (B, keep-1, V): positions first_target-1 .. L-2
        target = labels[:, first_target:]  # (B, keep-1)
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(target.shape)  # (B, keep-1); 0 where ignored
        counts = (target != IGNORE_INDEX).sum(1)
        if per_example:
            return nll.sum(1), counts
        return nll.sum(), counts.sum()


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)``, its activations recomputed in the backward pass (when grad is on).

    Not transformers' own switch: that one works in training mode only, which would turn dropout on in the
    frozen LM. ``preserve_rng_state=False``: an eval-mode layer draws no random numbers (and saving the CUDA
    RNG state each call costs time)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def profile_means(soft_embeds: torch.Tensor, prompt_config: PromptConfig) -> torch.Tensor:
    """(B, S, D) soft tokens (slots in profile order) -> (B, P, D): each profile's mean soft token."""
    sizes = [spec.num_soft_tokens for spec in prompt_config.profiles]
    return torch.stack([chunk.mean(dim=1) for chunk in soft_embeds.split(sizes, dim=1)], dim=1)
