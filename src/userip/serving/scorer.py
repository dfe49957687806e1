"""The scoring library: a trained CTR model plus a feature bank (never the LLM) -> click probabilities.

``Scorer.score(user_ids, item_ids)`` takes raw IDs (the source's own keys: strings; ints are accepted and
stringified), maps them with the vocabularies saved at training time (``userip.data.ids.IdIndex``: unseen ->
index 0), reads the users' profile codes from the feature bank (unknown user -> code -1 -> field index 0, the
reserved ID), builds one ``x_ids`` (B, F) array and runs the model once under ``torch.inference_mode``; the
calibration fitted on validation at training time (``userip.ctr.calibration``: ``scale * logit + bias``, two
scalar operations) and the sigmoid are applied outside the model, so returned scores are calibrated. The
hot path is dict lookups and numpy fancy indexing: tables are
precomputed at load.

Hot reload: the bank and its version live in one immutable ``BankSnapshot`` held by a single attribute. A
call reads that attribute once and uses only that snapshot; ``reload_bank`` builds and validates a complete
new snapshot before swapping the reference, so no call ever mixes two versions, and a bank that fails to
load leaves the old snapshot serving.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from userip.ctr.calibration import IDENTITY, Calibration
from userip.ctr.encoding import FeatureEncoder
from userip.ctr.features import ITEM_FIELD, UNKNOWN_INDEX, USER_FIELD, FeatureMap, FieldSource
from userip.data.ids import IdIndex
from userip.feature_bank import KIND_CODES
from userip.feature_bank.base import ProfileLookup, ctr_field_index
from userip.serving.bank import BankSource, FileBankSource, bank_source
from userip.utils.logging import get_logger

log = get_logger(__name__)


class BankReloadError(RuntimeError):
    """A new bank could not be loaded or does not fit the model; the previous bank keeps serving."""


class ScoringError(ValueError):
    """The call itself is wrong (mismatched lengths, bad ID types); the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class BankSnapshot:
    """Everything a call needs from one bank version; replaced whole, never mutated."""

    bank: Any  # a ProfileLookup: FeatureBank or RedisBank
    version: Any
    dataset_hash: str | None
    source: str
    signature: Hashable
    loaded_at: float
    # Which bank column feeds each profile field (None: the bank's own order, no reindexing needed).
    bank_columns: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    probs: np.ndarray  # (N,) float32 click probabilities, in input order
    unknown_user: np.ndarray  # (N,) bool: the pair's user is unseen by the model or absent from the bank
    unknown_item: np.ndarray  # (N,) bool: the pair's item is unseen by the model
    bank_version: Any  # the bank version every score of this call used (None: model without profiles)


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    x_ids: np.ndarray  # (N, F) int64 field indices: what the model sees
    unknown_user: np.ndarray
    unknown_item: np.ndarray
    bank_version: Any


@dataclasses.dataclass(frozen=True)
class ReloadResult:
    changed: bool
    previous_version: Any
    version: Any


IdsLike = Sequence[Any] | np.ndarray


