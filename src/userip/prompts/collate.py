"""Collation: right-pad a list of ``PromptExample`` and build the profile-isolating 4D attention mask.

Mask rule (DESIGN.md item 2), for a query token q and key token k, both non-padding, k at or before q:

    q is BOS                      -> k is BOS
    q is PHRASE of profile p      -> k is BOS or in profile p's block (its own phrase, causally)
    q is SOFT of profile p        -> k is BOS or in profile p's block (phrase + earlier soft tokens of p)
    q is TASK                     -> any earlier k (optionally excluding SOFT keys: template_sees_soft_tokens)
    q is TARGET                   -> any earlier k

so the state of p's soft token depends on BOS and p's phrase alone, in every layer. Padding keys are never
attended; a padding query attends only to itself (a row of all -inf would give NaN). The result is an
*additive* float mask (0 allowed, dtype-min elsewhere) of shape (B, 1, L, L): a bool mask is silently wrong
under
eager attention in transformers 5 (see DESIGN.md, "Measured on this machine").

Example for one profile with phrase "hobby is" (2 tokens), 1 soft token, task ":" and target "a b"
(x = allowed)::

             BOS hobby is  z   :   a   b
    BOS       x
    hobby     x   x
    is        x   x    x
    z         x   x    x   x
    :         x   x    x   x   x
    a         x   x    x   x   x   x
    b         x   x    x   x   x   x   x
    (with two profiles, profile 1's rows have no x under profile 0's columns, and vice versa)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from userip.prompts.template import IGNORE_INDEX, PromptExample, TokenKind


@dataclasses.dataclass
class PromptBatch:
    """A padded batch. B = batch size, L = longest example."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, 1, L, L) float additive mask
    position_ids: torch.Tensor  # (B, L) int64, counting non-padding tokens only
    labels: torch.Tensor  # (B, L) int64, IGNORE_INDEX except target tokens
    soft_slot_ids: torch.Tensor  # (B, L) int64, flattened slot index where the soft table is spliced, else -1
    token_kinds: torch.Tensor  # (B, L) int8 TokenKind
    user_ids: torch.Tensor  # (B,) int64, on the host (the soft table's gather moves it where the table is)
    # Host-side facts counted from the collated arrays: reading them never waits on the device.
    num_tokens: int  # non-padding tokens
    num_target_tokens: int  # labelled tokens
    first_target: int  # first position that holds a label in any row (L when none does)

    def to(self, device: torch.device | str, mask_dtype: torch.dtype | None = None) -> PromptBatch:
        mask = self.attention_mask
        if mask_dtype is not None and mask.dtype != mask_dtype:
            # Re-derive the additive mask in the new dtype: dtype-min differs between fp32 and bf16.
            mask = torch.where(mask == 0, 0.0, torch.finfo(mask_dtype).min).to(mask_dtype)
        return PromptBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=mask.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            soft_slot_ids=self.soft_slot_ids.to(device, non_blocking=True),
            token_kinds=self.token_kinds.to(device, non_blocking=True),
            user_ids=self.user_ids,  # stays with the soft table
            num_tokens=self.num_tokens,
            num_target_tokens=self.num_target_tokens,
            first_target=self.first_target,
        )


