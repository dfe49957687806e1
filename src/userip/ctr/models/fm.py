"""FM: Factorization Machines.

Steffen Rendle. "Factorization Machines". ICDM 2010. Implemented: degree-2 FM,
logit = w0 + sum_i w[x_i] + sum_{i<j} <v_i, v_j>, with the O(F D) sum-square identity (paper, lemma 3.1).
"""

from __future__ import annotations

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import FieldEmbedding, FMInteraction, LinearTerm
from userip.ctr.models.base import CTRModel


class FM(CTRModel):
    extendable = True  # userip.ctr.extend: new fields can start at zero

    def __init__(self, feature_map: FeatureMap, embedding_dim: int = 8) -> None:
        super().__init__(feature_map, embedding_dim)
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.fm = FMInteraction()

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.linear(x_ids) + self.fm(self.embedding(x_ids))  # (B,)
