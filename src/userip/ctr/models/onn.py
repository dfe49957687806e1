"""ONN: Operation-aware Neural Networks (a.k.a. NFFM).

Yi Yang, Baile Xu, Furao Shen, Jian Zhao. "Operation-aware Neural Networks for User Response Prediction".
arXiv:1904.12579, 2019 (Neural Networks, 2020). Implemented: the paper's ONN with the copy and inner-product
operations: every value has one embedding per operation (its own "copy" vector, used as-is, and one vector per
other field for the inner product with that field, as in FFM); [copies, pairwise inner products] feed an MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldAwareEmbedding, FieldAwareInteraction, check_units
from userip.ctr.models.base import CTRModel


class ONN(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self._require_pairs("ONN")
        # The diagonal slot [i, i] of the field-aware table is the copy operation's embedding.
        self.embedding = FieldAwareEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.interaction = FieldAwareInteraction(self.num_fields)
        self.register_buffer("diag", torch.arange(self.num_fields), persistent=False)
        in_dim = self.num_fields * embedding_dim + self.interaction.num_pairs
        self.dnn = MLP(in_dim, check_units("hidden_units", hidden_units), dropout, batch_norm, output_dim=1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, F, D)
        copies = emb[:, self.diag, self.diag].flatten(1)  # (B, F * D)
        products = self.interaction(emb)  # (B, P)
        return self.dnn(torch.cat([copies, products], dim=1)).squeeze(-1)  # (B,)
