"""Surrogate recommender of eq. 5: a small DCN that scores (user profile vectors, item) pairs.

Its BCE loss reaches the soft tokens through the quantizer's straight-through estimator, so the codes are
shaped by collaborative signal, not only by distance in the LM's embedding space. It is a training aid only:
the downstream CTR models (``userip.ctr``) are separate and read the codes from the feature bank.

    x0     = [W_1 v_1, ..., W_P v_P, item_emb(i), user_feature_embs...]       (N, d0); W_p: D -> proj_dim
    x_l+1  = x0 * (x_l . w_l) + b_l + x_l                                      cross network (DCN v1)
    logit  = w^T [x_L ; MLP(x0)] + b
"""

from __future__ import annotations

import torch
from torch import nn


# Not ctr.layers' CrossNet/MLP: other cross init (Xavier), no 0 layers, other state-dict keys (saved banks).
class CrossNetwork(nn.Module):
    """DCN v1 cross layers: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(num_layers, width) / width**0.5)  # (L, d0)
        self.biases = nn.Parameter(torch.zeros(num_layers, width))  # (L, d0)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # (N, d0) -> (N, d0)
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w)[:, None] + b + x
        return x


class SurrogateRecommender(nn.Module):
    """Scores interactions from profile vectors (N, P, D), item ids (N,), optional user features (N, F)."""

    def __init__(
        self,
        num_profiles: int,
        profile_dim: int,
        num_items: int,
        proj_dim: int = 8,
        embed_dim: int = 8,
        num_cross_layers: int = 3,
        mlp_dims: tuple[int, ...] = (16, 16),
        dropout: float = 0.0,
        user_feature_vocab_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if num_profiles < 1 or profile_dim < 1 or num_items < 1:
            raise ValueError(
                f"SurrogateRecommender: num_profiles, profile_dim and num_items must be >= 1, "
                f"got {num_profiles}, {profile_dim}, {num_items}"
            )
        self.num_profiles = num_profiles
        self.profile_dim = profile_dim
        self.proj_dim = proj_dim
        # One projection per profile: profiles live in different regions of the LM space.
        self.profile_proj = nn.ModuleList(nn.Linear(profile_dim, proj_dim) for _ in range(num_profiles))
        self.item_embedding = nn.Embedding(num_items, embed_dim)
        nn.init.normal_(self.item_embedding.weight, std=0.01)
        self.user_feature_embeddings = nn.ModuleList(
            nn.Embedding(v, embed_dim) for v in user_feature_vocab_sizes
        )
        width = num_profiles * proj_dim + embed_dim * (1 + len(user_feature_vocab_sizes))
        self.cross = CrossNetwork(width, num_cross_layers)
        layers: list[nn.Module] = []
        prev = width
        for d in mlp_dims:
            layers += [nn.Linear(prev, d), nn.ReLU(), nn.Dropout(dropout)]
            prev = d
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width + prev, 1)

    def project(self, profile_vectors: torch.Tensor) -> torch.Tensor:
        """(N, P, D) -> (N, P, proj_dim): the profile part of the input (and the ``without_vq`` vectors)."""
        return torch.stack([proj(profile_vectors[:, p]) for p, proj in enumerate(self.profile_proj)], dim=1)

    def forward(
        self,
        profile_vectors: torch.Tensor,
        item_ids: torch.Tensor,
        user_feature_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """profile_vectors (N, P, D), item_ids (N,), user_feature_ids (N, F) -> logits (N,)."""
        if profile_vectors.dim() != 3 or profile_vectors.shape[1:] != (self.num_profiles, self.profile_dim):
            raise ValueError(
                f"profile_vectors must be (N, {self.num_profiles}, {self.profile_dim}), "
                f"got {tuple(profile_vectors.shape)}"
            )
        parts = [self.project(profile_vectors).flatten(1), self.item_embedding(item_ids)]
        if self.user_feature_embeddings:
            if user_feature_ids is None or user_feature_ids.shape[1] != len(self.user_feature_embeddings):
                raise ValueError(f"user_feature_ids must be (N, {len(self.user_feature_embeddings)})")
            parts += [emb(user_feature_ids[:, f]) for f, emb in enumerate(self.user_feature_embeddings)]
        x0 = torch.cat(parts, dim=-1)  # (N, d0)
        return self.head(torch.cat([self.cross(x0), self.mlp(x0)], dim=-1)).squeeze(-1)
