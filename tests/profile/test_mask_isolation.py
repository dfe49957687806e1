"""DESIGN.md item 2 on real transformer stacks: p's soft-token state depends on BOS + p's phrase only."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from userip.profile.lm import load_causal_lm
from userip.profile.model import ProfileModel, SoftTokenTable
from userip.prompts import ProfileSpec, PromptBuilder, PromptConfig, TokenKind, collate

from .conftest import STORIES, gpt2_config, llama_config, make_word_tokenizer

PROFILES = (ProfileSpec("hobby", "this user's hobby is", 2), ProfileSpec("bg", ", his background is", 1))


def _hidden(model: ProfileModel, builder: PromptBuilder, examples, soft):
    batch = collate(examples, builder.pad_token_id)
    embeds = model.embed_inputs(batch, soft)
    out = model.lm(
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    return torch.stack(out.hidden_states), batch  # (layers+1, B, L, D)


def _check_isolation(lm, tokenizer, phrases):
    torch.manual_seed(0)
    profiles = tuple(ProfileSpec(n, ph, k) for (n, k), ph in zip((("hobby", 2), ("bg", 1)), phrases))
    builder = PromptBuilder(tokenizer, PromptConfig(profiles=profiles))
    D = lm.get_input_embeddings().weight.shape[1]
    model = ProfileModel(lm, SoftTokenTable(1, 3, D), builder.config)
    base = builder.build(" heat , casino", 0)
    soft = torch.randn(1, 3, D)
    h0, batch = _hidden(model, builder, [base], soft)
    kinds, prof = batch.token_kinds[0], base.profile_index
    for p in (0, 1):
        soft_pos = torch.nonzero((kinds == TokenKind.SOFT) & torch.as_tensor(prof == p)).flatten()
        outside = torch.nonzero(
            torch.as_tensor(prof != p) & (kinds != TokenKind.BOS) & (kinds != TokenKind.SOFT)
        )
        outside = outside.flatten().tolist()
        variants = []
        for pos in outside:  # change one token outside p's phrase per variant; all variants in one batch
            ex = builder.build(" heat , casino", 0)
            ex.input_ids[pos] = (ex.input_ids[pos] + 7) % len(tokenizer)
            variants.append(ex)
        h1, _ = _hidden(model, builder, variants, soft.expand(len(variants), -1, -1))
        for row, pos in enumerate(outside):
            assert torch.allclose(h1[:, row, soft_pos], h0[:, 0, soft_pos], atol=1e-6, rtol=0), (p, pos)
            assert not torch.allclose(h1[-1, row, pos], h0[-1, 0, pos])  # the change itself is visible
        other = soft.clone()  # the other profile's soft token changes
        other[0, [s for s in range(3) if (s < 2) != (p == 0)]] += 1.0
        h2, _ = _hidden(model, builder, [base], other)
        assert torch.equal(h2[:, 0, soft_pos], h0[:, 0, soft_pos])
    target_pos = torch.nonzero(kinds == TokenKind.TARGET).flatten()
    for slot in range(3):  # every target token sees every soft token
        moved = soft.clone()
        moved[0, slot] += 1.0
        h3, _ = _hidden(model, builder, [base], moved)
        diff = (h3[-1, 0, target_pos] - h0[-1, 0, target_pos]).abs().amax(-1)
        assert (diff > 0).all(), slot


@pytest.mark.parametrize("make_config", [gpt2_config, llama_config], ids=["gpt2", "llama"])
@pytest.mark.parametrize("with_bos", [True, False])
def test_mask_isolation_config_models(make_config, with_bos):
    tok = make_word_tokenizer(with_bos)
    torch.manual_seed(0)
    lm = load_causal_lm(make_config(len(tok)), attn_implementation="eager")
    _check_isolation(lm, tok, ("this user's hobby is", ", his background is"))


def test_mask_isolation_sdpa_llama():
    tok = make_word_tokenizer(True)
    torch.manual_seed(0)
    lm = load_causal_lm(llama_config(len(tok)), attn_implementation="sdpa")
    _check_isolation(lm, tok, ("this user's hobby is", ", his background is"))


def test_mask_isolation_stories260k():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found (shared models folder absent)")
    tok = AutoTokenizer.from_pretrained(STORIES)
    lm = load_causal_lm(STORIES)
    _check_isolation(lm, tok, ("This user's hobby is", ", his background is"))
