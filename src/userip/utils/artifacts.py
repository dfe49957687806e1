"""Verified artifacts: a content hash recorded when a file is written and checked before it is used.

Tensor files (checkpoints, soft tokens, objectives, CTR weights) are safetensors whose header metadata holds
``userip.sha256``, a SHA-256 over every tensor's name, dtype, shape and bytes, written by ``save_tensors``.
``load_tensors`` recomputes it, and also checks the names, shapes and finiteness the caller expects: a file
that was truncated, overwritten or bit-flipped, or that holds NaN/inf, is a ``CorruptArtifactError`` naming
the file and what was expected, raised before anything downstream sees the tensors. Every file userip writes
records its hash, so a tensor file without one was not written by userip (or had its metadata stripped): it
is refused like a corrupt one, never loaded on structural checks alone.

Folders (a cached LM) are verified with ``folder_hashes`` / ``verify_folder``: the SHA-256 of each file,
recorded in the folder's manifest at write time; ``check_recorded_folder`` is the one check every loader of
such a folder runs.

Cached results (a trained CTR model, an experiment cell, a re-quantized bank, encoded texts) follow one rule,
``reuse_cached``: a cache is reused only when the key recorded with it (everything that made it: config
sections, data / bank / LM identity, seed) equals the key asked now and its record passes ``check_record``
(schema and finite metrics); anything else is logged and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from userip.utils.io import atomic_path, json_default, read_json, sha256_file

log = logging.getLogger(__name__)

HASH_KEY = "userip.sha256"
CACHE_KEY_FIELD = "cache_key"  # where a cached JSON record keeps the key it was computed under


class CorruptArtifactError(ValueError):
    """An artifact is truncated, corrupt or not what its reader expects; the message names the file and the
    expectation. Raised before the artifact is used, so nothing downstream is written from it."""


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (independent of the file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1e".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` atomically as safetensors with their content hash in the header; returns the hash."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = tensors_digest(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), HASH_KEY: digest})
    return digest


def load_tensors(
    path: str | os.PathLike[str],
    what: str,
    *,
    required: Iterable[str] = (),
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    finite: bool = True,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read a safetensors file and verify it: recorded content hash (required: ``save_tensors`` always writes
    one), ``required`` names, exact ``shapes`` (``-1`` matches any size) and, with ``finite``, no NaN/inf in
    floating tensors.

    ``what`` says what the file is for (``"profile checkpoint"``) in the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifactError(f"{path}: {what} is missing")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            recorded = (f.metadata() or {}).get(HASH_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptArtifactError(
            f"{path}: {what} is not a readable safetensors file (truncated or corrupt: {e})"
        ) from e
    if recorded is None:
        raise CorruptArtifactError(
            f"{path}: {what} records no content hash (metadata {HASH_KEY!r}, written with every file userip "
            "saves): it was stripped or the file was written by another tool; retrain or rewrite it"
        )
    if tensors_digest(tensors) != recorded:
        raise CorruptArtifactError(
            f"{path}: {what} is corrupt: its content hash differs from the one recorded when it was written "
            f"(sha256 {recorded[:16]}...)"
        )
    missing = sorted(set(required) - set(tensors))
    if missing:
        raise CorruptArtifactError(f"{path}: {what} lacks tensor(s) {missing}; it has {sorted(tensors)}")
    for name, expected in (shapes or {}).items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got is None or len(got) != len(expected) or any(e not in (-1, g) for e, g in zip(expected, got)):
            raise CorruptArtifactError(f"{path}: {what} tensor {name!r} has shape {got}, expected {expected}")
    if finite:
        check_finite(tensors, f"{path}: {what}")
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf in any floating tensor (a model holding them answers NaN, which is not even JSON)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CorruptArtifactError(f"{where}: tensor {name!r} holds {bad} NaN/inf value(s)")


def folder_hashes(folder: str | os.PathLike[str], exclude: Iterable[str] = ()) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder`` (relative POSIX path -> hex), ``exclude`` left out."""
    folder = Path(folder)
    skip = set(exclude)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    }


def verify_folder(folder: str | os.PathLike[str], recorded: Mapping[str, str]) -> list[str]:
    """Problems (empty when none) between ``folder``'s files and the hashes ``recorded`` at write time."""
    folder = Path(folder)
    problems = []
    for rel, expected in sorted(recorded.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel} differs from its recorded SHA-256")
    return problems


