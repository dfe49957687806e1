"""AFM: Attentional Factorization Machines.

Jun Xiao, Hao Ye, Xiangnan He, Hanwang Zhang, Fei Wu, Tat-Seng Chua. "Attentional Factorization Machines:
Learning the Weight of Feature Interactions via Attention Networks". IJCAI 2017. Implemented: eq. 5,
logit = w0 + sum_i w[x_i] + p^T sum_{i<j} a_ij (v_i * v_j) with a one-hidden-layer attention network over the
pairwise interactions and dropout on the pooled interaction vector. The paper's L2 on the attention weights is
left to the trainer (weight decay).
"""

from __future__ import annotations

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import AttentionalPooling, FieldEmbedding, LinearTerm
from userip.ctr.models.base import CTRModel


class AFM(CTRModel):
    def __init__(
        self, feature_map: FeatureMap, embedding_dim: int = 8, attention_dim: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self._require_pairs("AFM")
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.afm = AttentionalPooling(self.num_fields, embedding_dim, attention_dim, dropout)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.linear(x_ids) + self.afm(self.embedding(x_ids))  # (B,)
