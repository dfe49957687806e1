"""Shared LLM plumbing for the LLM baselines (KAR, PEPLER, ReLLa): load a causal LM with its
tokenizer, fingerprint it, generate text through its chat template with a resumable on-disk cache, encode
texts as masked-mean final hidden states, standardise them on train statistics, and count what all of it cost.

Why these choices (``/work/shared/design/llm-baselines.md`` section 0):

* one LM does both jobs: no BERT weights are available offline, and the masked mean of the LM's final
  (post-norm) hidden states is what ReLLa and KAR's decoder-LLM option use;
* texts are encoded raw, without the chat template: its fixed system prompt would dominate the mean of short
  texts;
* decoder states have a few very large dimensions, so every dimension is standardised with statistics of the
  train rows only (nothing from valid/test shapes the features);
* a generation cache can leak labels if reused under another split, so its key holds the dataset's content
  hash (which covers the split column), the model's fingerprint (weights, dtype, tokenizer, chat template),
  the prompt version and the decoding settings; each record also stores its exact prompt and is reused only
  for an identical prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from userip.utils.config import ConfigError, check_fields
from userip.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_with, read_json
from userip.utils.logging import get_logger

log = get_logger(__name__)

CACHE_FORMAT_VERSION = 1
GENERATIONS_FILE = "generations.jsonl"  # one JSON record per line, appended per batch: resumable
CACHE_MANIFEST = "cache.json"  # what the key was made of, for a human reading the folder


class TextLMError(ValueError):
    """The LM or tokenizer cannot do what a baseline needs (no pad/eos token, no hidden states...)."""


# ---------------------------------------------------------------------------------------------- the LM
@dataclasses.dataclass
class TextLM:
    """A frozen causal LM and its tokenizer, as the baselines use them. ``name`` is for logs and records."""

    model: PreTrainedModel
    tokenizer: Any
    name: str = "lm"
    _fingerprint: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise TextLMError(f"LM {self.name!r}: its tokenizer has neither a pad nor an eos token")
            # Padding is masked everywhere (attention mask, pooled mean), so eos can stand in (GPT-2 style).
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """SHA-256 of the weights (in their loaded dtype), the model config and the tokenizer (vocabulary and
        chat template); computed once (about a second for SmolLM2-135M)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    def describe(self) -> str:
        return f"{self.name} ({self.dtype}, {self.device}, {torch.get_num_threads()} threads)"


def model_fingerprint(model: torch.nn.Module, tokenizer: Any) -> str:
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(getattr(tokenizer, "eos_token", None)).encode())
    return h.hexdigest()


LM_DTYPES = ("fp32", "bf16")  # what ``load_text_lm`` loads a baseline's LM in


def check_lm_placement(config: Any) -> None:
    """A baseline config's ``lm_dtype`` (one of ``LM_DTYPES``) and ``lm_device`` (a torch device string)."""
    check_fields(config, choices={"lm_dtype": LM_DTYPES}, devices=("lm_device",))