def as_raw_id(value: Any) -> str:
    """Raw IDs are strings; ints (not bools, not floats) are accepted and stringified."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return str(int(value))
    raise ScoringError(f"IDs must be strings or integers, got {type(value).__name__} {value!r}")


def _raw_ids(values: Sequence[Any] | np.ndarray) -> list[str]:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    # Fast path for the common case (already strings); as_raw_id only for the rest.
    return [v if type(v) is str else as_raw_id(v) for v in values]


class Scorer:
    """Scores (user, item) pairs with a trained CTR model and, for profile models, a feature bank.

    ``user_raw_ids[i]`` / ``item_raw_ids[i]`` are the raw keys of the dataset's contiguous ``user_id`` /
    ``item_id`` ``i``; ``user_features`` holds the raw values of observable user fields in the same order.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_map: FeatureMap,
        encoder: FeatureEncoder,
        user_raw_ids: Sequence[str],
        item_raw_ids: Sequence[str],
        *,
        bank: BankSource | ProfileLookup | None = None,
        user_features: Mapping[str, np.ndarray] | None = None,
        model_name: str = "model",
        info: Mapping[str, Any] | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.model = model.eval()
        self.calibration = calibration  # None: a model saved without one, served uncalibrated
        self._calibration = calibration or IDENTITY
        self.feature_map = feature_map
        self.model_name = model_name
        self.info = dict(info or {})
        names = feature_map.names
        for required in (USER_FIELD, ITEM_FIELD):
            if required not in names:
                raise ValueError(f"feature map has no {required!r} field; fields are {names}")
        user_features = dict(user_features or {})

        # Per-user row: [user_id field index, observable feature indices...]; row 0 = unknown user (all 0).
        user_cols = [feature_map.index(USER_FIELD)]
        user_columns = [encoder.encode(USER_FIELD, np.arange(len(user_raw_ids), dtype=np.int64))]
        self._profile_fields: list[str] = []
        profile_cols: list[int] = []
        for j, field in enumerate(feature_map.fields):
            if field.name in (USER_FIELD, ITEM_FIELD):
                continue
            if field.source == FieldSource.PROFILE:
                self._profile_fields.append(field.name)
                profile_cols.append(j)
            elif field.source == FieldSource.USER:
                if field.name not in user_features:
                    raise ValueError(f"user field {field.name!r} needs its raw values (user_features)")
                user_cols.append(j)
                user_columns.append(encoder.encode(field.name, np.asarray(user_features[field.name])))
            else:
                # Item and context features are not produced by the training recipe; refuse rather than
                # silently feed index 0 where the model saw real values.
                raise ValueError(
                    f"field {field.name!r} ({field.source.value}) is not supported by the scorer"
                )
        user_raw_ids, item_raw_ids = _raw_ids(user_raw_ids), _raw_ids(item_raw_ids)
        if len(set(user_raw_ids)) != len(user_raw_ids) or len(set(item_raw_ids)) != len(item_raw_ids):
            raise ValueError("raw user/item IDs must be unique")
        self._user_table = np.concatenate(
            [np.zeros((1, len(user_cols)), dtype=np.int64), np.stack(user_columns, axis=1).astype(np.int64)]
        )
        # Raw ID -> row of the user table (row 0: the unknown user, all fields 0).
        self._user_row = IdIndex(user_raw_ids, first_row=1, missing=0)
        # Items have one field: a raw item ID maps straight to its field index, so the index holds the items
        # the model's vocabulary knows, in field-index order (1, 2, ...; absent -> 0, the unknown index).
        item_index = encoder.encode(ITEM_FIELD, np.arange(len(item_raw_ids), dtype=np.int64))
        known = np.flatnonzero(item_index != UNKNOWN_INDEX)
        known = known[np.argsort(item_index[known], kind="stable")]
        first = int(item_index[known[0]]) if len(known) else UNKNOWN_INDEX + 1
        if not np.array_equal(item_index[known], np.arange(first, first + len(known))):
            raise ValueError("the model's item vocabulary does not number the dataset's items contiguously")
        self._item_index = IdIndex([item_raw_ids[i] for i in known], first_row=first, missing=UNKNOWN_INDEX)
        self._item_col = feature_map.index(ITEM_FIELD)
        self._user_slot, self._profile_slot = _slot(user_cols), _slot(profile_cols)

        self._source: BankSource | None = None
        self._reload_lock = threading.Lock()
        self.last_reload_error: str | None = None
        self._snapshot: BankSnapshot | None = None
        if self._profile_fields:
            if bank is None:
                raise ValueError(
                    f"model has profile fields {self._profile_fields} but no feature bank was given"
                )
            if isinstance(bank, ProfileLookup):
                self._snapshot = self._make_snapshot(bank, source="<in-memory>", signature=None)
            else:
                self._source = bank
                self._snapshot = self._make_snapshot(bank.open(), bank.describe(), bank.signature())
        elif bank is not None:
            log.info("model %s has no profile fields; the feature bank is not used", model_name)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_run_dir(
        cls,
        run_dir: str | Path,
        model: str | None = None,
        bank: str | Path | None = None,
        redis_prefix: str | None = None,
    ) -> Scorer:
        """Load ``RUN/ctr/<model>/`` and, for profile models, the bank (path or ``redis://`` URL)."""
        from userip.serving.artifacts import load_run

        return load_run(cls, run_dir, model=model, bank=bank, redis_prefix=redis_prefix)

    # ------------------------------------------------------------------ scoring

    @property
    def uses_bank(self) -> bool:
        return bool(self._profile_fields)

    @property
    def snapshot(self) -> BankSnapshot | None:
        return self._snapshot

    def score(self, user_ids: IdsLike, item_ids: IdsLike) -> ScoreResult:
        """Probabilities for pairs ``(user_ids[i], item_ids[i])``; a single user ID is broadcast."""
        batch = self.encode(user_ids, item_ids)
        return ScoreResult(
            self.predict_ids(batch.x_ids), batch.unknown_user, batch.unknown_item, batch.bank_version
        )

    def encode(self, user_ids: IdsLike, item_ids: IdsLike) -> EncodedBatch:
        """The model input for these pairs (raw IDs -> field indices, bank codes -> profile fields)."""
        items = _raw_ids(item_ids)
        users = [as_raw_id(user_ids)] if isinstance(user_ids, str | int | np.integer) else _raw_ids(user_ids)
        if len(users) != len(items) and len(users) != 1:
            raise ScoringError(f"user_ids has {len(users)} entries but item_ids has {len(items)}")
        snap = self._snapshot  # read once: this call uses exactly this bank version
        n = len(items)
        x = np.empty((n, self.feature_map.num_fields), dtype=np.int64)

        # Deduplicate users: a request is usually one user with many items -> one bank lookup of one key,
        # and its row is broadcast over the items.
        if len(users) == 1:
            uniq, inverse = users, None
        else:
            positions: dict[str, int] = {}
            inverse = np.fromiter((positions.setdefault(u, len(positions)) for u in users), np.int64, n)
            uniq = list(positions)
        user_block = self._user_table[self._user_row.rows(uniq, len(uniq))]
        unknown_user = user_block[:, 0] == UNKNOWN_INDEX  # column 0 is the user_id field
        x[:, self._user_slot] = user_block if inverse is None else user_block[inverse]
        if snap is not None:
            # Backends guarantee codes in [0, K_p) or -1 (unknown): code + 1 is a valid index, 0 = unknown.
            codes, known = snap.bank.lookup_raw(uniq)
            profile = ctr_field_index(codes if snap.bank_columns is None else codes[:, snap.bank_columns])
            unknown_user |= ~known
            x[:, self._profile_slot] = profile if inverse is None else profile[inverse]
        item_index = self._item_index.rows(items, n)
        x[:, self._item_col] = item_index
        return EncodedBatch(
            x_ids=x,
            unknown_user=np.broadcast_to(unknown_user, (n,)) if inverse is None else unknown_user[inverse],
            unknown_item=item_index == UNKNOWN_INDEX,
            bank_version=None if snap is None else snap.version,
        )

    def predict_ids(self, x_ids: np.ndarray) -> np.ndarray:
        """Probabilities (N,) float32 for already-encoded field indices (N, F)."""
        if len(x_ids) == 0:
            return np.empty(0, dtype=np.float32)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(x_ids))
            return self._calibration.sigmoid(logits).to(torch.float32).numpy()

    # ------------------------------------------------------------------ hot reload

    def reload_bank(self, force: bool = False) -> ReloadResult:
        """Load the bank source's current version and swap it in atomically (no-op if unchanged).

        Raises ``BankReloadError`` (old bank keeps serving) if it cannot be loaded or does not fit the model.
        """
        source = self._source
        if source is None:
            raise BankReloadError("this scorer has no reloadable bank source (model without profiles?)")

        def build(old: BankSnapshot) -> BankSnapshot | None:
            signature = source.signature()  # read before opening: a publish in between triggers again later
            if not force and signature == old.signature:
                return None
            return self._make_snapshot(source.open(), source.describe(), signature)

        return self._swap(build)

    def set_bank(self, bank: ProfileLookup, source: str = "<in-memory>") -> ReloadResult:
        """Serve an already-loaded bank object (validated like a reload); ``reload_bank`` reads the source."""
        if not self._profile_fields:
            raise BankReloadError(f"model {self.model_name!r} has no profile fields; it uses no bank")
        return self._swap(lambda old: self._make_snapshot(bank, source, None))

    def _swap(self, build: Callable[[BankSnapshot], BankSnapshot | None]) -> ReloadResult:
        with self._reload_lock:  # serialises reloads only; scoring never takes a lock
            old = self._snapshot
            assert old is not None
            try:
                new = build(old)
            except Exception as e:  # noqa: BLE001 - any failure must leave the old bank serving
                self.last_reload_error = f"{type(e).__name__}: {e}"
                log.error(
                    "bank reload failed, still serving version %r: %s", old.version, self.last_reload_error
                )
                raise BankReloadError(
                    f"reload failed, still serving bank version {old.version!r}: {self.last_reload_error}"
                ) from e
            if new is None:
                return ReloadResult(False, old.version, old.version)
            self._snapshot = new  # the atomic switch: one reference assignment
            self.last_reload_error = None
            log.info("bank reloaded: version %r -> %r (%s)", old.version, new.version, new.source)
            return ReloadResult(new.version != old.version, old.version, new.version)

    def _make_snapshot(self, bank: Any, source: str, signature: Hashable) -> BankSnapshot:
        if getattr(bank, "kind", KIND_CODES) != KIND_CODES:
            raise BankReloadError(
                f"bank ({source}) is a {bank.kind!r} (without-VQ) bank: an offline ablation whose profiles "
                "live in the model's frozen embedding rows; serving needs a bank of profile codes"
            )
        expected_hash = self.info.get("dataset_hash")
        bank_hash = getattr(bank, "dataset_hash", None)
        if expected_hash and bank_hash and bank_hash != expected_hash:
            raise BankReloadError(
                f"bank ({source}) was built from dataset {bank_hash!r}; "
                f"the model was trained on {expected_hash!r}"
            )
        names = list(bank.profile_names)
        sizes = [int(k) for k in bank.codebook_sizes]
        columns = []
        for name in self._profile_fields:
            if name not in names:
                raise BankReloadError(f"bank ({source}) has profiles {names}; the model needs {name!r}")
            j = names.index(name)
            field_vocab = self.feature_map.fields[self.feature_map.index(name)].vocab_size
            if sizes[j] + 1 != field_vocab:
                raise BankReloadError(
                    f"bank ({source}) codebook {name!r} has {sizes[j]} codes; the model was trained with "
                    f"{field_vocab - 1}"
                )
            columns.append(j)
        self._check_pairing(bank, source)
        bank.lookup_raw([])  # a file bank builds its raw-id index here, before the swap, not on a request
        return BankSnapshot(
            bank=bank,
            version=getattr(bank, "version", None),
            dataset_hash=getattr(bank, "dataset_hash", None),
            source=source,
            signature=signature,
            loaded_at=time.time(),
            bank_columns=None if columns == list(range(len(names))) else tuple(columns),
        )

    def _check_pairing(self, bank: Any, source: str) -> None:
        """Refuse a bank whose codebooks are not those the model was trained with: the same code would mean
        another profile. Models record the bank version (and codebook hash) they were trained on; a bank fits
        when it is that version or was upserted from it (``FeatureBank.compatible_with``)."""
        trained_version = self.info.get("trained_with_bank")
        trained_codebooks = self.info.get("trained_codebook_hash")
        compatible = getattr(bank, "compatible_with", None)
        if not (trained_version or trained_codebooks) or compatible is None:
            return  # an in-memory lookup, or a model that recorded no bank: sizes were checked above
        if compatible(trained_version, trained_codebooks):
            return
        raise BankReloadError(
            f"bank ({source}) version {getattr(bank, 'version', None)!r} (codebooks "
            f"{getattr(bank, 'codebook_hash', None) or 'unrecorded'}) does not match model "
            f"{self.model_name!r}, trained with bank version {trained_version!r} (codebooks "
            f"{trained_codebooks or 'unrecorded'}); serve that version or one upserted from it, or retrain"
        )

    def describe(self) -> dict[str, Any]:
        snap = self._snapshot
        return {
            "model": self.model_name,
            "fields": self.feature_map.names,
            "num_users": len(self._user_row),
            "num_items": len(self._item_index),
            "bank_version": None if snap is None else snap.version,
            "dataset_hash": self.info.get("dataset_hash") if snap is None else snap.dataset_hash,
            "bank_source": None if snap is None else snap.source,
            "bank_loaded_at": None if snap is None else snap.loaded_at,
            "last_reload_error": self.last_reload_error,
            "calibration": None if self.calibration is None else dataclasses.asdict(self.calibration),
            **{k: v for k, v in self.info.items() if k not in ("dataset_hash",)},
        }


def _slot(cols: list[int]) -> slice | list[int]:
    """Columns as a slice when contiguous (a basic-indexing write is cheaper than a fancy one)."""
    if cols and cols == list(range(cols[0], cols[0] + len(cols))):
        return slice(cols[0], cols[0] + len(cols))
    return cols


__all__ = [
    "BankReloadError",
    "BankSnapshot",
    "EncodedBatch",
    "FileBankSource",
    "ReloadResult",
    "ScoreResult",
    "Scorer",
    "ScoringError",
    "as_raw_id",
    "bank_source",
]
