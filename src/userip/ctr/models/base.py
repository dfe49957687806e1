"""What every CTR model shares: the feature map, the embedding width and the regularisation hook.

Deliberately thin: models compose layers from ``userip.ctr.layers`` themselves (embedding -> interaction ->
head); this class only validates the two common arguments and exposes the embedding tables.
"""

from __future__ import annotations

from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import OffsetEmbedding, check_int


class CTRModel(nn.Module):
    """Base of every zoo model: ``forward(x_ids (B, F) LongTensor) -> logits (B,)``; no sigmoid inside.

    Regularisation hook: ``embedding_parameters()`` lists the embedding tables (field embeddings, field-aware
    embeddings and first-order weights) so a trainer can apply L2 to them only (``dense_parameters()`` is the
    rest), as DeepCTR/FuxiCTR do with ``l2_reg_embedding``.
    """

    def __init__(self, feature_map: FeatureMap, embedding_dim: int) -> None:
        super().__init__()
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(f"feature_map must be a FeatureMap, got {type(feature_map).__name__}")
        self.feature_map = feature_map
        self.num_fields = feature_map.num_fields
        self.embedding_dim = check_int("embedding_dim", embedding_dim)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [m.weight for m in self.modules() if isinstance(m, OffsetEmbedding)]

    def dense_parameters(self) -> list[nn.Parameter]:
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]

    def _require_pairs(self, model: str) -> None:
        if self.num_fields < 2:
            raise ValueError(
                f"{model} models pairwise field interactions and needs >= 2 fields, got {self.num_fields}"
            )
