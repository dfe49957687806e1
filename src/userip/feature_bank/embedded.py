"""Embedded feature bank: one Parquet file per version, loaded into dense numpy arrays.

On disk (``<bank_dir>`` is usually ``<run_dir>/bank``)::

    <bank_dir>/CURRENT.json                 {"version", "file", "sha256", "bytes"}: the version readers use
    <bank_dir>/versions/<version>.parquet   one row per user: user_id, raw_user_id, code_<profile>...
                                            [, vec_<profile> (fixed-size float32 lists, ``without_vq`` banks)]
                                            schema metadata "userip_bank": manifest + codebook vectors (JSON)

Writing a version: the Parquet file is written to a temporary name and renamed, *then* ``CURRENT.json`` is
replaced atomically. A write killed at any point leaves ``CURRENT.json`` naming the previous, complete
version, so readers keep the old bank until the new one is whole. Loading checks the file's size and SHA-256
against ``CURRENT.json``: a corrupt or truncated file is refused with a message naming it. The pointer may
only name a file in ``versions/``; temporaries of killed writes are removed by the next write (``utils.io``).

Pairing: the manifest records ``codebook_hash`` (profile names, sizes and codebook vectors) and, through
``parent_version`` and ``upserts``, the versions it descends from. A CTR model trained on version V fits any
bank whose codebooks are V's: V itself or a version upserted from it (new users, same codebooks); see
``FeatureBank.compatible_with``. The trained objective a bank names (``objective_file``) is recorded with its
SHA-256 (``objective_sha256``) and checked by ``verify_objective`` before new users are fitted with it.

**Multi-part versions** (the distributed profile stage: each rank writes the rows of its users)::

    <bank_dir>/CURRENT.json    {"version", "parts": [{"file", "sha256", "bytes", "user_lo", "user_hi"}, ...]}
    <bank_dir>/versions/<version>.part-<i>-of-<n>.parquet   rows user_lo..user_hi-1, same columns; metadata:
                                                            the version's manifest + codebooks, and "part"

Each part is written (atomically) by its rank; the pointer, written last by one process, commits the
version: until it is replaced, readers keep the previous version. ``load`` checks every part's size and
SHA-256, that all parts carry the same version and that their user ranges tile ``0..U-1`` in order, and
concatenates them: a loaded multi-part bank is the same ``FeatureBank`` as the one-file bank of the same
rows (the one-file bank is the one-part case; its pointer keeps the ``file`` form, so existing banks load).

Row ``i`` holds the user whose ``user_id`` (the dataset's contiguous index) is ``i``, so ``lookup`` is one
dense array index. ``UNKNOWN_CODE = -1`` marks a user the bank does not know (also rows reserved but never
filled).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userip.data.ids import IdIndex
from userip.feature_bank.base import (
    CODE_LEVELS_KEY,
    UNKNOWN_CODE,
    FeatureBankError,
    check_bank_dataset,
    check_code_levels,
)
from userip.utils.io import atomic_write_json, atomic_write_with, read_json, sha256_file

FORMAT_VERSION = 1
POINTER = "CURRENT.json"
VERSIONS_DIR = "versions"
METADATA_KEY = b"userip_bank"
KIND_CODES = "codes"  # profile IDs from the VQ codebooks (the method)
KIND_CONTINUOUS = "continuous"  # ``without_vq`` ablation: vectors, plus k-means IDs so the ID contract holds


class FeatureBank:
    """User -> profile IDs (+ codebook vectors, manifest). Build with ``build``, persist with ``write``."""

    def __init__(
        self,
        raw_user_ids: list[str],
        codes: np.ndarray,
        codebooks: list[np.ndarray],
        manifest: dict[str, Any],
        profile_vectors: np.ndarray | None = None,
    ) -> None:
        self.raw_user_ids = raw_user_ids  # (U,) row i = user_id i; "" for a reserved, unfilled row
        self.codes = codes  # (U, P) int64
        self.codebooks = codebooks  # P arrays (K_p, D)
        self.manifest = manifest
        self.profile_vectors = profile_vectors  # (U, P, d) float32 or None
        self.profile_names: list[str] = list(manifest["profile_names"])
        self.codebook_sizes: list[int] = [int(k) for k in manifest["codebook_sizes"]]
        self.dataset_hash: str = str(manifest["dataset_hash"])
        self.version: str = str(manifest["version"])
        self.codebook_hash: str = codebook_hash(self.profile_names, codebooks)
        _check_unique_raw_ids(raw_user_ids)
        # raw id -> row, built on the first lookup by raw id: a bank part that is only written (the
        # distributed bank step) never holds a dict entry per user
        self._id_index: IdIndex | None = None
        # The codes plus one trailing row of UNKNOWN_CODE: any id outside the bank is sent to row -1, so a
        # lookup is one fancy index (online requests ask for one user; ~10 numpy calls cost >5% of scoring).
        self._codes_or_unknown = np.vstack(
            [codes, np.full((1, codes.shape[1]), UNKNOWN_CODE, dtype=np.int64)]
        )

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        *,
        profile_names: Sequence[str],
        codebooks: Sequence[np.ndarray],
        codes: np.ndarray,
        raw_user_ids: Sequence[str],
        dataset_hash: str,
        lm: str = "",
        template: str = "",
        config: dict[str, Any] | None = None,
        profile_vectors: np.ndarray | None = None,
        kind: str = KIND_CODES,
        parent_version: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> FeatureBank:
        """Validate and assemble a new bank version (in memory; ``write`` persists it).

        ``codes`` (U, P) are indexed by user_id; ``codebooks[p]`` is (K_p, D) with K_p >= 2.
        """
        codes = np.asarray(codes)
        profile_names = list(profile_names)
        raw_user_ids = [str(r) for r in raw_user_ids]
        if not profile_names or len(set(profile_names)) != len(profile_names):
            raise FeatureBankError(f"profile_names must be non-empty and unique, got {profile_names}")
        if len(codebooks) != len(profile_names):
            raise FeatureBankError(f"{len(codebooks)} codebooks for {len(profile_names)} profiles")
        cbs = [np.asarray(cb, dtype=np.float32) for cb in codebooks]
        for name, cb in zip(profile_names, cbs):
            if cb.ndim != 2:
                raise FeatureBankError(f"codebook of {name!r} must be (K, D), got shape {cb.shape}")
            if cb.shape[0] < 2:
                raise FeatureBankError(
                    f"codebook of {name!r} has {cb.shape[0]} code(s); a codebook needs >= 2"
                )
        if (
            not np.issubdtype(codes.dtype, np.integer)
            or codes.ndim != 2
            or codes.shape[1] != len(profile_names)
        ):
            raise FeatureBankError(
                f"codes must be an integer (U, {len(profile_names)}) array, got {codes.dtype} {codes.shape}"
            )
        codes = codes.astype(np.int64)
        if len(raw_user_ids) != len(codes):
            raise FeatureBankError(f"{len(raw_user_ids)} raw user ids for {len(codes)} rows of codes")
        _check_unique_raw_ids(raw_user_ids)
        for p, (name, cb) in enumerate(zip(profile_names, cbs)):
            col = codes[:, p]
            if col.size and (col.min() < UNKNOWN_CODE or col.max() >= cb.shape[0]):
                raise FeatureBankError(
                    f"codes of {name!r} must lie in [0, {cb.shape[0]}) or be {UNKNOWN_CODE}"
                )
        if profile_vectors is not None:
            profile_vectors = np.asarray(profile_vectors, dtype=np.float32)
            if profile_vectors.ndim != 3 or profile_vectors.shape[:2] != codes.shape:
                raise FeatureBankError(f"profile_vectors must be (U, P, d), got {profile_vectors.shape}")
        if kind not in (KIND_CODES, KIND_CONTINUOUS):
            raise FeatureBankError(f"kind must be {KIND_CODES!r} or {KIND_CONTINUOUS!r}, got {kind!r}")
        created = dt.datetime.now(dt.UTC)
        digest = hashlib.sha256(codes.tobytes())
        digest.update("\x1f".join(raw_user_ids).encode())
        for cb in cbs:
            digest.update(cb.tobytes())
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": f"{created:%Y%m%dT%H%M%S%fZ}-{digest.hexdigest()[:8]}",
            "parent_version": parent_version,
            "created": created.isoformat(timespec="seconds"),
            "dataset_hash": dataset_hash,
            "lm": lm,
            "template": template,
            "config": config or {},
            "kind": kind,
            "profile_names": profile_names,
            "codebook_sizes": [int(cb.shape[0]) for cb in cbs],
            "codebook_hash": codebook_hash(profile_names, cbs),
            "num_users": int((codes[:, 0] >= 0).sum()) if codes.size else 0,
            "unknown_code": UNKNOWN_CODE,
            **(extra or {}),
        }
        check_code_levels(manifest, "feature bank")
        return cls(raw_user_ids, codes, cbs, manifest, profile_vectors)

    def upsert(
        self,
        raw_user_ids: Sequence[str],
        codes: np.ndarray,
        user_ids: np.ndarray | None = None,
        profile_vectors: np.ndarray | None = None,
        note: str = "",
    ) -> FeatureBank:
        """A new version with these users' codes set; every other user's row is copied unchanged.

        A raw id already in the bank keeps its row. A new one goes to ``user_ids[i]`` when given (a dataset
        user the bank had no profile for), else to the next free row after the current last one.
        """
        raw_user_ids = [str(r) for r in raw_user_ids]
        codes = np.asarray(codes, dtype=np.int64).reshape(len(raw_user_ids), len(self.profile_names))
        rows = np.empty(len(raw_user_ids), dtype=np.int64)
        next_row = len(self.raw_user_ids)
        for i, raw in enumerate(raw_user_ids):
            if raw in self._rows:
                rows[i] = self._rows.get(raw)
            elif user_ids is not None:
                rows[i] = int(user_ids[i])
            else:
                rows[i], next_row = next_row, next_row + 1
        size = max(len(self.raw_user_ids), int(rows.max()) + 1 if len(rows) else 0)
        new_raw = list(self.raw_user_ids) + [""] * (size - len(self.raw_user_ids))
        new_codes = np.full((size, len(self.profile_names)), UNKNOWN_CODE, dtype=np.int64)
        new_codes[: len(self.codes)] = self.codes
        for i, row in enumerate(rows):
            if new_raw[row] not in ("", raw_user_ids[i]):
                raise FeatureBankError(
                    f"row {row} already belongs to user {new_raw[row]!r}, not {raw_user_ids[i]!r}"
                )
            new_raw[row] = raw_user_ids[i]
        new_codes[rows] = codes
        new_vectors = None
        if self.profile_vectors is not None:
            if profile_vectors is None:
                raise FeatureBankError("this bank stores profile vectors: upsert needs profile_vectors too")
            new_vectors = np.zeros((size, *self.profile_vectors.shape[1:]), dtype=np.float32)
            new_vectors[: len(self.profile_vectors)] = self.profile_vectors
            new_vectors[rows] = profile_vectors
        history = list(self.manifest.get("upserts", [])) + [
            {"from_version": self.version, "num_users": len(raw_user_ids), "note": note}
        ]
        keep = {k: self.manifest[k] for k in ("lm", "template", "config", "kind")}
        extra = {k: v for k, v in self.manifest.items() if k not in _BUILT_KEYS}
        extra["upserts"] = history
        return FeatureBank.build(
            profile_names=self.profile_names,
            codebooks=self.codebooks,
            codes=new_codes,
            raw_user_ids=new_raw,
            dataset_hash=self.dataset_hash,
            profile_vectors=new_vectors,
            parent_version=self.version,
            extra=extra,
            **keep,
        )

    # ------------------------------------------------------------------ reading
    @property
    def _rows(self) -> IdIndex:
        """raw id -> row (row i = user_id i); "" (a reserved, unfilled row) and unknown ids -> -1."""
        if self._id_index is None:
            self._id_index = IdIndex(self.raw_user_ids, reserved="")
        return self._id_index

    @property
    def num_rows(self) -> int:
        return len(self.raw_user_ids)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", KIND_CODES))

    @property
    def num_levels(self) -> int:
        """Codes (fields) per profile: 1, or the residual levels recorded in ``code_levels``."""
        return int(self.manifest.get(CODE_LEVELS_KEY, {}).get("num_levels", 1))

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """(N,) int64 user ids -> (N, P) int64 codes; ``UNKNOWN_CODE`` (-1) for ids the bank does not hold."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        rows = np.where((user_ids >= 0) & (user_ids < len(self.codes)), user_ids, -1)
        return self._codes_or_unknown[rows]

    def lookup_raw(self, raw_user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """raw ids (N,) -> codes (N, P) int64 (-1 where unknown) and known_mask (N,) bool."""
        codes = self._codes_or_unknown[self._rows.rows(map(str, raw_user_ids), len(raw_user_ids))]
        return codes, (codes >= 0).all(axis=1)

    def lookup_vectors(self, user_ids: np.ndarray) -> np.ndarray:
        """(N,) user ids -> (N, P, d) float32 stored vectors (zeros where unknown); continuous banks only."""
        if self.profile_vectors is None:
            raise FeatureBankError(f"bank {self.version} stores no profile vectors (kind={self.kind!r})")
        user_ids = np.asarray(user_ids, dtype=np.int64)
        out = np.zeros((len(user_ids), *self.profile_vectors.shape[1:]), dtype=np.float32)
        inside = (user_ids >= 0) & (user_ids < len(self.codes))
        out[inside] = self.profile_vectors[user_ids[inside]]
        return out

    def codebook_vectors(self, p: int | str) -> np.ndarray:
        """(K_p, D) float32 codebook of profile ``p`` (index or name)."""
        if isinstance(p, str):
            if p not in self.profile_names:
                raise KeyError(f"no profile {p!r}; profiles are {self.profile_names}")
            p = self.profile_names.index(p)
        return self.codebooks[p]

    @property
    def lineage(self) -> list[str]:
        """This version and every version it was upserted from (all share its codebooks), newest first."""
        ancestors = [u.get("from_version") for u in reversed(self.manifest.get("upserts", []))]
        chain = [self.version, self.manifest.get("parent_version"), *ancestors]
        return list(dict.fromkeys(str(v) for v in chain if v))

    def compatible_with(self, version: str | None, codebook_hash_: str | None = None) -> bool:
        """Whether a model trained on bank ``version`` (codebooks hashing to ``codebook_hash_``, if known)
        can use this bank: same codebooks, so every ID means what it meant in training."""
        if codebook_hash_:
            return codebook_hash_ == self.codebook_hash
        return version is None or str(version) in self.lineage

    def verify_objective(self, bank_dir: str | os.PathLike[str]) -> Path:
        """The trained objective file this version names, checked (inside ``objectives/``, present, SHA-256 as
        recorded at write time); a ``FeatureBankError`` names the file and what was expected."""
        bank_dir = Path(bank_dir)
        rel = self.manifest.get("objective_file")
        if not rel:
            raise FeatureBankError(
                f"{bank_dir}: bank {self.version} names no trained objective (objective_file)"
            )
        source = _confined(bank_dir, str(rel), OBJECTIVES_DIR, f"bank {self.version} objective_file")
        if not source.is_file():
            raise FeatureBankError(f"{source}: missing; named by bank {self.version}")
        expected = self.manifest.get("objective_sha256")
        if expected and sha256_file(source) != expected:
            raise FeatureBankError(
                f"{source}: corrupt (SHA-256 differs from the one bank {self.version} recorded when written)"
            )
        return source

    def check_dataset(self, dataset_hash: str) -> None:
        """Refuse a bank built from another dataset (content hashes differ): ``BankMismatchError``."""
        check_bank_dataset(self, dataset_hash)

    # ------------------------------------------------------------------ persistence
    def write(self, bank_dir: str | os.PathLike[str], keep_versions: int = 3) -> Path:
        """Persist this version under ``bank_dir`` and make it current; returns the version file's path."""
        bank_dir = Path(bank_dir)
        self._record_objective(bank_dir)
        rel = f"{VERSIONS_DIR}/{self.version}.parquet"
        target = bank_dir / rel
        atomic_write_with(target, lambda tmp: pq.write_table(self._to_arrow(), tmp))
        pointer = {
            "version": self.version,
            "file": rel,
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
        }
        atomic_write_json(bank_dir / POINTER, pointer)  # the switch: readers see the new version from here on
        _prune(bank_dir, keep_versions, current=target.name)
        return target

    def content_digest(self) -> str:
        """SHA-256 of the rows (codes, raw ids) and codebooks: what ``build`` names a version after. A
        multi-part version is named after its parts' digests (``multi_part_version``)."""
        digest = hashlib.sha256(self.codes.tobytes())
        digest.update("\x1f".join(self.raw_user_ids).encode())
        for cb in self.codebooks:
            digest.update(cb.tobytes())
        return digest.hexdigest()

    def rename(self, version: str, created: str, num_users: int, extra: dict[str, Any] | None = None) -> None:
        """Make this bank (one part's rows) carry its multi-part version's name, time, user count and
        shared manifest entries (every part of a version has the same manifest)."""
        self.manifest.update(
            {**(extra or {}), "version": version, "created": created, "num_users": num_users}
        )
        self.version = version

    def write_part(
        self, bank_dir: str | os.PathLike[str], index: int, count: int, user_lo: int
    ) -> dict[str, Any]:
        """Write this bank's rows as part ``index`` of ``count`` of its version, holding users
        ``[user_lo, user_lo + num_rows)`` (``self`` holds only those rows; its manifest is the whole
        version's). Returns the part's pointer record; ``commit_parts`` makes the version current."""
        bank_dir = Path(bank_dir)
        rel = f"{VERSIONS_DIR}/{self.version}.part-{index:05d}-of-{count:05d}.parquet"
        target = bank_dir / rel
        part = {"index": index, "count": count, "user_lo": user_lo, "user_hi": user_lo + self.num_rows}
        atomic_write_with(target, lambda tmp: pq.write_table(self._to_arrow(user_lo, part), tmp))
        return {
            "file": rel,
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
            "user_lo": part["user_lo"],
            "user_hi": part["user_hi"],
        }

    def _record_objective(self, bank_dir: Path) -> None:
        objective = self.manifest.get("objective_file")
        if objective and "objective_sha256" not in self.manifest:
            source = _confined(bank_dir, str(objective), OBJECTIVES_DIR, "objective_file")
            if source.is_file():  # recorded now, checked by verify_objective before new users use it
                self.manifest["objective_sha256"] = sha256_file(source)

    def write_parts(
        self, bank_dir: str | os.PathLike[str], bounds: Sequence[int], keep_versions: int = 3
    ) -> list[dict[str, Any]]:
        """This bank as a multi-part version under ``bank_dir``: part i holds users
        ``[bounds[i], bounds[i+1])`` (``bounds`` from 0 to ``num_rows``), written in turn and committed.
        (The distributed profile stage writes the parts from their ranks; this is the one-process way.)"""
        self._record_objective(Path(bank_dir))
        bounds = [int(b) for b in bounds]
        if bounds[0] != 0 or bounds[-1] != self.num_rows or any(b > a for a, b in zip(bounds[1:], bounds)):
            raise FeatureBankError(f"part bounds {bounds} must rise from 0 to {self.num_rows}")
        records = []
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            vectors = None if self.profile_vectors is None else self.profile_vectors[lo:hi]
            part = FeatureBank(
                self.raw_user_ids[lo:hi], self.codes[lo:hi], self.codebooks, self.manifest, vectors
            )
            records.append(part.write_part(bank_dir, i, len(bounds) - 1, lo))
        FeatureBank.commit_parts(bank_dir, self.version, records, keep_versions)
        return records

    @staticmethod
    def commit_parts(
        bank_dir: str | os.PathLike[str],
        version: str,
        parts: Sequence[dict[str, Any]],
        keep_versions: int = 3,
    ) -> None:
        """Make the multi-part ``version`` current (one atomic pointer write), once every part is written."""
        bank_dir = Path(bank_dir)
        parts = sorted(parts, key=lambda p: int(p["user_lo"]))
        atomic_write_json(bank_dir / POINTER, {"version": version, "parts": list(parts)})
        _prune(bank_dir, keep_versions, current=version)

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_dataset_hash: str | None = None) -> FeatureBank:
        """Load the current version of a bank folder (or one version file); optionally check the dataset."""
        path = Path(path)
        if path.is_dir():
            pointer_path = path / POINTER
            if not pointer_path.exists():
                raise FeatureBankError(
                    f"{path}: no {POINTER}; not a feature bank (or its first write never completed). "
                    "Run `userip profile` to build one."
                )
            try:
                pointer = read_json(pointer_path)
                records = pointer.get("parts", [pointer])
                if not isinstance(records, list) or not records:
                    raise ValueError("parts must be a non-empty list")
                checked = [
                    (str(r["file"]), str(r["sha256"]), int(r["bytes"]), r.get("user_lo"), r.get("user_hi"))
                    for r in records
                ]
            except (ValueError, KeyError, TypeError) as e:
                raise FeatureBankError(f"{pointer_path}: unreadable bank pointer ({e})") from e
            files = []
            for rel, expected_sha, expected_bytes, _, _ in checked:
                file = _confined(path, rel, VERSIONS_DIR, str(pointer_path))
                if not file.exists():
                    raise FeatureBankError(f"{file}: the bank version named by {pointer_path} is missing")
                size = file.stat().st_size
                if size != expected_bytes:
                    raise FeatureBankError(
                        f"{file}: truncated or corrupt ({size} bytes, expected {expected_bytes})"
                    )
                if sha256_file(file) != expected_sha:
                    raise FeatureBankError(f"{file}: corrupt (SHA-256 differs from {pointer_path})")
                files.append(file)
            bank = (
                cls._from_file(files[0])
                if "parts" not in pointer
                else cls._from_parts(files, str(pointer.get("version")), pointer_path)
            )
        elif path.exists():
            bank = cls._from_file(path)
        else:
            raise FeatureBankError(f"{path}: no such feature bank")
        if expected_dataset_hash is not None:
            bank.check_dataset(expected_dataset_hash)
        return bank

    def _to_arrow(self, user_lo: int = 0, part: dict[str, Any] | None = None) -> pa.Table:
        columns: dict[str, pa.Array] = {
            "user_id": pa.array(np.arange(user_lo, user_lo + len(self.codes), dtype=np.int64)),
            "raw_user_id": pa.array(self.raw_user_ids, type=pa.string()),
        }
        for p, name in enumerate(self.profile_names):
            columns[f"code_{name}"] = pa.array(self.codes[:, p])
        if self.profile_vectors is not None:
            d = self.profile_vectors.shape[2]
            for p, name in enumerate(self.profile_names):
                flat = pa.array(np.ascontiguousarray(self.profile_vectors[:, p]).ravel())
                columns[f"vec_{name}"] = pa.FixedSizeListArray.from_arrays(flat, d)
        meta: dict[str, Any] = {
            "manifest": self.manifest,
            "codebooks": [cb.tolist() for cb in self.codebooks],
        }
        if part is not None:
            meta["part"] = part
        return pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    @staticmethod
    def _read_table(file: Path) -> pa.Table:
        try:
            return pq.read_table(file)
        except (pa.ArrowException, OSError) as e:
            raise FeatureBankError(
                f"{file}: not a readable feature bank (corrupt or truncated Parquet: {e})"
            ) from e

    @classmethod
    def _from_file(cls, file: Path) -> FeatureBank:
        return cls._from_table(cls._read_table(file), str(file))

    @classmethod
    def _from_parts(cls, files: list[Path], version: str, pointer_path: Path) -> FeatureBank:
        """The parts of one version, in user order, checked to tile ``0..U-1`` and to share the version."""
        tables, expected_lo = [], 0
        for i, file in enumerate(files):
            table = cls._read_table(file)
            try:
                meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
                part, part_version = meta["part"], str(meta["manifest"]["version"])
                lo, hi = int(part["user_lo"]), int(part["user_hi"])
            except (KeyError, ValueError, TypeError) as e:
                raise FeatureBankError(
                    f"{file}: not a part of a feature bank ({type(e).__name__}: {e})"
                ) from e
            if part_version != version or int(part["index"]) != i or int(part["count"]) != len(files):
                raise FeatureBankError(
                    f"{file}: part {part.get('index')} of {part.get('count')} of version {part_version}; "
                    f"{pointer_path} names it as part {i} of {len(files)} of version {version}"
                )
            if lo != expected_lo or hi - lo != table.num_rows:
                raise FeatureBankError(
                    f"{file}: holds users [{lo}, {hi}) in {table.num_rows} rows; expected users from "
                    f"{expected_lo} on (parts must tile 0..U-1 in order)"
                )
            tables.append(table)
            expected_lo = hi
        combined = pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)
        return cls._from_table(combined, f"{pointer_path} ({len(files)} parts)")

    @classmethod
    def _from_table(cls, table: pa.Table, file: str) -> FeatureBank:
        try:
            meta = json.loads((table.schema.metadata or {})[METADATA_KEY])
            manifest = meta["manifest"]
            codebooks = [np.asarray(cb, dtype=np.float32) for cb in meta["codebooks"]]
            names = manifest["profile_names"]
            if manifest.get("format_version") != FORMAT_VERSION:
                raise FeatureBankError(
                    f"{file}: bank format_version {manifest.get('format_version')!r}, "
                    f"expected {FORMAT_VERSION}"
                )
            user_ids = table.column("user_id").to_numpy()
            if not np.array_equal(user_ids, np.arange(len(user_ids))):
                raise FeatureBankError(f"{file}: user_id column must be 0..U-1 in order")
            codes = np.stack([table.column(f"code_{n}").to_numpy().astype(np.int64) for n in names], axis=1)
            raw = [str(r) for r in table.column("raw_user_id").to_pylist()]
            vectors = None
            if f"vec_{names[0]}" in table.column_names:
                vectors = np.stack(
                    [
                        table.column(f"vec_{n}").combine_chunks().flatten().to_numpy().reshape(len(raw), -1)
                        for n in names
                    ],
                    axis=1,
                ).astype(np.float32)
        except FeatureBankError:
            raise
        except (KeyError, ValueError, TypeError, pa.ArrowException) as e:
            raise FeatureBankError(f"{file}: not a valid feature bank ({type(e).__name__}: {e})") from e
        check_code_levels(manifest, file)  # residual levels: the fields must be exactly the profiles' levels
        bank = cls(raw, codes, codebooks, manifest, vectors)
        recorded = manifest.get("codebook_hash")
        if recorded is not None and recorded != bank.codebook_hash:
            raise FeatureBankError(
                f"{file}: codebooks differ from their recorded hash {recorded!r} (corrupt)"
            )
        for p, (name, cb) in enumerate(zip(bank.profile_names, codebooks)):
            if cb.shape[0] != bank.codebook_sizes[p] or (
                codes[:, p].size and codes[:, p].max() >= cb.shape[0]
            ):
                raise FeatureBankError(f"{file}: codes or codebook of {name!r} disagree with its size")
        return bank

    def __repr__(self) -> str:
        return (
            f"FeatureBank(version={self.version!r}, users={self.manifest.get('num_users')}, "
            f"profiles={dict(zip(self.profile_names, self.codebook_sizes))}, kind={self.kind!r})"
        )


