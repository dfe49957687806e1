"""Fig. 7 attention: checked against attention probabilities computed by hand on a one-layer GPT-2."""

import numpy as np
import pytest
import torch
from tests.prompts.conftest import make_word_tokenizer
from transformers import GPT2Config

from userip.evaluation.attention import attention_to_profiles, minmax_rows
from userip.profile.lm import load_causal_lm
from userip.prompts import PromptBuilder, PromptConfig, TokenKind, collate

SENTENCE = "great movie , toy story"


@pytest.fixture
def setup():
    torch.manual_seed(0)
    tokenizer = make_word_tokenizer(with_bos=True)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=1, n_positions=64)
    lm = load_causal_lm(config, dtype="fp32", device="cpu", attn_implementation="eager")
    builder = PromptBuilder(tokenizer, PromptConfig())
    soft = torch.randn(3, builder.config.num_slots, 16)
    return lm, builder, soft


def test_matches_hand_computed_attention(setup):
    lm, builder, soft = setup
    sentence_ids = builder.encode(SENTENCE)
    weights = attention_to_profiles(lm, builder, soft, sentence_ids)  # (N, P, T)
    assert weights.shape == (3, 2, len(sentence_ids))

    # One layer, one head: softmax((q k^T) / sqrt(d) + mask) from GPT-2's own weights, for user 1.
    batch = collate([builder.build_from_ids(sentence_ids)], builder.pad_token_id)
    ids, slots = batch.input_ids[0], batch.soft_slot_ids[0]
    with torch.no_grad():
        x = lm.transformer.wte(ids)
        x[slots >= 0] = soft[1][slots[slots >= 0]]
        x = lm.transformer.h[0].ln_1(x + lm.transformer.wpe(batch.position_ids[0]))
        q, k, _ = lm.transformer.h[0].attn.c_attn(x).split(16, dim=-1)
        probs = torch.softmax(q @ k.T / 4.0 + batch.attention_mask[0, 0], dim=-1)  # (L, L)
    targets = torch.nonzero(batch.token_kinds[0] == TokenKind.TARGET).squeeze(1)
    for p, offset in enumerate(builder.slot_offsets):
        keys = torch.nonzero((slots >= offset) & (slots < offset + 1)).squeeze(1)  # 1 soft token each
        expected = probs[targets][:, keys].sum(-1).numpy()
        np.testing.assert_allclose(weights[1, p], expected, rtol=1e-5, atol=1e-6)


def test_each_user_row_depends_on_that_user_only(setup):
    lm, builder, soft = setup
    sentence_ids = builder.encode(SENTENCE)
    batched = attention_to_profiles(lm, builder, soft, sentence_ids)
    alone = attention_to_profiles(lm, builder, soft[2:], sentence_ids)
    np.testing.assert_allclose(batched[2], alone[0], rtol=1e-5, atol=1e-7)
    changed = soft.clone()
    changed[0] = torch.randn_like(changed[0]) * 3  # not a constant shift: LayerNorm would remove it
    moved = attention_to_profiles(lm, builder, changed, sentence_ids)
    assert not np.allclose(moved[0], batched[0])
    np.testing.assert_allclose(moved[1:], batched[1:], rtol=1e-5, atol=1e-7)


def test_sdpa_lm_is_refused_with_a_clear_error(setup):
    _, builder, soft = setup
    config = GPT2Config(vocab_size=len(builder.tokenizer), n_embd=16, n_layer=1, n_head=1, n_positions=64)
    lm = load_causal_lm(config, dtype="fp32", device="cpu", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager"):
        attention_to_profiles(lm, builder, soft, builder.encode(SENTENCE))


def test_minmax_rows():
    values = np.array([[[2.0, 4.0, 3.0]], [[5.0, 5.0, 5.0]]])
    np.testing.assert_allclose(minmax_rows(values), [[[0.0, 1.0, 0.5]], [[0.0, 0.0, 0.0]]])
