"""DCN: Deep & Cross Network.

Ruoxi Wang, Bin Fu, Gang Fu, Mingliang Wang. "Deep & Cross Network for Ad Click Predictions". ADKDD (KDD
workshop) 2017. Implemented: the original (v1) model: a cross network with vector weights and a deep MLP run
in parallel on the concatenated field embeddings x0; their outputs are concatenated and a linear combination
layer gives the logit. ``num_cross_layers=0`` or ``hidden_units=()`` drop one branch (deep-only / cross-only).
UserIP-Tuning's downstream default: embedding 8, 3 cross layers, MLP (16, 16), dropout 0.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, CrossNet, FieldEmbedding, check_int, check_units
from userip.ctr.models.base import CTRModel, concat_head_placement


class DCN(CTRModel):
    extendable = True  # userip.ctr.extend: new fields can start at zero

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        num_cross_layers: int = 3,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        check_int("num_cross_layers", num_cross_layers, minimum=0)
        hidden_units = check_units("hidden_units", hidden_units)
        if num_cross_layers == 0 and not hidden_units:
            raise ValueError(
                "DCN needs a cross network (num_cross_layers > 0) or a deep network (hidden_units)"
            )
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        in_dim = self.num_fields * embedding_dim
        self.cross = CrossNet(in_dim, num_cross_layers) if num_cross_layers > 0 else None
        self.deep = MLP(in_dim, hidden_units, dropout, batch_norm) if hidden_units else None
        stacked = (in_dim if self.cross else 0) + (self.deep.output_dim if self.deep else 0)
        self.combination = nn.Linear(stacked, 1)

    def base_placements(self, base: CTRModel) -> dict[str, tuple[slice | torch.Tensor, ...]]:
        return concat_head_placement(self, base, "combination")

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(x_ids).flatten(1)  # (B, F * D)
        parts = [branch(x0) for branch in (self.cross, self.deep) if branch is not None]
        return self.combination(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
