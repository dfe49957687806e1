"""CTR tensors from a ``Dataset``: one ``x_ids`` LongTensor (N, F) and ``labels`` FloatTensor (N,) per split.

Field order: ``user_id``, ``item_id``, then one field per profile of the feature bank (named by the bank's
profile names), then the chosen observable user features. Vocabularies are fit on the train split, so users,
items and feature values never seen in training map to index 0. Profile field p has ``vocab_size = K_p + 1``
and index ``code + 1``; a user the bank does not know (code -1) maps to 0.

A ``continuous`` bank (the paper's "without VQ" ablation, Table 3) stores each user's projected profile
vectors instead of codes: its profile fields are then indexed by ``user_id + 1`` (0 = unknown) and
``CTRData.frozen_embeds`` holds, per such field, the (vocab, d) table of those vectors, which the recipe
copies into the model's field embedding and freezes. So the downstream model sees the continuous profiles, and
every model and trainer keep the one ``x_ids`` contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from userip.ctr.encoding import FeatureEncoder, Vocabulary
from userip.ctr.features import ITEM_FIELD, USER_FIELD, FeatureMap, Field, FieldSource
from userip.data.schema import SPLITS, Dataset
from userip.feature_bank import KIND_CODES, KIND_CONTINUOUS, ProfileBank, check_bank_dataset, ctr_field_index
from userip.feature_bank import BankMismatchError as BankMismatchError  # re-exported: CTR's import path

USER_COLUMN = 0  # user_id is always field 0 of x_ids (the trainer's user-id dropout relies on it)


def check_bank_matches(bank: ProfileBank, dataset: Dataset) -> None:
    """Refuse a bank built from another dataset than ``dataset`` (``BankMismatchError``)."""
    check_bank_dataset(bank, dataset.content_hash)


@dataclasses.dataclass(frozen=True)
class SplitTensors:
    x_ids: torch.Tensor  # (N, F) int64 field indices
    labels: torch.Tensor  # (N,) float32 in {0, 1}

    def __post_init__(self) -> None:
        if self.x_ids.ndim != 2 or self.x_ids.dtype != torch.long:
            raise ValueError(
                f"x_ids must be a 2-D int64 tensor, got {tuple(self.x_ids.shape)} {self.x_ids.dtype}"
            )
        if self.labels.shape != (self.x_ids.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} != ({self.x_ids.shape[0]},)")

    def __len__(self) -> int:
        return int(self.x_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class CTRData:
    feature_map: FeatureMap
    encoder: FeatureEncoder
    splits: dict[str, SplitTensors]
    # field name -> (vocab_size, d) float32 rows to copy into the embedding and freeze (continuous banks)
    frozen_embeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitTensors:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(f"no split {split!r}; have {sorted(self.splits)}") from None


def build_ctr_data(
    dataset: Dataset,
    bank: ProfileBank | None = None,
    user_features: Sequence[str] = (),
    check_bank_hash: bool = True,
) -> CTRData:
    """Encode every split of ``dataset`` into field indices and declare the fields in a ``FeatureMap``."""
    inter = dataset.interactions
    train = inter[inter["split"] == "train"]
    if len(train) == 0:
        raise ValueError("dataset has no train interactions; cannot fit vocabularies")
    missing = [c for c in user_features if c not in dataset.users.columns or c in ("user_id", "raw_user_id")]
    if missing:
        observable = [c for c in dataset.users.columns if c not in ("user_id", "raw_user_id")]
        raise ValueError(f"unknown user feature(s) {missing}; observable user features are {observable}")
    if bank is not None:
        if check_bank_hash:
            check_bank_matches(bank, dataset)
        if len(bank.profile_names) != len(bank.codebook_sizes):
            raise ValueError("feature bank: profile_names and codebook_sizes differ in length")

    vocabularies = {
        USER_FIELD: Vocabulary.fit(train["user_id"].to_numpy()),
        ITEM_FIELD: Vocabulary.fit(train["item_id"].to_numpy()),
    }
    # Observable features are per-user columns: fit on the train split's rows (the users seen in training).
    users = dataset.users.set_index("user_id")
    for name in user_features:
        vocabularies[name] = Vocabulary.fit(users[name].to_numpy()[train["user_id"].to_numpy()])

    fields = [
        Field(USER_FIELD, vocabularies[USER_FIELD].size, FieldSource.USER),
        Field(ITEM_FIELD, vocabularies[ITEM_FIELD].size, FieldSource.ITEM),
    ]
    continuous = bank is not None and getattr(bank, "kind", KIND_CODES) == KIND_CONTINUOUS
    frozen_embeds: dict[str, np.ndarray] = {}
    if continuous:
        vectors = continuous_profile_tables(bank, dataset.num_users)  # (U + 1, P, d)
        fields += [Field(name, dataset.num_users + 1, FieldSource.PROFILE) for name in bank.profile_names]
        frozen_embeds = {name: vectors[:, p] for p, name in enumerate(bank.profile_names)}
    elif bank is not None:
        fields += [
            Field(name, int(k) + 1, FieldSource.PROFILE)
            for name, k in zip(bank.profile_names, bank.codebook_sizes, strict=True)
        ]
    fields += [Field(name, vocabularies[name].size, FieldSource.USER) for name in user_features]
    feature_map = FeatureMap(tuple(fields))
    encoder = FeatureEncoder(vocabularies)

    # Users table is indexed by contiguous user_id (validated by Dataset), so positional lookup is exact.
    user_columns = {name: users[name].to_numpy() for name in user_features}
    splits: dict[str, SplitTensors] = {}
    for split in SPLITS:
        rows = inter[inter["split"] == split]
        if len(rows) == 0:
            continue
        user_ids = rows["user_id"].to_numpy(dtype=np.int64)
        columns = [
            encoder.encode(USER_FIELD, user_ids),
            encoder.encode(ITEM_FIELD, rows["item_id"].to_numpy(dtype=np.int64)),
        ]
        if continuous:
            columns += [user_ids + 1] * len(bank.profile_names)
        elif bank is not None:
            columns += list(profile_indices(bank, user_ids).T)
        columns += [encoder.encode(name, user_columns[name][user_ids]) for name in user_features]
        x_ids = torch.from_numpy(np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.int64))
        labels = torch.from_numpy(rows["label"].to_numpy(dtype=np.float32))
        splits[split] = SplitTensors(x_ids, labels)
    return CTRData(feature_map, encoder, splits, frozen_embeds)


def continuous_profile_tables(bank: ProfileBank, num_users: int) -> np.ndarray:
    """(num_users + 1, P, d) float32: row 0 (unknown) is zeros, row u + 1 is user u's stored vectors."""
    vectors = bank.lookup_vectors(np.arange(num_users, dtype=np.int64))  # type: ignore[attr-defined]
    table = np.zeros((num_users + 1, *vectors.shape[1:]), dtype=np.float32)
    table[1:] = vectors
    return table


