"""The offline default LLM: a small causal LM built from a config, pre-trained briefly on the dataset's own
texts, cached, and then used *frozen* for profile inference.

Why: no weights can be downloaded here, and soft tokens fit under a frozen *random* LM barely lower the loss
and mean nothing (DESIGN.md, "Signal without pretrained weights"). What a real LLM brings to UserIP-Tuning is
world knowledge linking profile words ("sports", "budget") to behaviour (the titles a sporty, thrifty user
buys). The offline LM learns exactly that link from the dataset itself: it is pre-trained on the UserIP
prompt with each user's *derived* profile words (the dataset layer's hints: favourite category, price level)
written as real words in the soft-token slots, under the same profile-isolating mask, predicting the user's
training-split title history. Frozen afterwards, it gives fresh soft tokens (fit without hints) a space in
which a user's behaviour is best explained by a point near the right profile word.

Only the training split is used (targets and hints both come from it), so nothing leaks from valid/test.

Artifacts are ordinary Hugging Face folders (``save_pretrained`` of model and tokenizer, plus
``userip_lm.json``), so every consumer loads them with ``AutoModelForCausalLM.from_pretrained(path)`` like any
hub model. They are cached under a key made of the dataset's content hash and a hash of the configs, written
into a temporary folder and renamed into place, so a crash never leaves a half-written model behind. The
manifest records every file's SHA-256; a cached folder whose files no longer match (or that records none) is
rebuilt, never reused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from userip.data.schema import Dataset
from userip.lm.offline_config import (
    OFFLINE_SPEC,
    RANDOM_SPEC,
    Architecture,
    OfflineLMConfig,
    SlotHintMode,
)
from userip.lm.pretrain import PretrainResult, build_model, build_model_config, pretrain_model
from userip.lm.texts import (
    build_dataset_tokenizer,
    pretraining_examples,
    short_target_example,
    slot_words_per_user,
    tokenizer_texts,
)
from userip.prompts import PromptBuilder, PromptConfig
from userip.prompts.template import HistoryFeedback
from userip.utils.artifacts import folder_hashes, verify_folder
from userip.utils.config import to_dict
from userip.utils.io import atomic_dir, atomic_write_json, user_cache_dir
from userip.utils.run_layout import RunLayout
from userip.utils.seed import seed_everything

# The offline LM is split by concern: its config (offline_config), texts and examples (texts), model and
# pre-training loop (pretrain), the --lm resolver (resolve, which builds on this cache: it imports this
# module, never the other way round); this module is the cache. Its parts' names stay importable from here.
__all__ = [
    "FORMAT_VERSION",
    "LM_MANIFEST",
    "OFFLINE_SPEC",
    "RANDOM_SPEC",
    "Architecture",
    "OfflineLMConfig",
    "PretrainResult",
    "SlotHintMode",
    "build_dataset_tokenizer",
    "build_model",
    "build_model_config",
    "cache_key",
    "default_cache_dir",
    "is_complete_artifact",
    "load_or_build_random",
    "load_or_pretrain",
    "pretrain_model",
    "pretrain_offline_lm",
    "pretraining_examples",
    "read_lm_manifest",
    "short_target_example",
    "slot_words_per_user",
    "tokenizer_texts",
    "verify_artifact",
]

log = logging.getLogger(__name__)


FORMAT_VERSION = 1
LM_MANIFEST = "userip_lm.json"  # written last inside the folder; its presence marks a complete artifact


def default_cache_dir(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """``RUN/lm`` inside a run; otherwise ``$USERIP_CACHE_DIR/lm`` (default ``~/.cache/userip/lm``)."""
    if run_dir is not None:
        return RunLayout(run_dir).lm
    return user_cache_dir("lm")


def _prompt_key_fields(prompt_config: PromptConfig) -> dict[str, Any]:
    """The prompt settings that change pre-training (codebook sizes do not).

    Without history feedback its settings change nothing, so they are left out: such keys stay those of
    configs written before the option existed, and the feedback words do not split the cache.
    """
    fields = to_dict(prompt_config)
    for profile in fields["profiles"]:
        profile.pop("codebook_size", None)
    if prompt_config.history_feedback is HistoryFeedback.NONE:
        for key in ("history_feedback", "liked_word", "disliked_word", "max_rating"):
            fields.pop(key, None)
    return fields


def cache_key(dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig, kind: str) -> str:
    """Folder name: ``<kind>-<dataset content hash>-<hash of configs>``."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "lm": to_dict(config),
        "prompt": _prompt_key_fields(prompt_config),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{kind}-{dataset.content_hash}-{digest}"


