"""Verified artifacts: a content hash recorded when a file is written and checked before it is used.

Tensor files (checkpoints, soft tokens, objectives, CTR weights) are safetensors whose header metadata holds
``userip.sha256``, a SHA-256 over every tensor's name, dtype, shape and bytes, written by ``save_tensors``.
``load_tensors`` recomputes it, and also checks the names, shapes and finiteness the caller expects: a file
that was truncated, overwritten or bit-flipped, or that holds NaN/inf, is a ``CorruptArtifactError`` naming
the file and what was expected, raised before anything downstream sees the tensors. Files written before
hashes existed (or by a writer that does not record one) still get the structural checks.

Folders (a cached LM) are verified with ``folder_hashes`` / ``verify_folder``: the SHA-256 of each file,
recorded in the folder's manifest at write time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from userip.utils.io import atomic_path, sha256_file

HASH_KEY = "userip.sha256"


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
    """Read a safetensors file and verify it: recorded content hash (when present), ``required`` names,
    exact ``shapes`` (``-1`` matches any size) and, with ``finite``, no NaN/inf in floating tensors.

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
    if recorded is not None and tensors_digest(tensors) != recorded:
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


__all__ = [
    "HASH_KEY",
    "CorruptArtifactError",
    "check_finite",
    "folder_hashes",
    "load_tensors",
    "save_tensors",
    "tensors_digest",
    "verify_folder",
]
