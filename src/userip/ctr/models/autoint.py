"""AutoInt: automatic feature interaction learning via self-attention.

Weiping Song, Chence Shi, Zhiping Xiao, Zhijian Duan, Yewen Xu, Ming Zhang, Jian Tang. "AutoInt: Automatic
Feature Interaction Learning via Self-Attentive Neural Networks". CIKM 2019. Implemented: AutoInt (eq. 5-9):
stacked multi-head interacting layers with residual connections over the field embeddings, then a linear
output on the concatenated field representations. Non-empty ``hidden_units`` give AutoInt+ (an MLP on the
embeddings in parallel, added to the logit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, FieldEmbedding, InteractingLayer, check_int, check_units
from userip.ctr.models.base import CTRModel


class AutoInt(CTRModel):
    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        num_attention_layers: int = 3,
        num_heads: int = 2,
        attention_dim: int = 8,
        residual: bool = True,
        hidden_units: Sequence[int] = (),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        check_int("num_attention_layers", num_attention_layers)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        layers, width = [], embedding_dim
        for _ in range(num_attention_layers):
            layers.append(InteractingLayer(width, attention_dim, num_heads, residual))
            width = layers[-1].output_dim
        self.attention = nn.Sequential(*layers)
        self.output = nn.Linear(self.num_fields * width, 1)
        units = check_units("hidden_units", hidden_units)
        flat = self.num_fields * embedding_dim
        self.dnn = MLP(flat, units, dropout, batch_norm, output_dim=1) if units else None

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(x_ids)  # (B, F, D)
        logit = self.output(self.attention(emb).flatten(1)).squeeze(-1)  # (B,)
        if self.dnn is not None:
            logit = logit + self.dnn(emb.flatten(1)).squeeze(-1)
        return logit
