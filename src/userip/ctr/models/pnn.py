"""PNN: Product-based Neural Networks.

Yanru Qu, Han Cai, Kan Ren, Weinan Zhang, Yong Yu, Ying Wen, Jun Wang. "Product-based Neural Networks for User
Response Prediction". ICDM 2016. Implemented: IPNN (``product_type="inner"``: all pairwise inner products),
OPNN (``"outer"``: outer products summed with the paper's superposition trick, p = f_S f_S^T) and PNN*
(``"both"``). The product layer's linear signals l_z, l_p are the first MLP layer applied to the concatenation
[embeddings, product signals], i.e. full-rank W_p instead of the paper's optional rank-1 decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldEmbedding, InnerProduct, OuterProduct, check_choice, check_units
from userip.ctr.models.base import CTRModel

PRODUCT_TYPES = ("inner", "outer", "both")


class PNN(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        product_type: str = "inner",
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        check_choice("product_type", product_type, PRODUCT_TYPES)
        if product_type != "outer":
            self._require_pairs("PNN with inner products")
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.inner = InnerProduct(self.num_fields) if product_type in ("inner", "both") else None
        self.outer = OuterProduct() if product_type in ("outer", "both") else None
        in_dim = self.num_fields * embedding_dim
        in_dim += self.inner.num_pairs if self.inner is not None else 0
        in_dim += embedding_dim**2 if self.outer is not None else 0
        self.dnn = MLP(in_dim, check_units("hidden_units", hidden_units), dropout, batch_norm, output_dim=1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, D)
        signals = [emb.flatten(1)]  # l_z: (B, F * D)
        for product in (self.inner, self.outer):
            if product is not None:
                signals.append(product(emb))  # (B, P) inner / (B, D * D) outer
        return self.dnn(torch.cat(signals, dim=1)).squeeze(-1)  # (B,)
