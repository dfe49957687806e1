"""Embedded FeatureBank: write / reload / lookup, reserved unknown code, upsert, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from tests.feature_bank.conftest import make_bank

from userip.ctr.data import ProfileBank as CTRProfileBank
from userip.feature_bank import (
    UNKNOWN_CODE,
    BankIdentity,
    FeatureBank,
    FeatureBankError,
    ProfileBank,
    ProfileLookup,
    ctr_field_index,
)


def test_write_reload_lookup_equality(bank, tmp_path):
    path = bank.write(tmp_path / "bank")
    assert path.exists() and path.parent.name == "versions"
    loaded = FeatureBank.load(tmp_path / "bank", expected_dataset_hash="hash-a")
    # One bank, two reads sharing one identity: by raw id (serving) and by dataset user id (CTR training).
    assert isinstance(loaded, ProfileLookup) and isinstance(loaded, ProfileBank)
    assert isinstance(loaded, BankIdentity) and CTRProfileBank is ProfileBank
    assert loaded.version == bank.version and loaded.profile_names == ["hobby", "background"]
    assert loaded.codebook_sizes == [4, 3] and loaded.dataset_hash == "hash-a"
    ids = np.array([4, 0, 2, 2], dtype=np.int64)
    assert np.array_equal(loaded.lookup(ids), bank.codes[ids])
    assert loaded.lookup(ids).dtype == np.int64
    for p, name in enumerate(bank.profile_names):
        assert np.array_equal(loaded.codebook_vectors(p), bank.codebook_vectors(name))
    for key in ("lm", "template", "config", "created", "dataset_hash", "version"):
        assert loaded.manifest[key] == bank.manifest[key]
    assert FeatureBank.load(path).version == bank.version  # a version file loads directly too


def test_unknown_users_get_the_reserved_code(bank):
    codes = bank.lookup(np.array([0, 5, -1, 10**9]))
    assert np.array_equal(codes[1:], np.full((3, 2), UNKNOWN_CODE))
    raw_codes, known = bank.lookup_raw(["u3", "stranger", "u0"])
    assert known.tolist() == [True, False, True]
    assert np.array_equal(raw_codes[0], bank.codes[3]) and (raw_codes[1] == UNKNOWN_CODE).all()
    assert ctr_field_index(raw_codes)[1].tolist() == [0, 0]  # unknown -> CTR index 0
    assert np.array_equal(ctr_field_index(raw_codes)[0], bank.codes[3] + 1)


def test_hash_mismatch_is_refused(bank, tmp_path):
    bank.write(tmp_path / "bank")
    with pytest.raises(FeatureBankError, match="built from dataset 'hash-a'.*'hash-b'"):
        FeatureBank.load(tmp_path / "bank", expected_dataset_hash="hash-b")


def test_codebook_size_below_two_is_refused():
    with pytest.raises(FeatureBankError, match="needs >= 2"):
        FeatureBank.build(
            profile_names=["hobby"],
            codebooks=[np.zeros((1, 3))],
            codes=np.zeros((2, 1), dtype=np.int64),
            raw_user_ids=["a", "b"],
            dataset_hash="h",
        )
    with pytest.raises(FeatureBankError, match=r"\[0, 3\)"):
        make_bank().upsert(["u9"], np.array([[0, 3]]))


def test_upsert_adds_users_without_touching_others(bank, tmp_path):
    bank.write(tmp_path / "bank")
    updated = bank.upsert(["new1", "u2"], np.array([[3, 2], [0, 0]]), note="test")
    updated.write(tmp_path / "bank")
    loaded = FeatureBank.load(tmp_path / "bank")
    assert loaded.version == updated.version != bank.version
    assert loaded.manifest["parent_version"] == bank.version
    assert loaded.manifest["upserts"][-1]["note"] == "test"
    codes, known = loaded.lookup_raw(["new1", "u2", "u0", "u1", "u3", "u4"])
    assert known.all() and codes[0].tolist() == [3, 2] and codes[1].tolist() == [0, 0]
    assert np.array_equal(codes[2:], bank.codes[[0, 1, 3, 4]])
    assert loaded.lookup(np.array([5])).tolist() == [[3, 2]]  # appended row
    old_file = tmp_path / "bank" / "versions" / f"{bank.version}.parquet"
    assert FeatureBank.load(old_file).version == bank.version  # previous version still readable


def test_continuous_bank_stores_vectors(tmp_path):
    vectors = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    bank = make_bank(profile_vectors=vectors, kind="continuous")
    bank.write(tmp_path / "b")
    loaded = FeatureBank.load(tmp_path / "b")
    assert loaded.kind == "continuous"
    assert np.array_equal(loaded.lookup_vectors(np.array([1, 4])), vectors[[1, 4]])
    assert (loaded.lookup_vectors(np.array([7])) == 0).all()
    with pytest.raises(FeatureBankError, match="stores no profile vectors"):
        make_bank().lookup_vectors(np.array([0]))


def test_old_versions_are_pruned_but_current_kept(tmp_path):
    for seed in range(5):
        current = make_bank(seed=seed)
        current.write(tmp_path / "bank", keep_versions=2)
    files = sorted((tmp_path / "bank" / "versions").glob("*.parquet"))
    assert len(files) == 2 and f"{current.version}.parquet" in [f.name for f in files]
    assert FeatureBank.load(tmp_path / "bank").version == current.version


def test_repeated_raw_ids_are_refused_at_build_and_load(bank, tmp_path):
    import pyarrow.parquet as pq

    with pytest.raises(FeatureBankError, match=r"raw_user_ids must be unique \(2 repeated\)"):
        FeatureBank.build(
            profile_names=["hobby"],
            codebooks=[np.zeros((2, 3))],
            codes=np.zeros((4, 1), dtype=np.int64),
            raw_user_ids=["a", "b", "a", "a"],
            dataset_hash="h",
        )
    # "" marks a reserved, unfilled row: it may repeat, and is nobody's id
    sparse = bank.upsert(["u7"], np.array([[1, 2]]), user_ids=np.array([7]))
    assert sparse.raw_user_ids[5:7] == ["", ""]
    codes, known = sparse.lookup_raw(["u7", "", "u0"])
    assert known.tolist() == [True, False, True] and codes[0].tolist() == [1, 2]
    # a file whose ids repeat (written by hand: build refuses it) is refused on load
    bank.raw_user_ids[1] = "u0"
    file = tmp_path / "dup.parquet"
    pq.write_table(bank._to_arrow(), file)
    with pytest.raises(FeatureBankError, match=r"must be unique \(1 repeated\)"):
        FeatureBank.load(file)