def load_text_lm(
    spec: str,
    *,
    dataset: Any = None,
    dtype: str = "fp32",
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextLM:
    """Resolve ``spec`` exactly as the CLI's ``--lm`` does (``smollm2``, a ``.gguf`` file, a model folder, a
    hub id, ``offline``/``random`` given ``dataset``) and load the model frozen with its tokenizer."""
    from userip.lm import resolve_lm
    from userip.profile.lm import load_causal_lm, load_tokenizer

    path = resolve_lm(spec, dataset, cache_dir=cache_dir, progress=False)
    model = load_causal_lm(path, dtype=dtype, device=device)
    return TextLM(model, load_tokenizer(path), name=spec)


def chat_text(tokenizer: Any, user_message: str) -> str:
    """The prompt the LM reads: the user message inside the tokenizer's chat template, ending where the
    assistant's answer starts; a tokenizer without a template gets the message as it is."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], add_generation_prompt=True, tokenize=False
        )
    return user_message


# ---------------------------------------------------------------------------------------------- cost
@dataclasses.dataclass
class OfflineCost:
    """What the offline LLM work of a baseline cost (design note section 1(3) asks for it in reports).

    ``llm_calls``: texts generated now (one per prompt, however batched); ``cached_generations``: answers
    reused from the cache instead. ``prompt_tokens``/``new_tokens``: tokens read/written by generation
    (padding excluded, new tokens up to and including the first eos). ``encode_*``: the encoder's forwards.
    ``train_*``: passes through the LM while training (PEPLER's text loss, ReLLa's LoRA), one sample per
    pass, tokens without padding. ``inference_*``: LM forwards that score rows (ReLLa's P(yes) on valid and
    test); a baseline without an LM at inference (KAR, PEPLER) leaves them at zero.
    """

    llm_calls: int = 0
    cached_generations: int = 0
    generate_batches: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    generation_seconds: float = 0.0
    encoded_texts: int = 0
    cached_encodings: int = 0
    encode_tokens: int = 0
    encode_seconds: float = 0.0
    train_samples: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    inference_samples: int = 0
    inference_tokens: int = 0
    inference_seconds: float = 0.0
    device: str = ""

    @property
    def wall_seconds(self) -> float:
        return self.generation_seconds + self.encode_seconds + self.train_seconds + self.inference_seconds

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "wall_seconds": self.wall_seconds}


# ---------------------------------------------------------------------------------------------- generation
@dataclasses.dataclass
class DecodingConfig:
    """Greedy decoding settings; all of them enter the generation cache key."""

    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(
                f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}"
            )

    def key_fields(self) -> dict[str, Any]:
        # batch_size changes padding and so, in principle, greedy outputs (floating-point ties): keep it in.
        return {"greedy": True, **dataclasses.asdict(self)}


def cache_key(fields: Mapping[str, Any]) -> str:
    """SHA-256 of ``fields`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _recorded_key(manifest: Path) -> Any:
    recorded = read_json(manifest)
    return recorded.get("key") if isinstance(recorded, dict) else None


RECORD_FIELDS = ("id", "prompt", "answer")  # what a cached generation must hold to be reused


class GenerationCache:
    """Generated answers in ``folder/generations.jsonl``: one ``{"id", "prompt", "answer", ...}`` record per
    line, appended and fsynced after every batch, so a killed run resumes where it stopped. A record is reused
    only when its prompt equals the prompt asked now."""

    def __init__(self, folder: str | os.PathLike[str], key_fields: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / GENERATIONS_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / CACHE_MANIFEST
        record = {"format_version": CACHE_FORMAT_VERSION, "key": dict(key_fields)}
        if not manifest.exists():
            atomic_write_json(manifest, record)
        elif _recorded_key(manifest) != json.loads(json.dumps(record["key"], default=str)):
            raise TextLMError(f"{manifest}: this cache folder was built under another key; remove it")

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by id. A last line cut by a crash is dropped (and the file rewritten without it, so the
        next append starts on a fresh line)."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        records: dict[str, dict[str, Any]] = {}
        good: list[bytes] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: dropping a truncated record (interrupted write)", self.path)
                continue
            if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in RECORD_FIELDS)):
                log.warning("%s: dropping a record without string %s (regenerated)", self.path, RECORD_FIELDS)
                continue
            records[rec["id"]] = rec
            good.append(line)
        clean = b"".join(line + b"\n" for line in good)
        if clean != raw:
            atomic_write_bytes(self.path, clean)
        return records

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def generate_cached(
    lm: TextLM,
    prompts: Mapping[str, str],
    decoding: DecodingConfig,
    cache: GenerationCache,
    cost: OfflineCost,
    progress: bool = False,
) -> dict[str, str]:
    """Answers {id: text} for ``prompts`` {id: user message}; only prompts missing from ``cache`` reach the
    LM.

    Prompts go through the chat template, are left-padded and decoded greedily in batches of similar length
    (sorted longest first, so an out-of-memory shows on the first batch)."""
    cached = cache.load()
    answers = {i: cached[i]["answer"] for i, p in prompts.items() if i in cached and cached[i]["prompt"] == p}
    cost.cached_generations += len(answers)
    todo = [i for i in prompts if i not in answers]
    if not todo:
        return answers
    tok = lm.tokenizer
    texts = {i: chat_text(tok, prompts[i]) for i in todo}
    lengths = {i: len(tok(texts[i], add_special_tokens=False).input_ids) for i in todo}
    todo.sort(key=lambda i: -lengths[i])
    eos = tok.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=decoding.max_new_tokens,
        do_sample=False,
        repetition_penalty=decoding.repetition_penalty,
        pad_token_id=lm.pad_token_id,
        eos_token_id=eos,
    )
    cost.device = lm.describe()
    bar = tqdm(total=len(todo), desc="generate", unit="prompt", disable=not progress)
    for start in range(0, len(todo), decoding.batch_size):
        ids = todo[start : start + decoding.batch_size]
        t0 = time.perf_counter()
        # The chat template already holds any special tokens the model expects.
        enc = tok(
            [texts[i] for i in ids],
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_tensors="pt",
        ).to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(**enc, generation_config=gen_config)  # (B, L + new)
        new = out[:, enc.input_ids.shape[1] :]  # (B, new)
        records = []
        for row, i in enumerate(ids):
            tokens = new[row].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            answer = tok.decode(tokens, skip_special_tokens=True).strip()
            answers[i] = answer
            records.append(
                {
                    "id": i,
                    "prompt": prompts[i],
                    "answer": answer,
                    "prompt_tokens": lengths[i],
                    "new_tokens": len(tokens),
                }
            )
            cost.prompt_tokens += lengths[i]
            cost.new_tokens += len(tokens)
        cache.append(records)
        cost.llm_calls += len(ids)
        cost.generate_batches += 1
        cost.generation_seconds += time.perf_counter() - t0
        bar.update(len(ids))
    bar.close()
    return answers


# ---------------------------------------------------------------------------------------------- encoding
def encode_texts(
    lm: TextLM,
    texts: Sequence[str],
    max_tokens: int = 1024,
    batch_size: int = 16,
    cost: OfflineCost | None = None,
    truncation_side: str = "left",
) -> np.ndarray:
    """(N, H) float32: the masked mean over each text's tokens of the LM's final hidden states (the input to
    its output head, i.e. after the final norm). Raw text, no chat template. ``truncation_side`` "left" keeps
    a long text's end (for KAR: the most recent history and the generated answer)."""
    if truncation_side not in ("left", "right"):
        raise ConfigError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    tok = lm.tokenizer
    base = lm.model.base_model  # LlamaModel / GPT2Model...: its last_hidden_state is post-norm
    hidden = lm.model.config.hidden_size
    out = np.zeros((len(texts), hidden), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda k: -len(texts[k]))  # similar lengths share a batch
    t0 = time.perf_counter()
    old_side = tok.truncation_side
    tok.truncation_side = truncation_side
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok(
                [texts[k] for k in idx],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            ).to(lm.device)
            with torch.inference_mode():
                states = base(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
            mask = enc.attention_mask.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
            pooled = (states.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
            out[idx] = pooled.cpu().numpy()
            if cost is not None:
                cost.encode_tokens += int(enc.attention_mask.sum())
    finally:
        tok.truncation_side = old_side
    if cost is not None:
        cost.encoded_texts += len(texts)
        cost.encode_seconds += time.perf_counter() - t0
        cost.device = lm.describe()
    return out


def encode_cached(
    lm: TextLM,
    texts: Sequence[str],
    folder: str | os.PathLike[str],
    max_tokens: int = 1024,
    batch_size: int = 16,
    cost: OfflineCost | None = None,
) -> np.ndarray:
    """``encode_texts`` with the result kept in ``folder/encoded-<hash>.npy``, keyed by the model's
    fingerprint, the settings and every text."""
    h = hashlib.sha256(json.dumps([lm.fingerprint(), max_tokens, "mean", "left"]).encode())
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    path = Path(folder) / f"encoded-{h.hexdigest()[:24]}.npy"
    if path.exists():
        try:  # reused only when valid: one finite row per text (a damaged cache is recomputed, not trusted)
            table = np.load(path, allow_pickle=False)
            if table.ndim != 2 or table.shape[0] != len(texts) or not np.isfinite(table).all():
                raise ValueError(f"expected {len(texts)} finite rows, got shape {table.shape}")
        except (OSError, ValueError, EOFError) as e:
            log.warning("encoded texts: %s is not a usable cache (%s); encoding again", path, e)
        else:
            if cost is not None:
                cost.cached_encodings += len(texts)
            return table
    table = encode_texts(lm, texts, max_tokens, batch_size, cost)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, table)

    atomic_write_with(path, write)
    return table


def standardize(table: np.ndarray, fit_rows: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(N, H) -> (N, H) float32: every column minus its mean, over its standard deviation (ddof 0), both
    taken over ``table[fit_rows]`` only (the rows of the train split). A column constant on those rows is
    only centred (divided by 1), so it cannot blow up on the other rows."""
    fit_rows = np.asarray(fit_rows)
    if fit_rows.size == 0:
        raise ValueError("standardize: no rows to fit the statistics on")
    fit = table[fit_rows].astype(np.float64)
    mean, std = fit.mean(0), fit.std(0)
    return ((table - mean) / np.where(std > eps, std, 1.0)).astype(np.float32)
