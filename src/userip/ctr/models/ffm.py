"""FFM: Field-aware Factorization Machines.

Yuchin Juan, Yong Zhuang, Wei-Sheng Chin, Chih-Jen Lin. "Field-aware Factorization Machines for CTR
Prediction". RecSys 2016. Implemented: logit = w0 + sum_i w[x_i] + sum_{i<j} <v_{x_i, f_j}, v_{x_j, f_i}>:
every value keeps one latent vector per field it can meet (the paper's model plus the usual linear term).
"""

from __future__ import annotations

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import FieldAwareEmbedding, FieldAwareInteraction, LinearTerm
from userip.ctr.models.base import CTRModel


class FFM(CTRModel):
    def __init__(self, feature_map: FeatureMap, embedding_dim: int = 8) -> None:
        super().__init__(feature_map, embedding_dim)
        self._require_pairs("FFM")
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldAwareEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.interaction = FieldAwareInteraction(self.num_fields)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        pairs = self.interaction(self.embedding(x_ids))  # (B, P)
        return self.linear(x_ids) + pairs.sum(dim=1)  # (B,)
