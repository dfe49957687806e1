"""The read interfaces of a feature bank (embedded file here; Redis in ``userip.serving``).

A bank maps users to one profile ID per profile. Codes of profile p lie in ``[0, K_p)``; ``UNKNOWN_CODE = -1``
is reserved for a user the bank does not know. A CTR field for profile p has ``vocab_size = K_p + 1`` and
index ``code + 1``, so an unknown user lands on index 0 (the CTR side's reserved unknown index).

Every bank states its ``BankIdentity``; ``ProfileBank`` reads it by dataset user id (CTR training),
``ProfileLookup`` by raw id (serving).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

UNKNOWN_CODE = -1


class FeatureBankError(ValueError):
    """A bank file is missing, corrupt, truncated, inconsistent, or built from another dataset."""


class BankMismatchError(FeatureBankError):
    """The feature bank was built from another dataset than the one in use."""


@runtime_checkable
class BankIdentity(Protocol):
    """What every bank says of itself: its profiles, their codebook sizes, its dataset and version."""

    profile_names: list[str]
    codebook_sizes: list[int]
    dataset_hash: str
    version: str


# Two reads of one bank, not one protocol: training reads by dataset user id, serving by raw id, and the Redis
# backend holds raw ids only (no ``lookup``). ``FeatureBank`` implements both.
@runtime_checkable
class ProfileLookup(BankIdentity, Protocol):
    """Serving's read (``FeatureBank``, ``userip.serving.redis_bank.RedisBank``): raw ids -> codes."""

    def lookup_raw(self, raw_user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """raw ids (N,) -> codes (N, P) int64 (``UNKNOWN_CODE`` where unknown), known_mask (N,) bool."""
        ...


@runtime_checkable
class ProfileBank(BankIdentity, Protocol):
    """The CTR stage's read (``FeatureBank``; ``userip.ctr.data`` builds on it): dataset user ids -> codes."""

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """(N,) int64 user ids -> (N, P) int64 codes in [0, K_p); -1 for a user the bank does not know."""
        ...


# Residual quantization (``quantization.num_levels`` > 1) gives each profile several codes; each level is a
# field of its own, named by this one rule. A bank of such fields records ``CODE_LEVELS_KEY`` in its manifest:
# {"profiles": the profiles, "num_levels": L}; its ``profile_names`` are then ``level_field_names(profiles,
# L)`` (checked by ``check_code_levels`` when the bank is built and loaded).
CODE_LEVELS_KEY = "code_levels"


def level_field_name(profile: str, level: int) -> str:
    """The field of ``profile``'s code at residual level ``level``: the profile's own name for level 0, else
    ``<profile>_r<level>`` (``hobby``, ``hobby_r1``, ``hobby_r2``)."""
    return profile if level == 0 else f"{profile}_r{level}"


def level_field_names(profiles: Sequence[str], num_levels: int) -> list[str]:
    """Every field of ``profiles`` with ``num_levels`` levels each, profile by profile (profile-major)."""
    return [level_field_name(name, level) for name in profiles for level in range(num_levels)]


def check_code_levels(manifest: dict, where: str) -> None:
    """A bank manifest's ``code_levels`` (if any) against its ``profile_names``: a ``FeatureBankError`` naming
    ``where`` when the fields are not exactly the profiles' levels."""
    levels = manifest.get(CODE_LEVELS_KEY)
    if levels is None:
        return
    try:
        profiles, num_levels = list(levels["profiles"]), levels["num_levels"]
        ok = isinstance(num_levels, int) and not isinstance(num_levels, bool) and num_levels >= 2
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise FeatureBankError(
            f"{where}: {CODE_LEVELS_KEY} must be {{'profiles': [...], 'num_levels': >= 2}}, got {levels!r}"
        )
    expected = level_field_names([str(p) for p in profiles], num_levels)
    if list(manifest.get("profile_names", [])) != expected:
        raise FeatureBankError(
            f"{where}: {CODE_LEVELS_KEY} says {num_levels} levels of profiles {profiles}, i.e. fields "
            f"{expected}; the bank has fields {manifest.get('profile_names')}"
        )


def ctr_field_index(codes: np.ndarray) -> np.ndarray:
    """Bank codes (..., P) -> CTR field indices: ``code + 1``, so ``UNKNOWN_CODE`` maps to 0."""
    return np.asarray(codes, dtype=np.int64) + 1


def check_bank_dataset(bank: BankIdentity, dataset_hash: str) -> None:
    """Refuse a bank whose recorded dataset content hash differs from ``dataset_hash`` (the one check,
    whoever reads the bank: CTR training, the bank loader, serving)."""
    if bank.dataset_hash != dataset_hash:
        raise BankMismatchError(
            f"feature bank (version {bank.version!r}) was built from dataset {bank.dataset_hash!r}, but the "
            f"dataset in use has content hash {dataset_hash!r}; rerun `userip profile` on this dataset"
        )
