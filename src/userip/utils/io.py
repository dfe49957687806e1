"""Atomic writes: every artifact is written to a temporary file in the same folder, then renamed.

A crash at any point leaves either the old file or the new one, never half of one. A killed writer does leave
its temporary (``.<name>.<random>.tmp``): every atomic write first removes those in its folder that are old
enough that no live writer can still own them (``clean_stale_tmp``), so they never pile up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# mkstemp creates 0600 files; a renamed artifact should get the mode a plain open() would give it (0666 minus
# the umask), or a bank written by one user is unreadable to the service running as another. Read once at
# import, where setting and restoring the process umask cannot race with another thread's file creation.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
TMP_SUFFIX = ".tmp"
# A temporary older than this belongs to a killed writer: real writes here take seconds, not an hour.
STALE_TMP_AGE_S = 3600.0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success move it into place. An existing ``path`` is
    moved aside first (a rename cannot replace a non-empty folder) and removed once the new one is in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` (e.g. ``df.to_parquet``) and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 JSON file (corrupt? {e.reason} at byte {e.start})") from e


def clean_stale_tmp(folder: str | os.PathLike[str], min_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove temporaries left by killed atomic writes in ``folder`` (not recursive): hidden entries ending in
    ``.tmp`` (files, or folders from a killed model save) last modified more than ``min_age_s`` ago. A younger
    one may belong to a writer still running and is kept. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - min_age_s
    removed = []
    for entry in folder.iterdir():
        if not (entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)):
            continue
        try:
            if entry.lstat().st_mtime > cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # gone already (another cleaner), or not ours to remove: never fail a write for it
            continue
        removed.append(entry)
    return removed


def run_relative(path: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> str:
    """``path`` as recorded inside a run: relative to ``run_dir`` when it lies inside it (so a moved or copied
    run uses its own files); an existing path outside it absolute (not relative to the working directory);
    anything else (a hub id) unchanged."""
    text = os.fspath(path)
    if not text or not Path(text).exists():
        return text
    resolved = Path(text).resolve()
    try:
        return resolved.relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(resolved)


def resolve_in_run(recorded: str, run_dir: str | os.PathLike[str]) -> str:
    """Inverse of ``run_relative``: a recorded relative path that exists under ``run_dir`` -> that path;
    anything else (absolute path, hub id) unchanged."""
    if recorded and not Path(recorded).is_absolute() and (Path(run_dir) / recorded).exists():
        return str(Path(run_dir) / recorded)
    return recorded


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def json_default(obj: Any) -> Any:
    # numpy scalars / arrays and Paths show up in configs and metrics.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "value"):  # Enum
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def user_cache_dir(name: str) -> Path:
    """``$USERIP_CACHE_DIR/<name>`` (default ``~/.cache/userip/<name>``): caches shared by every run, whose
    keys already hold everything the cached files depend on (converted LMs, LLM-baseline texts)."""
    root = os.environ.get("USERIP_CACHE_DIR") or Path.home() / ".cache" / "userip"
    return Path(root) / name
