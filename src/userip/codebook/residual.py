"""Residual (multi-level) quantization of one profile, as in RQ-VAE / TIGER semantic IDs.

Level 0 is an ordinary ``ProfileQuantizer`` on the profile z; level l > 0 quantizes what the levels before it
left over, the residual r_l = z - sum_{j<l} e_j, with its own codebook:

    k_l       = argmin_k ||r_l - e_lk||^2 - b_lk                    (eq. 6 + that level's balance offsets)
    quantized = z + sg[sum_l e_l,k_l - z]      one straight-through estimator on the sum
    loss      = sum_l ( ||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2 )      (eq. 5 per level)

The residuals are formed from detached codewords, so each codebook learns from its own level's loss only and
every commitment term pulls on z. Same contract as ``ProfileQuantizer`` (``forward``, ``nearest``,
``ids_to_vectors``), with code ids (B, L): ``ids_to_vectors(forward(z)[1]) == forward(z)[0]`` bit for bit
once every level is initialised (both sum the levels' codewords in the same order).

k-means init per level on the residuals: the first training profiles are held (level 0's ``init_samples``
buffer, as one ``ProfileQuantizer`` holds them); once ``kmeans_init_samples`` are held, level 0 is set to
their k-means centroids, level 1 to the centroids of what level 0 leaves of the same profiles, and so on
(``init_from``). Until then ``forward`` passes z through unchanged with zero loss, as a pending
``ProfileQuantizer`` does. Dead-code revival runs per level on that level's
residuals; ``fit_balance`` fits each level's offsets in turn on the residuals the balanced levels before it
leave. With one level everything is ``ProfileQuantizer``'s arithmetic, so it returns the same numbers.

Level l of profile ``hobby`` becomes the bank / CTR field ``hobby_r<l>`` (``userip.feature_bank.base.
level_field_name``; level 0 keeps ``hobby``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from userip.codebook.errors import CodebookError

# Level l's codebook is seeded ``seed + LEVEL_SEED_STRIDE * l`` (by ``MultiProfileQuantizer``): level 0 keeps
# the profile's own seed (so level 0 draws exactly what the one-level ``ProfileQuantizer`` draws); the stride
# keeps the levels of neighbouring profiles (seeded seed + p) apart.
LEVEL_SEED_STRIDE = 1_000_003


def residual_level_sizes(
    codebook_size: int, num_levels: int, residual_sizes: Sequence[int] = ()
) -> list[int]:
    """The codebook sizes of a profile's ``num_levels`` levels: its own ``codebook_size`` for level 0, then
    ``residual_sizes`` (one per further level, the same for every profile) or, when empty, ``codebook_size``
    again."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise CodebookError(f"num_levels must be an integer >= 1, got {num_levels!r}")
    if not residual_sizes:
        return [codebook_size] * num_levels
    if len(residual_sizes) != num_levels - 1:
        raise CodebookError(
            f"residual_sizes: one size per level after the first ({num_levels - 1}), "
            f"got {list(residual_sizes)}"
        )
    return [codebook_size, *residual_sizes]


