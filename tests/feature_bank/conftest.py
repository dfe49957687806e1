"""Fixtures for the feature-bank tests: a tiny bank of 5 users and 2 profiles."""

from __future__ import annotations

import numpy as np
import pytest

from userip.feature_bank import FeatureBank


def make_bank(seed: int = 0, num_users: int = 5, dataset_hash: str = "hash-a", **kwargs) -> FeatureBank:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, 4, num_users), rng.integers(0, 3, num_users)], axis=1)
    return FeatureBank.build(
        profile_names=["hobby", "background"],
        codebooks=[rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)],
        codes=codes,
        raw_user_ids=[f"u{i}" for i in range(num_users)],
        dataset_hash=dataset_hash,
        lm="tiny-lm",
        template="This user's hobby is [z] ...",
        config={"beta": 0.001},
        **kwargs,
    )


@pytest.fixture
def bank() -> FeatureBank:
    return make_bank()
