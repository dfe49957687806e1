"""Small deterministic k-means (k-means++ seeding + Lloyd steps) in torch, used to initialise codebooks."""

from __future__ import annotations

import torch


def kmeans(
    points: torch.Tensor, num_clusters: int, num_iters: int = 20, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``points`` (N, D) into ``num_clusters``; returns (centroids (K, D), assignments (N,)).

    k-means++ seeding spreads the first centroids over the data, so a small K (3-4) starts with one centroid
    per well-separated group instead of several in the same one. With fewer distinct points than K the surplus
    centroids are copies of sampled points (they will be revived as dead codes later).
    """
    if points.dim() != 2:
        raise ValueError(f"kmeans: points must be (N, D), got shape {tuple(points.shape)}")
    if num_clusters < 1:
        raise ValueError(f"kmeans: num_clusters must be >= 1, got {num_clusters}")
    if points.shape[0] == 0:
        raise ValueError("kmeans: no points")
    # On the CPU whatever the points' device: the seeding draws from ``generator`` (a CPU generator cannot
    # drive CUDA sampling) and the k-means inputs are small (init samples, one profile per user).
    x = points.detach().float().cpu()
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    min_sq = ((x - x[first]) ** 2).sum(-1)  # (N,) squared distance to the nearest chosen centroid
    for _ in range(1, num_clusters):
        total = float(min_sq.sum())
        if total <= 0.0:  # every point coincides with a centroid: pick uniformly
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(min_sq / total, 1, generator=generator))
        centroids.append(x[idx])
        min_sq = torch.minimum(min_sq, ((x - x[idx]) ** 2).sum(-1))
    c = torch.stack(centroids)  # (K, D)
    assign = torch.cdist(x, c).argmin(-1)
    for _ in range(num_iters):
        one_hot = torch.nn.functional.one_hot(assign, num_clusters).float()  # (N, K)
        counts = one_hot.sum(0)  # (K,)
        sums = one_hot.t() @ x  # (K, D)
        nonempty = counts > 0
        c = torch.where(nonempty[:, None], sums / counts.clamp(min=1)[:, None], c)  # empty clusters stay put
        new_assign = torch.cdist(x, c).argmin(-1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return c.to(device=points.device, dtype=points.dtype), assign.to(points.device)
