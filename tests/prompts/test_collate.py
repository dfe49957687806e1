from __future__ import annotations

import itertools

import numpy as np
import torch

from userip.prompts import IGNORE_INDEX, ProfileSpec, PromptBuilder, PromptConfig, TokenKind, collate


def reference_allowed(kinds, prof, q, k, template_sees_soft):
    """Plain-Python restatement of DESIGN.md item 2, one (query, key) pair at a time."""
    K = TokenKind
    if kinds[q] == K.PAD:
        return q == k
    if k > q or kinds[k] == K.PAD:
        return False
    if kinds[q] == K.BOS:
        return kinds[k] == K.BOS
    if kinds[q] in (K.PHRASE, K.SOFT):
        return kinds[k] == K.BOS or prof[k] == prof[q]
    if kinds[q] == K.TASK and kinds[k] == K.SOFT:
        return template_sees_soft
    return True


def _builder(tok):
    cfg = PromptConfig(
        profiles=(
            ProfileSpec("hobby", "this user's hobby is", 2),
            ProfileSpec("bg", ", his background is", 1),
        )
    )
    return PromptBuilder(tok, cfg)


def test_mask_matches_reference(word_tokenizer):
    b = _builder(word_tokenizer)
    exs = [b.build("toy story , heat , casino", 0), b.build("heat", 1)]
    for sees in (True, False):
        batch = collate(exs, b.pad_token_id, template_sees_soft_tokens=sees)
        B, _, L, _ = batch.attention_mask.shape
        assert batch.attention_mask.dtype == torch.float32
        for r, e in enumerate(exs):
            kinds = np.zeros(L, dtype=np.int8)
            prof = np.full(L, -1)
            kinds[: len(e)] = e.token_kinds
            prof[: len(e)] = e.profile_index
            for q, k in itertools.product(range(L), range(L)):
                want = reference_allowed(kinds, prof, q, k, sees)
                got = batch.attention_mask[r, 0, q, k].item() == 0
                assert got == want, (sees, r, q, k)
        # every row has at least one allowed key (no all -inf rows -> no NaN)
        assert ((batch.attention_mask == 0).any(-1)).all()


def test_padding_positions_labels(word_tokenizer):
    b = _builder(word_tokenizer)
    long, short = b.build("toy story , heat , casino", 3), b.build("heat", 4)
    batch = collate([long, short], b.pad_token_id, mask_dtype=torch.bfloat16, pad_to_multiple_of=8)
    L = batch.input_ids.shape[1]
    assert L % 8 == 0 and len(long) <= L
    assert batch.attention_mask.dtype == torch.bfloat16
    n = len(short)
    assert batch.position_ids[1, :n].tolist() == list(range(n))
    assert (batch.labels[1, n:] == IGNORE_INDEX).all()
    assert (batch.token_kinds[1, n:] == TokenKind.PAD).all()
    assert (batch.input_ids[1, n:] == b.pad_token_id).all()
    # padded keys are never attended by real queries
    assert (batch.attention_mask[1, 0, :n, n:] != 0).all()
    assert batch.user_ids.tolist() == [3, 4]
    assert batch.num_target_tokens == (long.labels != IGNORE_INDEX).sum() + 1
    moved = batch.to("cpu", mask_dtype=torch.float32)
    assert torch.equal(moved.attention_mask == 0, batch.attention_mask == 0)
    assert moved.attention_mask.min().item() == torch.finfo(torch.float32).min
