"""The read interface every feature-bank backend implements (embedded file here; Redis in ``userip.serving``).

A bank maps users to one profile ID per profile. Codes of profile p lie in ``[0, K_p)``; ``UNKNOWN_CODE = -1``
is reserved for a user the bank does not know. A CTR field for profile p has ``vocab_size = K_p + 1`` and
index
``code + 1``, so an unknown user lands on index 0 (the CTR side's reserved unknown index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

UNKNOWN_CODE = -1


class FeatureBankError(ValueError):
    """A bank file is missing, corrupt, truncated, inconsistent, or built from another dataset."""


@runtime_checkable
class ProfileLookup(Protocol):
    profile_names: list[str]
    codebook_sizes: list[int]
    dataset_hash: str
    version: str

    def lookup_raw(self, raw_user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """raw ids (N,) -> codes (N, P) int64 (``UNKNOWN_CODE`` where unknown), known_mask (N,) bool."""
        ...


def ctr_field_index(codes: np.ndarray) -> np.ndarray:
    """Bank codes (..., P) -> CTR field indices: ``code + 1``, so ``UNKNOWN_CODE`` maps to 0."""
    return np.asarray(codes, dtype=np.int64) + 1
