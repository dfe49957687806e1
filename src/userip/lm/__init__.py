"""The offline default LLM: a small causal LM built from a config, pre-trained on the dataset's own texts with
the users' derived profile words in the soft-token slots, cached, and used frozen for profile inference.

Public API::

    tokenizer = build_tokenizer(texts, vocab_size, required_texts=..., model="word")  # HF fast tokenizer
    config = OfflineLMConfig(hidden_size=64, num_layers=2, num_heads=4, ...)
    path = load_or_pretrain(dataset, prompt_config, config, cache_dir)  # cached HF folder: model + tokenizer
    path = pretrain_offline_lm(dataset, prompt_config, config, cache_dir)  # always trains
    path = load_or_build_random(dataset, prompt_config, config, cache_dir)  # same shape, untrained (ablation)
    name_or_path = resolve_lm("offline" | "random" | folder | hub id, dataset, run_dir)

Modules: ``offline_config`` (OfflineLMConfig), ``texts`` (tokenizer corpus, slot words, pre-training
examples), ``pretrain`` (model and training loop), ``offline`` (the cache; re-exports the others' names),
``resolve`` (``--lm`` values), ``tokenizer``, ``gguf``.
"""

from userip.lm.offline import (
    Architecture,
    OfflineLMConfig,
    PretrainResult,
    SlotHintMode,
    build_dataset_tokenizer,
    build_model,
    build_model_config,
    cache_key,
    default_cache_dir,
    is_complete_artifact,
    load_or_build_random,
    load_or_pretrain,
    pretrain_offline_lm,
    read_lm_manifest,
)
from userip.lm.resolve import resolve_lm
from userip.lm.tokenizer import TokenizerModel, build_tokenizer, unknown_words

__all__ = [
    "Architecture",
    "OfflineLMConfig",
    "PretrainResult",
    "SlotHintMode",
    "TokenizerModel",
    "build_dataset_tokenizer",
    "build_model",
    "build_model_config",
    "build_tokenizer",
    "cache_key",
    "default_cache_dir",
    "is_complete_artifact",
    "load_or_build_random",
    "load_or_pretrain",
    "pretrain_offline_lm",
    "read_lm_manifest",
    "resolve_lm",
    "unknown_words",
]