def freeze_field_rows(model: torch.nn.Module, feature_map: FeatureMap, frozen: dict[str, np.ndarray]) -> None:
    """Copy ``frozen[field]`` into the rows of ``field`` in the model's field embedding and keep them fixed.

    Only models whose field embedding is ``model.embedding`` (DCN, DCNv2, DeepFM, PNN, AutoInt, ...) qualify,
    and the vectors' width must equal ``embedding_dim``. A gradient hook zeroes those rows' gradients; with no
    gradient and no weight decay on them, Adam leaves them exactly as copied.
    """
    from userip.ctr.layers import FieldEmbedding

    embedding = getattr(model, "embedding", None)
    if not isinstance(embedding, FieldEmbedding):
        raise ValueError(
            f"{type(model).__name__} has no single field embedding to hold continuous profiles; "
            "use a continuous (without-VQ) bank with DCN, DCNv2, DeepFM, PNN or AutoInt"
        )
    weight = embedding.weight
    offsets = np.concatenate([[0], np.cumsum(feature_map.vocab_sizes)])
    row_mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool)
    with torch.no_grad():
        for name, table in frozen.items():
            f = feature_map.index(name)
            if table.shape != (feature_map.fields[f].vocab_size, weight.shape[1]):
                raise ValueError(
                    f"continuous profile {name!r}: vectors of shape {table.shape}, but the field needs "
                    f"({feature_map.fields[f].vocab_size}, embedding_dim={weight.shape[1]}); set the "
                    "quantization's surrogate_proj_dim equal to the CTR model's embedding_dim"
                )
            weight[offsets[f] : offsets[f + 1]] = torch.from_numpy(table)
            row_mask[offsets[f] : offsets[f + 1]] = True
    weight.register_hook(lambda grad: grad.masked_fill(row_mask.to(grad.device), 0.0))


def profile_indices(bank: ProfileBank, user_ids: np.ndarray) -> np.ndarray:
    """(N, P) field indices ``code + 1`` from the bank, 0 for unknown users; checks codes against K_p."""
    codes = np.asarray(bank.lookup(np.asarray(user_ids, dtype=np.int64)), dtype=np.int64)
    num_profiles = len(bank.profile_names)
    if codes.shape != (len(user_ids), num_profiles):
        raise ValueError(
            f"bank.lookup returned shape {codes.shape}, expected ({len(user_ids)}, {num_profiles})"
        )
    sizes = np.asarray(bank.codebook_sizes, dtype=np.int64)
    if (codes < -1).any() or (codes >= sizes).any():
        raise ValueError(f"bank.lookup returned codes outside [-1, K_p) for K = {sizes.tolist()}")
    return ctr_field_index(codes)
