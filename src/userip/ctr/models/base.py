"""What every CTR model shares: the feature map, the embedding width and the regularisation hook.

Deliberately thin: models compose layers from ``userip.ctr.layers`` themselves (embedding -> interaction ->
head); this class only validates the two common arguments and exposes the embedding tables.
"""

from __future__ import annotations

import torch
from torch import nn

from userip.ctr.features import FeatureMap
from userip.ctr.layers import OffsetEmbedding, check_int


class CTRModel(nn.Module):
    """Base of every zoo model: ``forward(x_ids (B, F) LongTensor) -> logits (B,)``; no sigmoid inside.

    Regularisation hook: ``embedding_parameters()`` lists the embedding tables (field embeddings, field-aware
    embeddings and first-order weights) so a trainer can apply L2 to them only (``dense_parameters()`` is the
    rest), as DeepCTR/FuxiCTR do with ``l2_reg_embedding``.
    """

    # ``userip.ctr.extend``: True when a model over the base fields plus appended ones can start as the base
    # model (see that module for the layout rule); ``base_placements`` names the exceptions.
    extendable = False

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

    def base_placements(self, base: CTRModel) -> dict[str, tuple[slice | torch.Tensor, ...]]:
        """Where each of ``base``'s parameters sits inside this extended model's, for the parameters whose
        base entries are not the leading slice (``userip.ctr.extend``); default: none."""
        return {}

    def _require_pairs(self, model: str) -> None:
        if self.num_fields < 2:
            raise ValueError(
                f"{model} models pairwise field interactions and needs >= 2 fields, got {self.num_fields}"
            )


def concat_head_placement(
    model: CTRModel, base: CTRModel, head: str
) -> dict[str, tuple[slice | torch.Tensor, ...]]:
    """``base_placements`` of a linear ``head`` reading ``[an (F * D)-wide part, the rest]`` (DCN's cross and
    deep outputs): the base's first F_base * D columns stay leading, the rest move right by the new fields'
    width."""
    new_weight, old_weight = model.get_parameter(f"{head}.weight"), base.get_parameter(f"{head}.weight")
    if new_weight.shape == old_weight.shape:  # the head reads no field-wide part (e.g. stacked DCNv2)
        return {}
    old_wide, new_wide = base.num_fields * base.embedding_dim, model.num_fields * model.embedding_dim
    rest = old_weight.shape[1] - old_wide
    columns = torch.cat([torch.arange(old_wide), torch.arange(new_wide, new_wide + rest)])
    return {f"{head}.weight": (slice(None), columns)}
