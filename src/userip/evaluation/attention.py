"""Explainability (paper 3.8, Fig. 7): how much a sentence's tokens attend to a user's profile soft tokens,
before and after tuning.

The paper reads Fig. 7 as a denoising story: with randomly initialised profile vectors the tokens of an
inferred sentence ("The user likes Gotham stealth shooting action games") attend mostly to template text
("The user"); after tuning, the content words attend to the profile. Here a sentence is put in the target
slot of the usual prompt (same template, same profile-isolating mask), the frozen LM runs with eager attention
so it returns its attention maps, and for every sentence token we take the attention mass on each profile's
soft-token slots, averaged over layers and heads. Each user's row is then scaled to [0, 1] over the sentence
tokens, as the paper normalises its heat maps. "Before" is the soft-token table as the profile stage
initialised it (same init rule and seed); "after" is the trained table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from userip.profile.model import ProfileModel, SoftTokenTable, initial_soft_token_table
from userip.prompts import PromptBuilder, TokenKind, collate
from userip.utils.run_layout import RunLayout


@dataclasses.dataclass
class ProfileAttention:
    """Attention of a sentence's tokens to each profile's soft tokens, for a group of users."""

    tokens: list[str]  # (T,) the sentence's tokens as the LM's tokenizer splits them
    profile_names: list[str]  # (P,)
    raw_user_ids: list[str]  # (N,)
    before: np.ndarray  # (N, P, T) in [0, 1] per (user, profile) row: soft tokens at initialisation
    after: np.ndarray  # (N, P, T) the same with the trained soft tokens


@torch.no_grad()
def attention_to_profiles(
    lm: PreTrainedModel, builder: PromptBuilder, soft_embeds: torch.Tensor, sentence_ids: Sequence[int]
) -> np.ndarray:
    """Raw attention mass from each sentence token to each profile's soft slots.

    lm: a frozen causal LM whose attention implementation returns weights ("eager").
    soft_embeds (N, S, D): the users' soft tokens. Returns (N, P, T): for user n, profile p and sentence
    token t, the attention weight from t to p's slots (summed over the slots), averaged over layers and heads.
    """
    if not sentence_ids:
        raise ValueError("the sentence tokenizes to nothing")
    config = builder.config
    num_users = soft_embeds.shape[0]
    examples = [builder.build_from_ids(sentence_ids, user_id=n) for n in range(num_users)]
    batch = collate(examples, builder.pad_token_id).to(lm.device, mask_dtype=lm.dtype)
    table = SoftTokenTable(num_users, config.num_slots, soft_embeds.shape[-1])
    inputs_embeds = ProfileModel(lm, table, config).embed_inputs(batch, soft_embeds.to(lm.device))
    out = lm(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_attentions=True,
        use_cache=False,
    )
    if not out.attentions or out.attentions[0] is None:
        raise ValueError("the LM returned no attention weights; load it with attn_implementation='eager'")
    weights = torch.stack(out.attentions).float().mean(dim=(0, 2))  # (N, L, L): layers and heads averaged
    kinds = batch.token_kinds[0]  # every example shares the template, so one row's layout serves all
    target_pos = torch.nonzero(kinds == TokenKind.TARGET).squeeze(1)  # (T,)
    slot_ids = batch.soft_slot_ids[0]
    per_profile = []
    for p, offset in enumerate(builder.slot_offsets):
        slot_range = (slot_ids >= offset) & (slot_ids < offset + config.profiles[p].num_soft_tokens)
        key_pos = torch.nonzero(slot_range).squeeze(1)
        per_profile.append(weights[:, target_pos][:, :, key_pos].sum(-1))  # (N, T)
    return torch.stack(per_profile, dim=1).cpu().numpy()  # (N, P, T)


def minmax_rows(values: np.ndarray) -> np.ndarray:
    """Scale the last axis of every row to [0, 1] (a constant row becomes 0)."""
    low = values.min(axis=-1, keepdims=True)
    span = values.max(axis=-1, keepdims=True) - low
    return np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), 0.0)


def explain_attention(
    run_dir: str | Path,
    sentence: str | None = None,
    raw_user_ids: Sequence[str] | None = None,
    limit: int = 7,
) -> ProfileAttention:
    """Fig. 7 for users of a finished ``userip profile`` run (default: the first ``limit`` trained users;
    default sentence: the title of the training split's most-interacted item)."""
    from userip.evaluation.explain import select_users
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.recipe import load_soft_tokens
    from userip.profile.stage import reopen_profile

    run_dir = Path(run_dir)
    finished = reopen_profile(run_dir)
    dataset, config, lm_path = finished.dataset, finished.config, finished.lm_path
    soft_tokens, trained, manifest = load_soft_tokens(RunLayout(run_dir).profile)
    user_ids = select_users(dataset, trained, raw_user_ids, limit, run_dir)
    lm = load_causal_lm(lm_path, attn_implementation="eager")
    builder = PromptBuilder(load_tokenizer(lm_path), config.prompt)
    if sentence is None:
        train = dataset.split("train")
        top_item = int(train["item_id"].value_counts().idxmax())
        sentence = str(dataset.items.set_index("item_id").loc[top_item, "title"])
    sentence_ids = builder.encode(sentence)[: config.prompt.max_target_tokens]

    initial = initial_soft_token_table(
        soft_tokens.shape[0],
        lm.get_input_embeddings().weight,
        builder,
        config.soft_tokens,
        manifest.get("value_words", {}),
        config.train.seed,
    )
    index = torch.as_tensor(user_ids)
    before = attention_to_profiles(lm, builder, initial.weight[index], sentence_ids)
    after = attention_to_profiles(lm, builder, soft_tokens[index], sentence_ids)
    raw_of = dataset.users["raw_user_id"].astype(str).to_numpy()
    return ProfileAttention(
        tokens=[builder.tokenizer.decode([i]).strip() for i in sentence_ids],
        profile_names=[p.name for p in config.prompt.profiles],
        raw_user_ids=[raw_of[u] for u in user_ids],
        before=minmax_rows(before),
        after=minmax_rows(after),
    )
