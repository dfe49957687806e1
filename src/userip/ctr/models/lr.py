"""LR: logistic regression on one-hot categorical features, the first-order baseline.

As deployed for CTR e.g. in H. Brendan McMahan et al. "Ad Click Prediction: a View from the Trenches". KDD
2013 (there trained with FTRL-Proximal; here with whatever optimiser the trainer uses). Implemented:
logit = w0 + sum_i w[x_i]. It has no feature interactions: the reference point for the interaction models.
``embedding_dim`` is accepted for a uniform interface and unused.
"""

from __future__ import annotations

import torch

from userip.ctr.features import FeatureMap
from userip.ctr.layers import LinearTerm
from userip.ctr.models.base import CTRModel


class LR(CTRModel):
    extendable = True  # userip.ctr.extend: new fields can start at zero

    def __init__(self, feature_map: FeatureMap, embedding_dim: int = 8) -> None:
        super().__init__(feature_map, embedding_dim)
        self.linear = LinearTerm(feature_map.vocab_sizes)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.linear(x_ids)  # (B,)
