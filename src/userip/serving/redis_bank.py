"""Redis feature-bank backend: many scoring servers share one bank.

Layout under a key prefix (default ``userip:bank``), one namespace per bank version so a publish never
overwrites what a server is reading:

    {prefix}:v:{version}:codes   hash  raw_user_id -> P little-endian int16 codes (2 * P bytes)
    {prefix}:v:{version}:meta    string JSON {profile_names, codebook_sizes, dataset_hash, version,
                                              codebook_hash, lineage}
    {prefix}:current             string the version servers should use (written last: the atomic switch)
    {prefix}:versions            list   published versions, newest first (retention)

``publish_bank`` writes a version's keys, then flips ``current``; ``RedisBank.open`` pins one version, so a
server answers from exactly one version until it is told to reload. A lookup is one round trip (HMGET plus an
EXISTS on the meta key, pipelined) and detects a version that was deleted under it instead of answering
"unknown" for everyone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_PREFIX = "userip:bank"
_CODE_DTYPE = np.dtype("<i2")  # codebooks are tiny (K_p <= 32767); 2 bytes per profile per user
_PUBLISH_CHUNK = 10_000


class RedisBankError(RuntimeError):
    """The Redis bank is missing, incomplete or was removed while in use; the message says which key."""


def _client(url_or_client: Any) -> Any:
    if isinstance(url_or_client, str):
        import redis  # optional dependency (extra "serve"); imported only when Redis is used

        return redis.Redis.from_url(url_or_client)
    return url_or_client


def _keys(prefix: str, version: str) -> tuple[str, str]:
    return f"{prefix}:v:{version}:codes", f"{prefix}:v:{version}:meta"


class RedisBank:
    """One bank version read from Redis; same read interface as ``FeatureBank`` (``lookup_raw``)."""

    def __init__(self, client: Any, prefix: str, meta: dict[str, Any], url: str | None = None) -> None:
        self._client = client
        self.prefix = prefix
        self.url = url
        self.profile_names: list[str] = list(meta["profile_names"])
        self.codebook_sizes: list[int] = [int(k) for k in meta["codebook_sizes"]]
        self.dataset_hash: str | None = meta.get("dataset_hash")
        self.version: str = str(meta["version"])
        # Pairing with the model (see FeatureBank.compatible_with); absent in versions published before it.
        self.codebook_hash: str | None = meta.get("codebook_hash")
        self.lineage: list[str] = [str(v) for v in meta.get("lineage") or [self.version]]
        self._codes_key, self._meta_key = _keys(prefix, self.version)
        self._sizes = np.asarray(self.codebook_sizes, dtype=np.int64)

    @classmethod
    def open(cls, url_or_client: Any, prefix: str = DEFAULT_PREFIX, version: str | None = None) -> RedisBank:
        """Pin ``version`` (default: the one ``{prefix}:current`` points to)."""
        client = _client(url_or_client)
        if version is None:
            version = current_version(client, prefix)
            if version is None:
                raise RedisBankError(f"no bank published under {prefix!r}: key {prefix}:current is missing")
        raw = client.get(_keys(prefix, version)[1])
        if raw is None:
            raise RedisBankError(f"bank version {version!r} has no meta key {_keys(prefix, version)[1]!r}")
        url = url_or_client if isinstance(url_or_client, str) else None
        return cls(client, prefix, json.loads(raw), url=url)

    def compatible_with(self, version: str | None, codebook_hash: str | None = None) -> bool:
        """Whether a model trained on bank ``version`` (codebooks ``codebook_hash``) can use this version."""
        if codebook_hash and self.codebook_hash:
            return codebook_hash == self.codebook_hash
        return version is None or str(version) in self.lineage

    @property
    def num_profiles(self) -> int:
        return len(self.profile_names)

    def lookup_raw(self, raw_user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, P) int64 (-1 where unknown) and the known mask (N,) for raw user IDs."""
        n, p = len(raw_user_ids), self.num_profiles
        codes = np.full((n, p), -1, dtype=np.int64)
        known = np.zeros(n, dtype=bool)
        if n == 0:
            return codes, known
        import redis

        pipe = self._client.pipeline(transaction=False)
        pipe.hmget(self._codes_key, list(raw_user_ids))
        pipe.exists(self._meta_key)
        try:
            values, meta_exists = pipe.execute()
        except redis.RedisError as e:
            raise RedisBankError(f"Redis bank unreachable ({self.describe()}): {e}") from e
        if not meta_exists:
            raise RedisBankError(
                f"bank version {self.version!r} was removed from Redis ({self._meta_key!r} is gone); reload"
            )
        hits = [i for i, v in enumerate(values) if v is not None]
        if hits:
            try:
                packed = np.frombuffer(b"".join(values[i] for i in hits), dtype=_CODE_DTYPE).reshape(
                    len(hits), p
                )
            except ValueError as e:
                raise RedisBankError(
                    f"bank version {self.version!r}: malformed codes in {self._codes_key!r}"
                ) from e
            # The contract every backend keeps: codes in [0, K_p), so code + 1 is a valid CTR index.
            if (packed < 0).any() or (packed >= self._sizes).any():
                raise RedisBankError(f"bank version {self.version!r}: codes outside the codebooks in Redis")
            codes[hits] = packed
            known[hits] = True
        return codes, known

    def describe(self) -> str:
        return f"redis {self.url or '<client>'} prefix={self.prefix!r} version={self.version!r}"


