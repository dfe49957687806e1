"""Banks of residual-level code fields (``quantization.num_levels`` > 1): extra ordinary fields, recorded in
the manifest's ``code_levels`` and checked when the bank is built and loaded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from userip.feature_bank import (
    CODE_LEVELS_KEY,
    FeatureBank,
    FeatureBankError,
    level_field_name,
    level_field_names,
)
from userip.feature_bank.embedded import METADATA_KEY

FIELDS = ["hobby", "hobby_r1", "background", "background_r1"]
SIZES = [4, 4, 3, 2]


def _level_bank(num_users: int = 6, levels: dict | None = None) -> FeatureBank:
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, k, num_users) for k in SIZES], axis=1)
    codes[1] = -1  # a user without a profile
    return FeatureBank.build(
        profile_names=FIELDS,
        codebooks=[rng.normal(size=(k, 6)).astype(np.float32) for k in SIZES],
        codes=codes,
        raw_user_ids=[f"u{i}" for i in range(num_users)],
        dataset_hash="hash-a",
        extra={CODE_LEVELS_KEY: levels or {"profiles": ["hobby", "background"], "num_levels": 2}},
    )


def test_field_naming_rule():
    assert level_field_name("hobby", 0) == "hobby" and level_field_name("hobby", 2) == "hobby_r2"
    assert level_field_names(["hobby", "background"], 2) == FIELDS
    assert level_field_names(["hobby"], 1) == ["hobby"]


def test_level_fields_round_trip_and_upsert_keeps_the_levels(tmp_path):
    bank = _level_bank()
    bank.write(tmp_path / "bank")
    loaded = FeatureBank.load(tmp_path / "bank", expected_dataset_hash="hash-a")
    assert loaded.profile_names == FIELDS and loaded.codebook_sizes == SIZES and loaded.num_levels == 2
    assert np.array_equal(loaded.lookup(np.arange(6)), bank.codes)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.codebooks, bank.codebooks))
    codes, known = loaded.lookup_raw(["u0", "u1", "nobody"])
    assert known.tolist() == [True, False, False] and codes.shape == (3, 4)
    updated = loaded.upsert(["new"], np.array([[1, 2, 0, 1]]))
    assert updated.manifest[CODE_LEVELS_KEY] == bank.manifest[CODE_LEVELS_KEY] and updated.num_levels == 2
    assert updated.lookup_raw(["new"])[0].tolist() == [[1, 2, 0, 1]]
    assert FeatureBank.build(
        profile_names=["hobby"], codebooks=[np.zeros((2, 3))], codes=np.zeros((1, 1), int),
        raw_user_ids=["a"], dataset_hash="h",
    ).num_levels == 1  # fmt: skip


def test_levels_that_disagree_with_the_fields_are_refused(tmp_path):
    with pytest.raises(FeatureBankError, match=r"3 levels of profiles \['hobby', 'background'\]"):
        _level_bank(levels={"profiles": ["hobby", "background"], "num_levels": 3})
    with pytest.raises(FeatureBankError, match="num_levels"):
        _level_bank(levels={"profiles": ["hobby", "background"], "num_levels": 1})
    # A version file whose manifest was edited after writing: refused on load, naming the file.
    file = _level_bank().write(tmp_path / "bank")
    table = pq.read_table(file)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["manifest"][CODE_LEVELS_KEY]["profiles"] = ["hobby", "genre"]
    edited = tmp_path / "edited.parquet"
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), edited)
    with pytest.raises(FeatureBankError, match=r"edited\.parquet.*fields"):
        FeatureBank.load(edited)
