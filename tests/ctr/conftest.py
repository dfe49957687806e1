"""Shared CTR fixtures: a small feature map and a planted-interaction dataset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sklearn.metrics import roc_auc_score

from userip.ctr.features import FeatureMap, Field, FieldSource

# 4 fields; index 0 of each is the reserved unknown value.
VOCAB_SIZES = (9, 9, 6, 6)


@pytest.fixture(scope="session")
def feature_map() -> FeatureMap:
    sources = (FieldSource.USER, FieldSource.ITEM, FieldSource.PROFILE, FieldSource.CONTEXT)
    return FeatureMap(tuple(Field(f"f{i}", v, s) for i, (v, s) in enumerate(zip(VOCAB_SIZES, sources))))


@pytest.fixture
def x_ids() -> torch.Tensor:
    """(6, 4) batch covering index 0 and the largest index of every field."""
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randint(0, v, (6,), generator=g) for v in VOCAB_SIZES], dim=1)
    x[0] = 0
    x[1] = torch.tensor(VOCAB_SIZES) - 1
    return x


@dataclasses.dataclass(frozen=True)
class PlantedData:
    x_train: torch.Tensor  # (N, 4) long
    y_train: torch.Tensor  # (N,) float
    x_test: torch.Tensor
    y_test: torch.Tensor
    bayes_auc: float  # AUC of the true click probabilities on the test split


@pytest.fixture(scope="session")
def planted_data() -> PlantedData:
    """Labels depend only on a pure interaction of fields 0 and 1; fields 2 and 3 are noise.

    logit = T[x0, x1] with T a random 8x8 table, double-centred (every row and column sums to 0), so neither
    field has a main effect: a first-order model (LR) stays near AUC 0.5, while any model that crosses the two
    fields can approach the Bayes AUC (~0.88 with the scale 2.5 used here).
    """
    g = torch.Generator().manual_seed(0)
    table = torch.randn(8, 8, generator=g)
    table = table - table.mean(dim=0, keepdim=True)
    table = table - table.mean(dim=1, keepdim=True)
    table = table / table.std() * 2.5

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.stack([torch.randint(1, v, (n,), generator=g) for v in VOCAB_SIZES], dim=1)
        p = torch.sigmoid(table[x[:, 0] - 1, x[:, 1] - 1])
        return x, (torch.rand(n, generator=g) < p).float(), p

    x_train, y_train, _ = sample(4096)
    x_test, y_test, p_test = sample(2048)
    return PlantedData(x_train, y_train, x_test, y_test, float(roc_auc_score(y_test, p_test)))