def current_version(url_or_client: Any, prefix: str = DEFAULT_PREFIX) -> str | None:
    raw = _client(url_or_client).get(f"{prefix}:current")
    return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)


def publish_bank(
    bank: Any,
    url_or_client: Any,
    prefix: str = DEFAULT_PREFIX,
    keep_versions: int = 2,
) -> str:
    """Copy a ``FeatureBank`` into Redis as a new version, then make it current; returns the version.

    Older versions beyond ``keep_versions`` are deleted *after* the switch, so servers still pinned to the
    previous version keep answering from it until they reload.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    client = _client(url_or_client)
    raw_ids, codes = bank_rows(bank)
    version = str(bank.version)
    codes_key, meta_key = _keys(prefix, version)
    if codes.size and (codes.min() < -1 or codes.max() > np.iinfo(_CODE_DTYPE).max):
        raise ValueError("bank codes out of the int16 range Redis storage uses")
    meta = {
        "profile_names": list(bank.profile_names),
        "codebook_sizes": [int(k) for k in bank.codebook_sizes],
        "dataset_hash": bank.dataset_hash,
        "version": version,
        "codebook_hash": getattr(bank, "codebook_hash", None),
        "lineage": list(getattr(bank, "lineage", [version])),
    }
    packed = np.ascontiguousarray(codes, dtype=_CODE_DTYPE)
    client.delete(codes_key, meta_key)  # a re-publish of the same version replaces it whole
    for start in range(0, len(raw_ids), _PUBLISH_CHUNK):
        stop = min(start + _PUBLISH_CHUNK, len(raw_ids))
        mapping = {
            raw_ids[i]: packed[i].tobytes() for i in range(start, stop) if raw_ids[i] and codes[i, 0] >= 0
        }
        if mapping:
            client.hset(codes_key, mapping=mapping)
    client.set(meta_key, json.dumps(meta))
    # The switch: one SET, atomic for every reader.
    pipe = client.pipeline(transaction=True)
    pipe.set(f"{prefix}:current", version)
    pipe.lrem(f"{prefix}:versions", 0, version)
    pipe.lpush(f"{prefix}:versions", version)
    pipe.execute()
    stale = client.lrange(f"{prefix}:versions", keep_versions, -1)
    for old in stale:
        old = old.decode() if isinstance(old, bytes) else str(old)
        client.delete(*_keys(prefix, old))
    if stale:
        client.ltrim(f"{prefix}:versions", 0, keep_versions - 1)
    return version


def bank_rows(bank: Any) -> tuple[list[str], np.ndarray]:
    """All (raw user ID, codes) rows of a file ``FeatureBank`` (reserved rows have raw ID "" and code -1)."""
    raw_ids = [str(u) for u in bank.raw_user_ids]
    codes = np.asarray(bank.lookup(np.arange(len(raw_ids), dtype=np.int64)), dtype=np.int64)
    return raw_ids, codes
