"""FiBiNET: feature importance (SENET) and bilinear feature interactions.

Tongwen Huang, Zhiqi Zhang, Junlin Zhang. "FiBiNET: Combining Feature Importance and Bilinear feature
Interaction for Click-Through Rate Prediction". RecSys 2019. Implemented: the deep FiBiNET (eq. 14): a SENET
layer reweights the field embeddings; one bilinear-interaction layer (type "all", "each" or "interaction",
shared between the two inputs as in DeepCTR) crosses both the original and the reweighted embeddings; the
concatenated interactions feed an MLP, added to a first-order term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, BilinearInteraction, FieldEmbedding, LinearTerm, SENETLayer, check_units
from userip.ctr.models.base import CTRModel


class FiBiNet(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        bilinear_type: str = "interaction",
        reduction_ratio: int = 3,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self._require_pairs("FiBiNet")
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.senet = SENETLayer(self.num_fields, reduction_ratio)
        self.bilinear = BilinearInteraction(self.num_fields, embedding_dim, bilinear_type)
        in_dim = 2 * self.bilinear.num_pairs * embedding_dim
        self.dnn = MLP(in_dim, check_units("hidden_units", hidden_units), dropout, batch_norm, output_dim=1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, D)
        p = self.bilinear(emb)  # (B, P, D)
        q = self.bilinear(self.senet(emb))  # (B, P, D)
        deep = self.dnn(torch.cat([p, q], dim=1).flatten(1)).squeeze(-1)
        return self.linear(x_ids) + deep  # (B,)