class ResidualQuantizer(nn.Module):
    """Residual quantization of one profile's vectors (B, D) by ``levels``, ``ProfileQuantizer``s of one width
    (``MultiProfileQuantizer(num_levels=...)`` builds them; level l seeded ``seed + LEVEL_SEED_STRIDE * l``).
    The levels are given, not built here: ``userip.codebook.quantizer`` builds on this module, not the other
    way round.
    """

    def __init__(self, levels: Sequence[nn.Module]) -> None:
        super().__init__()
        if not levels:
            raise CodebookError("a residual quantizer needs at least one level")
        dims = {int(level.dim) for level in levels}
        if len(dims) != 1:
            raise CodebookError(f"every level must have the same width, got {sorted(dims)}")
        self.dim = dims.pop()
        self.levels = nn.ModuleList(levels)
        self.level_sizes = [int(level.codebook_size) for level in levels]
        # The pending k-means samples are collected here (held in level 0's ``init_samples`` buffer), so that
        # every level is initialised at once from the same profiles (``init_from``), not each level from
        # later batches.
        for level in self.levels:
            level.init_from_forward = False
        self.init_from_forward = True

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def is_initialized(self) -> bool:
        return all(level.is_initialized for level in self.levels)

    # ------------------------------------------------------------------ the contract
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (B, L): each level's biased nearest code of the residual the levels before it leave."""
        self._check_input(z)
        residual = z.detach().float()
        ids = []
        for level in self.levels:
            level_ids, residual = self._nearest_and_leftover(level, residual)
            ids.append(level_ids)
        return torch.stack(ids, dim=1)

    def ids_to_vectors(self, code_ids: torch.Tensor) -> torch.Tensor:
        """code_ids (..., L) -> the sum of the levels' codewords (..., D); the inverse of quantization."""
        if code_ids.dim() < 1 or code_ids.shape[-1] != self.num_levels:
            raise CodebookError(
                f"expected code_ids of shape (..., {self.num_levels}), got {tuple(code_ids.shape)}"
            )
        total = self.levels[0].ids_to_vectors(code_ids[..., 0])
        for depth, level in enumerate(self.levels[1:], start=1):
            total = total + level.ids_to_vectors(code_ids[..., depth])
        return total

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D) -> quantized (B, D) (straight-through on the sum), code_ids (B, L), loss (eq. 5 summed
        over the levels)."""
        self._check_input(z)
        if self.training and self.init_from_forward and not self.is_initialized:
            self.collect_for_init(z)
        residual = z
        total: torch.Tensor | None = None
        losses, ids = [], []
        pending = False
        for level in self.levels:
            if pending:  # a level before is still collecting: this one's residuals are not defined yet
                level_ids = level.nearest(residual)
            else:
                _, level_ids, level_loss = level(residual)  # eq. 5 and revival, as one level does
                losses.append(level_loss)
                pending = not level.is_initialized
            # The chosen codewords, indexed after the level's forward: revival only moves unchosen codes.
            chosen = level.codebook[level_ids].detach()  # (B, D)
            total = chosen if total is None else total + chosen
            residual = residual - chosen.to(residual.device)  # float32 codewords: no rounding to bf16
            ids.append(level_ids)
        assert total is not None  # at least one level
        loss = torch.stack(losses).sum()
        code_ids = torch.stack(ids, dim=1)
        if pending:  # k-means init pending somewhere: identity, as a pending ProfileQuantizer
            return z, code_ids, loss
        # = z + sg[sum e - z]: the value is the sum bit for bit, d quantized / d z is the identity.
        return total.detach() + (z - z.detach()), code_ids, loss

    # ------------------------------------------------------------------ initialisation and balance
    @torch.no_grad()
    def init_from(self, points: torch.Tensor) -> None:
        """k-means initialise level 0 on ``points`` (N, D), then each level on the residuals left so far."""
        self._check_input(points)
        residual = points.detach().float()
        for level in self.levels:
            level.init_from(residual)
            _, residual = self._nearest_and_leftover(level, residual)

    @torch.no_grad()
    def collect_for_init(self, z: torch.Tensor) -> None:
        """Hold ``z`` (B, D) for the pending k-means init (in level 0's buffer, as ``ProfileQuantizer`` holds
        them); once ``kmeans_init_samples`` are held, ``init_from`` them (every level)."""
        first = self.levels[0]
        held = torch.cat([first.init_samples, z.detach().float().to(first.init_samples.device)])
        first.init_samples = held
        if held.shape[0] >= first.kmeans_init_samples:
            self.init_from(held)

    @torch.no_grad()
    def fit_balance(self, points: torch.Tensor, min_share: float) -> list[torch.Tensor]:
        """``ProfileQuantizer.fit_balance`` of each level in turn on the residuals the balanced levels before
        it leave; the counts (K_l,) per level."""
        self._check_input(points)
        residual = points.detach().float()
        counts = []
        for level in self.levels:
            counts.append(level.fit_balance(residual, min_share))
            _, residual = self._nearest_and_leftover(level, residual)
        return counts

    @staticmethod
    def _nearest_and_leftover(level: Any, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (biased) nearest code ids of ``residual`` at ``level`` and what their codewords leave of it."""
        residual = residual.to(level.codebook.device)
        level_ids = level.nearest(residual)
        return level_ids, residual - level.codebook.detach().float()[level_ids]

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[-1] != self.dim:
            raise CodebookError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, level_sizes={self.level_sizes}"
