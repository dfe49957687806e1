"""DIFM: Dual Input-aware Factorization Machines.

Wantong Lu, Yantao Yu, Yongzhe Chang, Zhen Wang, Chenhui Li, Bo Yuan. "A Dual Input-aware Factorization
Machine for CTR Prediction". IJCAI 2020. Implemented: the paper's dual-FEN design. A vector-wise part
(multi-head self-attention with residual over field embeddings) and a bit-wise part (MLP over the concatenated
embeddings) each map to one factor per field; their sum m_x reweights both the first-order weights
(w_i * m_x,i) and the embeddings (v_i * m_x,i) of a standard FM (reweighting layer + FM prediction layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldEmbedding, FMInteraction, InteractingLayer, LinearTerm, check_units
from userip.ctr.models.base import CTRModel


class DIFM(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        num_heads: int = 2,
        attention_dim: int = 8,
        residual: bool = True,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        self._require_pairs("DIFM")
        units = check_units("hidden_units", hidden_units)
        if not units:
            raise ValueError("DIFM needs hidden_units for its bit-wise part")
        F = self.num_fields
        self.linear = LinearTerm(feature_map.vocab_sizes)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        self.vector_wise = InteractingLayer(embedding_dim, attention_dim, num_heads, residual)
        self.vector_proj = nn.Linear(F * self.vector_wise.output_dim, F, bias=False)  # P^vec
        self.bit_wise = MLP(F * embedding_dim, units, dropout, batch_norm)
        self.bit_proj = nn.Linear(self.bit_wise.output_dim, F, bias=False)  # P^bit
        self.fm = FMInteraction()

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, D)
        m_vec = self.vector_proj(self.vector_wise(emb).flatten(1))  # (B, F)
        m_bit = self.bit_proj(self.bit_wise(emb.flatten(1)))  # (B, F)
        m = m_vec + m_bit  # (B, F): input-aware factor per field
        first = (self.linear.field_weights(x_ids) * m).sum(dim=1) + self.linear.bias  # (B,)
        return first + self.fm(emb * m.unsqueeze(-1))  # (B,)
