"""The offline LM itself: a Llama or GPT-2 causal LM of the configured shape, and its pre-training loop
(AdamW, warmup + cosine, short-target windows drawn each epoch)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence

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

from userip.lm.offline_config import Architecture, OfflineLMConfig
from userip.lm.texts import short_target_example
from userip.prompts import (
    PromptBuilder,
    PromptExample,
    collate,
)
from userip.utils.config import ConfigError
from userip.utils.threads import set_intra_op_threads

log = logging.getLogger(__name__)


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


def embedding_init_std(config: OfflineLMConfig) -> float:
    """The std of the normal the offline LM's embeddings start from (its HF config's ``initializer_range``;
    0.02 for both architectures): the scale of the no-LM mode's soft tokens, which have no LM to start from.
    """
    config_class = LlamaConfig if config.architecture is Architecture.LLAMA else GPT2Config
    return float(config_class().initializer_range)


def build_model(config: OfflineLMConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A freshly initialised (seeded) causal LM of the configured shape."""
    torch.manual_seed(config.seed)
    model_config = build_model_config(config, tokenizer)
    model_cls = LlamaForCausalLM if config.architecture is Architecture.LLAMA else GPT2LMHeadModel
    return model_cls(model_config)


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
    lengths = [len(e) for e in [*prompt_examples, *plain_examples]]
    longest = max(lengths)
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

    flops_per_step = (
        6.0 * sum(p.numel() for p in model.parameters()) * float(np.mean(lengths)) * config.batch_size
    )
    set_intra_op_threads(None, flops_per_step, "offline LM pre-training")
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