def check_recorded_folder(folder: str | os.PathLike[str], manifest_name: str, what: str) -> None:
    """Refuse a folder whose files differ from the SHA-256s its manifest (``manifest_name``, key ``files``)
    recorded at write time: every loader of such a folder (a cached LM) calls this before reading it."""
    folder = Path(folder)
    manifest = folder / manifest_name
    try:
        recorded = read_json(manifest).get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise CorruptArtifactError(f"{manifest}: {what} manifest unreadable ({e})") from e
    if not isinstance(recorded, dict) or not recorded:
        raise CorruptArtifactError(f"{manifest}: {what} manifest records no file hashes ('files')")
    problems = verify_folder(folder, recorded)
    if problems:
        raise CorruptArtifactError(
            f"{folder}: {what} failed verification against {manifest_name}: {'; '.join(problems)} "
            "(remove the folder to have it rebuilt)"
        )


# ---------------------------------------------------------------------------------------- cached results
def canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, enums -> values, numpy -> Python): what a key
    computed now is compared in, against one read from a file."""
    return json.loads(json.dumps(value, sort_keys=True, default=json_default))


def key_digest(key: Any, length: int = 10) -> str:
    """Short SHA-256 of a cache key (for file and folder names)."""
    return hashlib.sha256(json.dumps(canonical(key), sort_keys=True).encode()).hexdigest()[:length]


def check_record(
    record: Any,
    where: str | os.PathLike[str],
    fields: Mapping[str, type | tuple[type, ...]],
    finite: Iterable[str] = (),
) -> None:
    """Refuse a JSON record that lacks one of ``fields`` (dotted names reach into nested mappings:
    ``test.auc``) or holds a value of another type, or whose ``finite`` fields are NaN/inf. ``None`` passes
    where the type tuple includes ``type(None)``; a bool is never a number."""
    if not isinstance(record, dict):
        raise CorruptArtifactError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, types in fields.items():
        value = _field(record, name, where)
        allowed = types if isinstance(types, tuple) else (types,)
        numeric = any(t in (int, float) for t in allowed)
        if not isinstance(value, allowed) or (isinstance(value, bool) and numeric and bool not in allowed):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise CorruptArtifactError(f"{where}: field {name!r} is {value!r}, expected {expected}")
    for name in finite:
        value = _field(record, name, where)
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise CorruptArtifactError(f"{where}: field {name!r} is {value!r}, expected a finite number")


def _field(record: Mapping[str, Any], name: str, where: Any) -> Any:
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CorruptArtifactError(f"{where}: field {name!r} is missing")
        value = value[part]
    return value


def reuse_cached(
    path: str | os.PathLike[str],
    key: Mapping[str, Any],
    what: str,
    check: Callable[[Any, Path], None],
    key_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The cached JSON record at ``path`` when it may be reused, else None (and why, in the log).

    Reused only when the key recorded with it equals ``key`` (everything that made it) and ``check(record,
    path)`` passes (schema, finite metrics). The key is the record's ``cache_key`` field, or with ``key_file``
    the whole JSON of that file (a trained model's ``config.json``). The returned record has no ``cache_key``.
    A missing cache is None silently; a stale or invalid one is logged: it is recomputed, never trusted.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_json(path)
        check(record, path)
        recorded = read_json(key_file) if key_file is not None else record.get(CACHE_KEY_FIELD)
    except (CorruptArtifactError, OSError, ValueError) as e:
        log.warning("%s: %s is not a usable result (%s); recomputing", what, path, e)
        return None
    expected = canonical(dict(key))
    if recorded != expected:
        found = recorded if isinstance(recorded, dict) else {}
        differ = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
        log.info("%s: %s was made from other inputs (%s differ); recomputing", what, path, ", ".join(differ))
        return None
    return {k: v for k, v in record.items() if k != CACHE_KEY_FIELD}


__all__ = [
    "CACHE_KEY_FIELD",
    "HASH_KEY",
    "CorruptArtifactError",
    "canonical",
    "check_finite",
    "check_record",
    "check_recorded_folder",
    "folder_hashes",
    "key_digest",
    "load_tensors",
    "reuse_cached",
    "save_tensors",
    "tensors_digest",
    "verify_folder",
]
