"""Raw ids -> integer rows: the one rule behind the dataset's ids, the bank's rows and the CTR field indices.

Raw ids are held in row order: ``ids[i]`` is row ``first_row + i``, and an id not held maps to ``missing``, a
reserved value outside the rows. The dataset numbers the raw keys it keeps 0.. in their sorted order
(``dense_rows``, in ``userip.data.preprocess``); the feature bank's row ``i`` is the dataset's user ``i``
(``missing = UNKNOWN_ROW``); a CTR field's rows start at 1 and an unseen value is 0 (``userip.ctr.encoding``,
``userip.serving.scorer``).

A scalar lookup is one ``dict.get`` (the serving hot path); ``encode`` maps a whole array through a
``pandas.Index`` hash lookup, with no per-row Python.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

UNKNOWN_ROW = -1  # the row of an id not held (dataset and bank rows start at 0)


class IdIndex:
    """Raw ids in row order -> rows ``first_row + i``; an id not held -> ``missing``.

    ``reserved``: an id that marks a row held by no one (the bank's unfilled rows, ``""``); it may repeat and
    maps to ``missing``. Every other id must be unique.
    """

    def __init__(
        self,
        ids: Iterable[Hashable],
        *,
        first_row: int = 0,
        missing: int = UNKNOWN_ROW,
        reserved: Hashable | None = None,
    ) -> None:
        self.ids = tuple(ids)
        self.first_row, self.missing, self.reserved = first_row, missing, reserved
        self.row_of: dict[Any, int] = {
            raw: first_row + i for i, raw in enumerate(self.ids) if reserved is None or raw != reserved
        }
        held = len(self.ids) if reserved is None else sum(raw != reserved for raw in self.ids)
        if len(self.row_of) != held:
            raise ValueError(f"raw ids must be unique ({held - len(self.row_of)} repeated)")
        self._index: tuple[pd.Index, np.ndarray] | None = None

    def __len__(self) -> int:
        """The number of ids held (reserved rows not counted)."""
        return len(self.row_of)

    def __iter__(self) -> Iterator[Hashable]:
        """The ids held, in row order."""
        return iter(self.row_of)

    def __contains__(self, raw: object) -> bool:
        return raw in self.row_of

    def get(self, raw: Hashable) -> int:
        return self.row_of.get(raw, self.missing)

    def rows(self, raw_ids: Iterable[Hashable], count: int = -1) -> np.ndarray:
        """int64 rows of ``raw_ids`` (``count`` of them when known), ``missing`` where not held."""
        get, missing = self.row_of.get, self.missing
        return np.fromiter((get(raw, missing) for raw in raw_ids), np.int64, count)

    def encode(self, raw_ids: ArrayLike) -> np.ndarray:
        """``rows`` for an array, vectorised: int64 rows, ``missing`` where not held (or missing)."""
        if self._index is None:  # built on first use: a pandas hash index, and the rows plus ``missing``
            rows = np.fromiter(self.row_of.values(), np.int64, len(self.row_of))
            self._index = pd.Index(list(self.row_of)), np.append(rows, np.int64(self.missing))
        index, rows_or_missing = self._index
        return rows_or_missing[index.get_indexer(np.asarray(raw_ids))]  # position -1 -> the last: missing


def dense_rows(codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's numbering in code space (codes of sorted raw keys, as ``pandas.factorize(sort=True)``):
    (the codes present, in order; per code its row, the rank among those present, ``UNKNOWN_ROW`` if absent).

    O(n): ``rows[codes]`` gives each code's contiguous id without a sort.
    """
    present = np.zeros(num_codes, dtype=bool)
    present[codes] = True
    rows = (np.cumsum(present) - 1).astype(np.int64)
    rows[~present] = UNKNOWN_ROW
    return np.flatnonzero(present), rows
