import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from userip.ctr.data import BankMismatchError, ProfileBank, build_ctr_data
from userip.ctr.encoding import FeatureEncoder, Vocabulary
from userip.ctr.features import FieldSource
from userip.data.schema import Dataset


def tiny_dataset() -> Dataset:
    """4 users, 3 items. User 3 and item 2 occur only in test; gender 'x' belongs to user 3 only."""
    rows = [  # user, item, label, split
        (0, 0, 1, "train"),
        (0, 1, 0, "train"),
        (1, 0, 1, "train"),
        (2, 1, 0, "train"),
        (1, 1, 1, "valid"),
        (3, 0, 0, "test"),
        (2, 2, 1, "test"),
    ]
    u, i, y, s = zip(*rows)
    interactions = pd.DataFrame(
        {
            "user_id": np.array(u, dtype=np.int64),
            "item_id": np.array(i, dtype=np.int64),
            "rating": np.where(np.array(y) == 1, 5.0, 1.0).astype(np.float32),
            "label": np.array(y, dtype=np.int8),
            "timestamp": np.arange(len(rows), dtype=np.int64),
            "split": list(s),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.arange(3, dtype=np.int64),
            "raw_item_id": ["a", "b", "c"],
            "title": ["A", "B", "C"],
            "categories": [["x"], ["y"], ["z"]],
            "brand": ["", "", ""],
            "price": [np.nan] * 3,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(4, dtype=np.int64),
            "raw_user_id": ["u0", "u1", "u2", "u3"],
            "gender": ["m", "f", "f", "x"],
        }
    )
    return Dataset(interactions, items, users, source="tiny")


@dataclasses.dataclass
class ArrayBankDouble:
    """Test double of the feature bank: codes from an array, -1 for users beyond it."""

    codes: np.ndarray  # (num_known_users, P)
    profile_names: list[str]
    codebook_sizes: list[int]
    dataset_hash: str
    version: str = "test"

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        out = np.full((len(user_ids), self.codes.shape[1]), -1, dtype=np.int64)
        known = user_ids < len(self.codes)
        out[known] = self.codes[user_ids[known]]
        return out


# ------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_fit_encode_decode():
    vocab = Vocabulary.fit(np.array([30, 10, 10, 20]))
    assert vocab.values == (10, 20, 30)
    assert vocab.size == 4
    np.testing.assert_array_equal(vocab.encode([20, 99, 10, 30]), [2, 0, 1, 3])
    assert vocab.encode([20]).dtype == np.int64
    assert vocab.decode([0, 3]) == [None, 30]


def test_vocabulary_strings_missing_and_min_count():
    vocab = Vocabulary.fit(np.array(["b", "a", None, "b"], dtype=object))
    assert vocab.values == ("a", "b")
    np.testing.assert_array_equal(vocab.encode(np.array(["b", "zz", None], dtype=object)), [2, 0, 0])
    assert Vocabulary.fit(["a", "a", "b"], min_count=2).values == ("a",)
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(("a", "a"))


def test_encoder_roundtrip(tmp_path):
    encoder = FeatureEncoder({"user_id": Vocabulary((3, 7)), "gender": Vocabulary(("f", "m"))})
    encoder.save(tmp_path / "encoder.json")
    loaded = FeatureEncoder.load(tmp_path / "encoder.json")
    assert loaded.vocabularies == encoder.vocabularies
    np.testing.assert_array_equal(loaded.encode("user_id", [7, 3, 5]), [2, 1, 0])
    with pytest.raises(KeyError, match="no vocabulary"):
        loaded.encode("age", [1])
    with pytest.raises(ValueError, match="format_version"):
        FeatureEncoder.from_dict({"format_version": 99, "vocabularies": {}})


# ------------------------------------------------------------------------------------------ ctr data
def test_build_ctr_data_fits_on_train_only():
    data = build_ctr_data(tiny_dataset(), user_features=["gender"])
    fm = data.feature_map
    assert fm.names == ["user_id", "item_id", "gender"]
    assert fm.vocab_sizes == [4, 3, 3]  # users {0,1,2}, items {0,1}, genders {f, m} seen in train, + unknown
    assert [f.source for f in fm.fields] == [FieldSource.USER, FieldSource.ITEM, FieldSource.USER]
    test = data["test"]
    # (3, 0): unseen user -> 0, item 0 -> 1, unseen gender 'x' -> 0
    # (2, 2): user 2 -> 3, unseen item -> 0, 'f' -> 1
    torch.testing.assert_close(test.x_ids, torch.tensor([[0, 1, 0], [3, 0, 1]]))
    torch.testing.assert_close(test.labels, torch.tensor([0.0, 1.0]))
    assert len(data["train"]) == 4 and len(data["valid"]) == 1
    assert data["train"].x_ids.dtype == torch.long and data["train"].labels.dtype == torch.float32
    for split in data.splits.values():  # every index inside its field's vocabulary
        assert (split.x_ids < torch.tensor(fm.vocab_sizes)).all() and (split.x_ids >= 0).all()


def test_profile_fields_from_bank():
    ds = tiny_dataset()
    # Users 0..2 known; user 3 unknown to the bank (-1 -> index 0).
    bank = ArrayBankDouble(
        np.array([[0, 2], [3, 0], [1, 1]]), ["hobby", "background"], [4, 3], ds.content_hash
    )
    assert isinstance(bank, ProfileBank)
    data = build_ctr_data(ds, bank)
    fm = data.feature_map
    assert fm.names == ["user_id", "item_id", "hobby", "background"]
    assert fm.vocab_sizes[2:] == [5, 4]
    assert fm.fields_from(FieldSource.PROFILE) == list(fm.fields[2:])
    train_users = [0, 0, 1, 2]
    expected = bank.codes[train_users] + 1
    np.testing.assert_array_equal(data["train"].x_ids[:, 2:].numpy(), expected)
    np.testing.assert_array_equal(data["test"].x_ids[:, 2:].numpy(), [[0, 0], [2, 2]])


def test_bank_hash_mismatch_and_bad_codes():
    ds = tiny_dataset()
    stale = ArrayBankDouble(np.zeros((4, 1), dtype=np.int64), ["hobby"], [2], "0123456789abcdef")
    with pytest.raises(BankMismatchError, match="0123456789abcdef"):
        build_ctr_data(ds, stale)
    out_of_range = ArrayBankDouble(np.full((4, 1), 5), ["hobby"], [2], ds.content_hash)
    with pytest.raises(ValueError, match="outside"):
        build_ctr_data(ds, out_of_range)


def test_unknown_user_feature_is_named():
    with pytest.raises(ValueError, match="occupation.*observable user features are \\['gender'\\]"):
        build_ctr_data(tiny_dataset(), user_features=["occupation"])