def is_complete_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / LM_MANIFEST).is_file()


def verify_artifact(path: str | os.PathLike[str]) -> list[str]:
    """What is wrong with a cached LM folder (empty: its files match the SHA-256s its manifest recorded)."""
    try:
        manifest = read_lm_manifest(path)
    except (OSError, ValueError) as e:
        return [f"{LM_MANIFEST} unreadable ({e})"]
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        return [f"{LM_MANIFEST} records no file hashes (written before verification existed)"]
    return verify_folder(path, recorded)


def _reusable(path: Path, what: str) -> bool:
    if not is_complete_artifact(path):
        return False
    problems = verify_artifact(path)
    if problems:
        log.warning("%s cache %s failed verification (%s); rebuilding it", what, path, "; ".join(problems))
        return False
    return True


def read_lm_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``userip_lm.json`` of a cached offline/random LM folder."""
    return json.loads((Path(path) / LM_MANIFEST).read_text(encoding="utf-8"))


def _save_atomically(
    final: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, manifest: dict[str, Any]
) -> Path:
    """Save into a temporary sibling folder (manifest last), then move it into place."""
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = folder_hashes(tmp, exclude=(LM_MANIFEST,))
        atomic_write_json(tmp / LM_MANIFEST, {**manifest, "files": files})
    return final


def _manifest(
    kind: str, dataset: Dataset, prompt_config: PromptConfig, config: OfflineLMConfig, model: PreTrainedModel
) -> dict[str, Any]:
    import transformers

    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset_content_hash": dataset.content_hash,
        "dataset_source": dataset.source,
        "lm_config": to_dict(config),
        "prompt_config": to_dict(prompt_config),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def pretrain_offline_lm(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Build tokenizer and LM, pre-train on the train split with hint words in the slots, save; return path.

    Always trains (and replaces any cached artifact with the same key); use ``load_or_pretrain`` to reuse one.
    """
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    final = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, OFFLINE_SPEC)
    seed_everything(config.seed)
    tokenizer = build_dataset_tokenizer(dataset, prompt_config, config)
    builder = PromptBuilder(tokenizer, prompt_config)
    prompt_examples, plain_examples = pretraining_examples(dataset, builder, config)
    model = build_model(config, tokenizer)
    log.info(
        "pre-training the offline LM (%s, hidden %d, %d layers, vocab %d, %d parameters) on %d users' "
        "prompts (+%d plain titles available) of dataset %s",
        config.architecture.value, config.hidden_size, config.num_layers, len(tokenizer),
        sum(p.numel() for p in model.parameters()), len(prompt_examples), len(plain_examples),
        dataset.content_hash,
    )  # fmt: skip
    result = pretrain_model(model, prompt_examples, plain_examples, builder, config, progress=progress)
    log.info(
        "offline LM pre-trained: loss %.3f -> %.3f in %d steps, %.1f s",
        result.initial_loss, result.final_loss, result.steps, result.wall_seconds,
    )  # fmt: skip
    manifest = _manifest(OFFLINE_SPEC, dataset, prompt_config, config, model)
    manifest["pretraining"] = dataclasses.asdict(result)
    return _save_atomically(final, model, tokenizer, manifest)


def load_or_pretrain(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The cached offline LM for (dataset, configs) if complete, else pre-train and cache it."""
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    path = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, OFFLINE_SPEC)
    if _reusable(path, "offline LM"):
        log.info("offline LM: reusing %s (verified)", path)
        return path
    return pretrain_offline_lm(dataset, prompt_config, config, cache_dir=path.parent, progress=progress)


def load_or_build_random(
    dataset: Dataset,
    prompt_config: PromptConfig | None = None,
    config: OfflineLMConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The ablation LM: the offline LM's tokenizer and architecture, seeded random weights, never trained."""
    prompt_config = prompt_config or PromptConfig()
    config = config or OfflineLMConfig()
    path = Path(cache_dir or default_cache_dir()) / cache_key(dataset, prompt_config, config, RANDOM_SPEC)
    if _reusable(path, "random LM"):
        return path
    tokenizer = build_dataset_tokenizer(dataset, prompt_config, config)
    model = build_model(config, tokenizer)
    log.info("random LM (untrained, seed %d) saved for the ablation: %s", config.seed, path)
    return _save_atomically(
        path, model, tokenizer, _manifest(RANDOM_SPEC, dataset, prompt_config, config, model)
    )
