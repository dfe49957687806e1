"""Where the scorer's feature bank comes from: the embedded file bank (default) or a shared Redis bank.

Both backends answer the same read interface (``userip.feature_bank.ProfileLookup``); a ``BankSource``
knows how to open the current version and how to tell cheaply whether a newer one was published (polling).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol

from userip.feature_bank.embedded import POINTER
from userip.serving.redis_bank import DEFAULT_PREFIX, RedisBank, current_version


class BankSource(Protocol):
    def open(self) -> Any: ...

    def signature(self) -> Hashable:
        """Changes whenever a new bank version is published (cheap: a stat or one Redis GET)."""
        ...

    def describe(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class FileBankSource:
    """The feature bank saved by ``userip profile`` (``FeatureBank.load``)."""

    path: Path

    def open(self) -> Any:
        from userip.feature_bank import FeatureBank

        return FeatureBank.load(self.path)

    def signature(self) -> Hashable:
        # A bank folder publishes a version by atomically replacing its pointer file (new inode), a single
        # bank file by being replaced itself.
        path = Path(self.path)
        pointer = path / POINTER if path.is_dir() else path
        return _stat_key(pointer) if pointer.exists() else None

    def describe(self) -> str:
        return f"file {self.path}"


@dataclasses.dataclass(frozen=True)
class RedisBankSource:
    """A bank published to Redis with ``userip.serving.redis_bank.publish_bank``."""

    url: str
    prefix: str = DEFAULT_PREFIX

    def open(self) -> RedisBank:
        return RedisBank.open(self._client(), self.prefix)

    def signature(self) -> Hashable:
        return current_version(self._client(), self.prefix)

    def describe(self) -> str:
        return f"redis {self.url} prefix={self.prefix!r}"

    def _client(self) -> Any:
        # One connection pool per source (per server process), shared by every pinned version.
        client = _REDIS_CLIENTS.get(self.url)
        if client is None:
            import redis

            client = _REDIS_CLIENTS[self.url] = redis.Redis.from_url(self.url)
        return client


_REDIS_CLIENTS: dict[str, Any] = {}


def bank_source(spec: str | os.PathLike[str], redis_prefix: str = DEFAULT_PREFIX) -> BankSource:
    """``redis://...`` / ``rediss://...`` / ``unix://...`` -> Redis; anything else is a file path."""
    text = os.fspath(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisBankSource(text, redis_prefix)
    return FileBankSource(Path(text))


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size