OBJECTIVES_DIR = "objectives"  # where the profile stage saves trained objectives (userip.profile.bank)


def _check_unique_raw_ids(raw_user_ids: Sequence[str]) -> None:
    """FeatureBankError unless every raw id other than "" (a reserved, unfilled row) is unique; hashed by
    Arrow, so no Python set of the ids is built."""
    ids = pa.array(raw_user_ids, type=pa.string())
    named = ids.filter(pc.not_equal(ids, ""))
    repeated = len(named) - pc.count_distinct(named).as_py()
    if repeated:
        raise FeatureBankError(f"raw_user_ids must be unique ({repeated} repeated)")


def codebook_hash(profile_names: Sequence[str], codebooks: Sequence[np.ndarray]) -> str:
    """Identity of a bank's codebooks (names, shapes, float32 vectors): equal hashes, equal ID meanings."""
    digest = hashlib.sha256()
    for name, cb in zip(profile_names, codebooks):
        cb = np.ascontiguousarray(cb, dtype=np.float32)
        digest.update(f"{name}\x1f{cb.shape}\x1e".encode())
        digest.update(cb.tobytes())
    return digest.hexdigest()[:16]


def _confined(root: Path, rel: str, subdir: str, named_by: str) -> Path:
    """``root / rel``, refused unless it lies in ``root / subdir`` (a pointer must not reach elsewhere)."""
    candidate = root / rel
    inside = (root / subdir).resolve()
    if Path(rel).is_absolute() or candidate.resolve().parent != inside:
        raise FeatureBankError(f"{named_by}: names {rel!r}, which is not a file in {subdir}/")
    return candidate


_BUILT_KEYS = {
    "codebook_hash",
    "format_version",
    "version",
    "parent_version",
    "created",
    "dataset_hash",
    "lm",
    "template",
    "config",
    "kind",
    "profile_names",
    "codebook_sizes",
    "num_users",
    "unknown_code",
}


def _version_of(file: Path) -> str:
    """``<version>.parquet`` and ``<version>.part-<i>-of-<n>.parquet`` -> ``<version>``."""
    return file.name.split(".", 1)[0]


def _prune(bank_dir: Path, keep_versions: int, current: str) -> None:
    """Delete the files of all but the newest ``keep_versions`` versions (never the current one's);
    ``current``: a version, or its one file's name."""
    current = current.split(".", 1)[0]
    files = list((bank_dir / VERSIONS_DIR).glob("*.parquet"))
    versions = sorted({_version_of(f) for f in files}, reverse=True)
    drop = set(versions[max(keep_versions, 1) :]) - {current}
    for old in files:
        if _version_of(old) in drop:
            old.unlink(missing_ok=True)
