"""Vocabularies: raw categorical values -> contiguous field indices, with 0 reserved for unseen values.

A vocabulary is fit on the training split only, so a user, item or feature value that appears only in
valid/test maps to index 0 (``UNKNOWN_INDEX``), exactly as an unseen value would at serving time. Values are
kept in sorted order, so fitting the same data twice gives the same indices. The mapping is the data layer's
``userip.data.ids.IdIndex`` with rows from 1 and 0 for a value not held; encoding is vectorised through its
``pandas.Index`` hash lookup: no per-row Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from userip.ctr.features import UNKNOWN_INDEX
from userip.data.ids import IdIndex
from userip.utils.io import atomic_write_json, read_json

ENCODER_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
    """Known values in index order: ``values[i]`` has field index ``i + 1``; index 0 means unseen."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        try:
            ids = IdIndex(self.values, first_row=UNKNOWN_INDEX + 1, missing=UNKNOWN_INDEX)
        except ValueError:
            raise ValueError("Vocabulary values must be unique") from None
        object.__setattr__(self, "ids", ids)

    @classmethod
    def fit(cls, raw_values: ArrayLike, min_count: int = 1) -> Vocabulary:
        """Sorted distinct values seen at least ``min_count`` times (rarer ones will encode to 0)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = pd.Series(np.asarray(raw_values)).value_counts(sort=False, dropna=True)
        kept = counts.index[counts.to_numpy() >= min_count]
        return cls(tuple(v.item() if isinstance(v, np.generic) else v for v in sorted(kept)))

    @property
    def size(self) -> int:
        """Field vocabulary size, counting the reserved unseen index."""
        return len(self.values) + 1

    def encode(self, raw_values: ArrayLike) -> np.ndarray:
        """int64 indices in [0, size): known values -> 1.., unseen (or missing) -> 0."""
        return self.ids.encode(raw_values)  # type: ignore[attr-defined, no-any-return]

    def decode(self, indices: ArrayLike) -> list[Any]:
        """Raw values for field indices; the unseen index decodes to None."""
        return [None if i == UNKNOWN_INDEX else self.values[i - 1] for i in np.asarray(indices).tolist()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)

    def to_list(self) -> list[Any]:
        return list(self.values)


@dataclasses.dataclass(frozen=True)
class FeatureEncoder:
    """One vocabulary per raw-valued field (profile fields need none: bank codes are already indices)."""

    vocabularies: Mapping[str, Vocabulary]

    def encode(self, name: str, raw_values: ArrayLike) -> np.ndarray:
        try:
            vocab = self.vocabularies[name]
        except KeyError:
            raise KeyError(f"no vocabulary for field {name!r}; have {sorted(self.vocabularies)}") from None
        return vocab.encode(raw_values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": ENCODER_FORMAT_VERSION,
            "vocabularies": {name: v.to_list() for name, v in self.vocabularies.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureEncoder:
        if data.get("format_version") != ENCODER_FORMAT_VERSION:
            raise ValueError(
                f"encoder format_version {data.get('format_version')!r}, expected {ENCODER_FORMAT_VERSION}"
            )
        return cls({name: Vocabulary(tuple(values)) for name, values in data["vocabularies"].items()})

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoder:
        return cls.from_dict(read_json(path))