def build_attention_mask(
    token_kinds: torch.Tensor,
    profile_index: torch.Tensor,
    template_sees_soft_tokens: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive (B, 1, L, L) mask from per-token kinds and profile indices, both (B, L). Vectorised."""
    B, L = token_kinds.shape
    q_kind = token_kinds[:, :, None]  # (B, L, 1) query axis
    k_kind = token_kinds[:, None, :]  # (B, 1, L) key axis
    q_prof = profile_index[:, :, None]
    k_prof = profile_index[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=token_kinds.device).tril()  # (L, L)

    k_bos = k_kind == TokenKind.BOS
    in_profile_block = (q_kind == TokenKind.PHRASE) | (q_kind == TokenKind.SOFT)
    profile_rule = in_profile_block & (k_bos | ((k_prof == q_prof) & (k_kind != TokenKind.PAD)))
    later_rule = (q_kind == TokenKind.TARGET) | (q_kind == TokenKind.TASK)
    later_rule = later_rule & (k_kind != TokenKind.PAD)
    if not template_sees_soft_tokens:
        later_rule = later_rule & ~((q_kind == TokenKind.TASK) & (k_kind == TokenKind.SOFT))
    bos_rule = (q_kind == TokenKind.BOS) & k_bos
    allowed = (profile_rule | later_rule | bos_rule) & causal  # (B, L, L)
    # Padding queries attend to themselves only, so no row is all -inf (softmax would give NaN).
    pad_query = (q_kind == TokenKind.PAD) & torch.eye(L, dtype=torch.bool, device=token_kinds.device)
    allowed = allowed | pad_query
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=token_kinds.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask


def collate(
    examples: Sequence[PromptExample],
    pad_token_id: int,
    template_sees_soft_tokens: bool = True,
    mask_dtype: torch.dtype = torch.float32,
    pad_to_multiple_of: int = 1,
    device: torch.device | str | None = None,
) -> PromptBatch:
    """Right-pad ``examples`` into a ``PromptBatch`` (padding to a multiple gives a few fixed shapes, which
    GPU kernels and their autotuning caches like).

    ``device``: where the tensors are built. The token arrays travel there in two non-blocking copies and the
    (B, 1, L, L) mask and the positions are computed there, so a GPU step neither moves the L^2 mask over
    PCIe nor waits for the device; the counts (``num_tokens``...) come from the host arrays.
    """
    if not examples:
        raise ValueError("collate: empty list of examples")
    B = len(examples)
    L = max(len(e) for e in examples)
    L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    # Two host arrays, one copy each: (3, B, L) int64 ids, slots, labels; (2, B, L) int8 kinds, profiles.
    wide = np.empty((3, B, L), dtype=np.int64)
    narrow = np.empty((2, B, L), dtype=np.int8)
    input_ids, slots, labels = wide
    kinds, prof = narrow
    input_ids.fill(pad_token_id)
    slots.fill(-1)
    labels.fill(IGNORE_INDEX)
    kinds.fill(TokenKind.PAD)
    prof.fill(-1)
    for b, e in enumerate(examples):
        n = len(e)
        input_ids[b, :n] = e.input_ids
        kinds[b, :n] = e.token_kinds
        prof[b, :n] = e.profile_index
        slots[b, :n] = e.soft_slot_ids
        labels[b, :n] = e.labels
    is_target = labels != IGNORE_INDEX  # (B, L)
    labelled = is_target.any(0)  # (L,)
    first_target = int(labelled.argmax())  # 0 when no position is labelled: then L below
    wide_t, narrow_t = torch.from_numpy(wide), torch.from_numpy(narrow)
    if device is not None:
        wide_t, narrow_t = wide_t.to(device, non_blocking=True), narrow_t.to(device, non_blocking=True)
    ids_t, slots_t, labels_t = wide_t.unbind()
    kinds_t, prof_t = narrow_t.unbind()
    not_pad = kinds_t != TokenKind.PAD
    # Right padding: real tokens are 0..n-1; padding gets position 0 (never attended, value irrelevant).
    position_ids = (not_pad.long().cumsum(1) - 1).clamp_(min=0) * not_pad
    return PromptBatch(
        input_ids=ids_t,
        attention_mask=build_attention_mask(kinds_t, prof_t, template_sees_soft_tokens, mask_dtype),
        position_ids=position_ids,
        labels=labels_t,
        soft_slot_ids=slots_t,
        token_kinds=kinds_t,
        user_ids=torch.tensor([e.user_id for e in examples], dtype=torch.int64),
        num_tokens=sum(len(e) for e in examples),  # an example holds no padding
        num_target_tokens=int(is_target.sum()),
        first_target=first_target if labelled[first_target] else L,
    )
