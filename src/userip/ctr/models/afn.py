"""AFN: Adaptive Factorization Network.

Weiyu Cheng, Yanyan Shen, Linpeng Huang. "Adaptive Factorization Network: Learning Adaptive-Order Feature
Interactions". AAAI 2020. Implemented: AFN (not the AFN+ ensemble): a logarithmic transformation layer of
``ltl_hidden_size`` logarithmic neurons, each an element-wise product of field embeddings raised to learned
powers, followed by an MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldEmbedding, LogTransformLayer, check_units
from userip.ctr.models.base import CTRModel


class AFN(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        ltl_hidden_size: int = 32,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.ltl = LogTransformLayer(self.num_fields, embedding_dim, ltl_hidden_size)
        in_dim = ltl_hidden_size * embedding_dim
        self.dnn = MLP(in_dim, check_units("hidden_units", hidden_units), dropout, batch_norm, output_dim=1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        crosses = self.ltl(self.embedding(x_ids))  # (B, L * D)
        return self.dnn(crosses).squeeze(-1)  # (B,)
