"""Offline LM: config validation, pre-training lowers the loss, cache reuse and keys, HF reload, resolver."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from userip.lm import (
    OfflineLMConfig,
    build_dataset_tokenizer,
    cache_key,
    is_complete_artifact,
    load_or_build_random,
    load_or_pretrain,
    pretrain_offline_lm,
    read_lm_manifest,
    resolve_lm,
)
from userip.lm import offline as offline_module
from userip.lm.offline import pretraining_examples, short_target_example
from userip.prompts import PromptBuilder, PromptConfig, TokenKind, collate
from userip.utils.config import ConfigError, from_dict

from .conftest import make_toy_dataset, tiny_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"hidden_size": 12, "num_heads": 4}, "even head size"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"architecture": "bert"}, "architecture: 'bert' is not one of"),
        ({"slot_hint_mode": "truth"}, "slot_hint_mode"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"slot_hint_columns": {"hobby": 3}}, "slot_hint_columns"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(OfflineLMConfig, overrides)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(OfflineLMConfig, {"hidden": 64})


def test_pretraining_prompts_put_hint_words_in_the_slots(toy_dataset, prompt_config, tiny_lm_config):
    tokenizer = build_dataset_tokenizer(toy_dataset, prompt_config, tiny_lm_config)
    builder = PromptBuilder(tokenizer, prompt_config)
    prompts, plain = pretraining_examples(toy_dataset, builder, tiny_lm_config)
    assert len(prompts) == toy_dataset.num_users and plain == []
    example = prompts[0]
    hints = toy_dataset.hints.set_index("user_id").loc[example.user_id]
    slot_words = tokenizer.decode(example.input_ids[example.token_kinds == TokenKind.SOFT])
    assert slot_words == f"{hints.favourite_category} {hints.price_level}"
    assert (example.soft_slot_ids == -1).all()  # real words: nothing is spliced from a soft table
    # Only the training split's titles are targets (valid/test items of the user never appear).
    target = tokenizer.decode(example.labels[example.labels >= 0])
    inter = toy_dataset.interactions
    held_out = inter[(inter.user_id == example.user_id) & (inter.split != "train")]
    train = inter[(inter.user_id == example.user_id) & (inter.split == "train")]
    train_titles = set(toy_dataset.items.title[train.item_id])
    for title in set(toy_dataset.items.title[held_out.item_id]) - train_titles:
        assert title not in target


def test_short_target_windows_keep_the_template_and_whole_titles(toy_dataset, prompt_config, tiny_lm_config):
    tokenizer = build_dataset_tokenizer(toy_dataset, prompt_config, tiny_lm_config)
    builder = PromptBuilder(tokenizer, prompt_config)
    example = builder.build(
        "budget toys doll, luxury books atlas, budget toys robot", slot_texts={"hobby": "toys"}
    )
    rng = np.random.default_rng(0)
    windows = {tokenizer.decode(w.labels[w.labels >= 0]) for w in
               (short_target_example(example, builder.separator_ids, 2, rng) for _ in range(60))}  # fmt: skip
    titles = ["budget toys doll", "luxury books atlas", "budget toys robot"]
    expected = set(titles) | {" , ".join(titles[i : i + 2]) for i in range(2)}
    assert windows == expected
    short = short_target_example(example, builder.separator_ids, 1, rng)
    n = int((example.token_kinds != TokenKind.TARGET).sum())
    assert np.array_equal(short.input_ids[:n], example.input_ids[:n])
    assert (short.token_kinds[n:] == TokenKind.TARGET).all() and (short.labels[:n] == -100).all()


def test_plain_title_examples_are_bos_plus_title(toy_dataset, prompt_config, tiny_lm_config):
    config = dataclasses.replace(tiny_lm_config, plain_title_ratio=0.5)
    builder = PromptBuilder(build_dataset_tokenizer(toy_dataset, prompt_config, config), prompt_config)
    _, plain = pretraining_examples(toy_dataset, builder, config)
    assert plain and all(
        e.token_kinds[0] == TokenKind.BOS and (e.token_kinds[1:] == TokenKind.TARGET).all() for e in plain
    )


def test_pretraining_lowers_the_loss(pretrained_path, tiny_lm_config):
    record = read_lm_manifest(pretrained_path)["pretraining"]
    assert record["steps"] == tiny_lm_config.max_steps
    assert record["final_loss"] < record["initial_loss"] - 0.3
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]


def test_cache_is_reused_without_retraining(
    pretrained_path, toy_dataset, prompt_config, tiny_lm_config, monkeypatch
):
    mtime = os.stat(pretrained_path / "model.safetensors").st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("pre-trained again although the cache holds the artifact")

    monkeypatch.setattr(offline_module, "pretrain_model", fail)
    again = load_or_pretrain(
        toy_dataset, prompt_config, tiny_lm_config, pretrained_path.parent, progress=False
    )
    assert again == pretrained_path
    assert os.stat(again / "model.safetensors").st_mtime_ns == mtime
    assert sorted(p.name for p in pretrained_path.parent.iterdir()) == [
        pretrained_path.name
    ]  # no temp leftovers


def test_cache_key_depends_on_dataset_and_configs(toy_dataset, prompt_config, tiny_lm_config):
    key = cache_key(toy_dataset, prompt_config, tiny_lm_config, "offline")
    assert key.startswith(f"offline-{toy_dataset.content_hash}-")
    assert key == cache_key(
        toy_dataset, PromptConfig(max_target_tokens=32), dataclasses.replace(tiny_lm_config), "offline"
    )
    other_data = make_toy_dataset(seed=1)
    assert cache_key(other_data, prompt_config, tiny_lm_config, "offline") != key
    assert (
        cache_key(toy_dataset, prompt_config, dataclasses.replace(tiny_lm_config, seed=1), "offline") != key
    )
    assert cache_key(toy_dataset, PromptConfig(max_target_tokens=16), tiny_lm_config, "offline") != key
    assert cache_key(toy_dataset, prompt_config, tiny_lm_config, "random") != key


def test_incomplete_artifact_is_not_reused(tmp_path, toy_dataset, prompt_config):
    config = tiny_config(max_steps=2)
    folder = tmp_path / cache_key(toy_dataset, prompt_config, config, "offline")
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an interrupted write left no manifest
    assert not is_complete_artifact(folder)
    path = load_or_pretrain(toy_dataset, prompt_config, config, tmp_path, progress=False)
    assert path == folder and is_complete_artifact(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # replaced, no temp folders left


def test_reloaded_model_gives_identical_logits(pretrained, prompt_config):
    """What was trained is exactly what reloads with AutoModelForCausalLM / AutoTokenizer (prompt mask on)."""
    path, trained, trained_tokenizer = pretrained
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(reloaded, LlamaForCausalLM)
    text = "This user's hobby is books, luxury books atlas"
    assert tokenizer(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
    builder = PromptBuilder(tokenizer, prompt_config)
    batch = collate(
        [builder.build("luxury books atlas", slot_texts={"hobby": "books", "background": "luxury"}),
         builder.build("budget toys doll, budget toys robot")],
        builder.pad_token_id,
    )  # fmt: skip
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids}  # fmt: skip
    with torch.no_grad():
        logits = reloaded(**inputs).logits
        assert torch.equal(trained.eval()(**inputs).logits, logits)
    assert logits.shape[-1] == len(tokenizer) and np.isfinite(logits.numpy()).all()


def test_gpt2_architecture_builds_and_pretrains(tmp_path, toy_dataset, prompt_config):
    config = tiny_config(architecture="gpt2", max_steps=2)
    path = pretrain_offline_lm(toy_dataset, prompt_config, config, tmp_path, progress=False)
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), GPT2LMHeadModel)


def test_max_length_too_short_is_a_clear_error(tmp_path, toy_dataset, prompt_config, tiny_lm_config):
    config = dataclasses.replace(tiny_lm_config, max_length=20)
    with pytest.raises(ConfigError, match="max_length"):
        pretrain_offline_lm(toy_dataset, prompt_config, config, tmp_path, progress=False)


def test_hints_required_unless_mode_none(tmp_path, toy_dataset, prompt_config, tiny_lm_config):
    no_hints = dataclasses.replace(toy_dataset, hints=None)
    with pytest.raises(ConfigError, match="needs dataset.hints"):
        pretrain_offline_lm(no_hints, prompt_config, tiny_lm_config, tmp_path, progress=False)
    config = tiny_config(slot_hint_mode="none", max_steps=2)
    assert is_complete_artifact(
        pretrain_offline_lm(no_hints, prompt_config, config, tmp_path, progress=False)
    )


def test_resolve_lm_offline_random_and_pass_through(tmp_path, pretrained_path, toy_dataset, tiny_lm_config):
    prompt_config = PromptConfig(max_target_tokens=32)
    cache = pretrained_path.parent  # the offline LM is already there: resolved without training
    offline = resolve_lm(
        "offline",
        toy_dataset,
        prompt_config=prompt_config,
        config=tiny_lm_config,
        cache_dir=cache,
        progress=False,
    )
    assert offline == str(pretrained_path)
    random = resolve_lm(
        "random", toy_dataset, prompt_config=prompt_config, config=tiny_lm_config, cache_dir=cache
    )
    assert offline != random and read_lm_manifest(random)["kind"] == "random"
    assert random == str(load_or_build_random(toy_dataset, prompt_config, tiny_lm_config, cache))
    a = AutoModelForCausalLM.from_pretrained(offline).model.embed_tokens.weight
    b = AutoModelForCausalLM.from_pretrained(random).model.embed_tokens.weight
    assert a.shape == b.shape and not torch.equal(a, b)
    # A run directory puts the cache under RUN/lm.
    run_path = resolve_lm(
        "random", toy_dataset, run_dir=tmp_path / "run", prompt_config=prompt_config, config=tiny_lm_config
    )
    assert run_path.startswith(str(tmp_path / "run" / "lm"))
    # Folders and hub ids pass through unchanged.
    assert resolve_lm(offline) == offline
    assert resolve_lm("gpt2") == "gpt2"
    assert resolve_lm("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_resolve_lm_errors(tmp_path, toy_dataset):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        resolve_lm(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_lm(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="built from the dataset"):
        resolve_lm("offline")
    with pytest.raises(ConfigError, match="valid hub id"):
        resolve_lm("not a model!")
    with pytest.raises(ConfigError, match="expected 'offline'"):
        resolve_lm("  ")


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_embedding_init_std_is_the_built_models(architecture, toy_dataset, prompt_config, tiny_lm_config):
    """The no-LM mode starts its soft tokens at this scale: it must be what the offline LM's embeddings start
    from (measured on a freshly built model)."""
    from userip.lm import build_model
    from userip.lm.pretrain import embedding_init_std

    config = dataclasses.replace(tiny_lm_config, architecture=architecture)
    model = build_model(config, build_dataset_tokenizer(toy_dataset, prompt_config, config))
    measured = model.get_input_embeddings().weight.detach().std().item()
    assert embedding_init_std(config) == pytest.approx(measured, rel=0.05)
