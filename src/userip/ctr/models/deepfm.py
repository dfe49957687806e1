"""DeepFM: a factorization-machine based neural network.

Huifeng Guo, Ruiming Tang, Yunming Ye, Zhenguo Li, Xiuqiang He. "DeepFM: A Factorization-Machine based Neural
Network for CTR Prediction". IJCAI 2017. Implemented: the paper's model, logit = FM(x) + DNN(x), where the FM
component (first order + pairwise) and the MLP share one field embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldEmbedding, FMInteraction, LinearTerm, check_units
from userip.ctr.models.base import CTRModel


class DeepFM(CTRModel):
    extendable = True  # userip.ctr.extend: new fields can start at zero

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.fm = FMInteraction()
        units = check_units("hidden_units", hidden_units)
        if not units:
            raise ValueError("DeepFM needs hidden_units (without a deep part use model 'fm')")
        self.dnn = MLP(self.num_fields * embedding_dim, units, dropout, batch_norm, output_dim=1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, D)
        return self.linear(x_ids) + self.fm(emb) + self.dnn(emb.flatten(1)).squeeze(-1)  # (B,)
