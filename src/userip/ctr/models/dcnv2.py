"""DCNv2: improved Deep & Cross Network.

Ruoxi Wang, Rakesh Shivanna, Derek Z. Cheng, Sagar Jain, Dong Lin, Lichan Hong, Ed H. Chi. "DCN V2: Improved
Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank Systems". WWW 2021. Implemented:
matrix cross layers, full-rank (``low_rank=None``) or the mixture of low-rank experts DCN-Mix
(``low_rank=r``, ``num_experts``), combined with the deep MLP either "stacked" (deep on top of cross) or
"parallel" (outputs concatenated), then a linear output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import MLP, CrossNetV2, FieldEmbedding, check_choice, check_int, check_units
from userip.ctr.models.base import CTRModel, concat_head_placement

STRUCTURES = ("parallel", "stacked")


class DCNv2(CTRModel):
    extendable = True  # userip.ctr.extend: new fields can start at zero

    def __init__(
        self,
        feature_map: FeatureMap,
        embedding_dim: int = 8,
        num_cross_layers: int = 3,
        low_rank: int | None = None,
        num_experts: int = 1,
        structure: str = "parallel",
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        batch_norm: bool = False,
    ) -> None:
        super().__init__(feature_map, embedding_dim)
        check_int("num_cross_layers", num_cross_layers)
        self.structure = check_choice("structure", structure, STRUCTURES)
        units = check_units("hidden_units", hidden_units)
        self.embedding = FieldEmbedding(feature_map.vocab_sizes, embedding_dim)
        in_dim = self.num_fields * embedding_dim
        self.cross = CrossNetV2(in_dim, num_cross_layers, low_rank, num_experts)
        self.deep = MLP(in_dim, units, dropout, batch_norm) if units else None
        if self.deep is None:
            out_dim = in_dim  # cross network only
        elif structure == "stacked":
            out_dim = self.deep.output_dim
        else:
            out_dim = in_dim + self.deep.output_dim
        self.output = nn.Linear(out_dim, 1)

    def base_placements(self, base: CTRModel) -> dict[str, tuple[slice | torch.Tensor, ...]]:
        return concat_head_placement(self, base, "output")

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(x_ids).flatten(1)  # (B, F * D)
        h = self.cross(x0)  # (B, F * D)
        if self.deep is not None:
            h = self.deep(h) if self.structure == "stacked" else torch.cat([h, self.deep(x0)], dim=1)
        return self.output(h).squeeze(-1)  # (B,)
