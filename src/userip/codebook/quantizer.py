"""Per-profile vector quantization (paper 2.4, eq. 5-6).

Contract (as in vector-quantize-pytorch): ``forward(z) -> (quantized, code_ids, loss)`` and the inverse
``ids_to_vectors(code_ids)``; once the codebook is initialised ``ids_to_vectors(forward(z)[1]) ==
forward(z)[0]`` exactly (bit for bit).

    k*        = argmin_k ||z - e_k||^2                                    (eq. 6)
    quantized = z + sg[e_k* - z]          value e_k*, gradient flows to z unchanged (straight-through)
    loss      = ||sg[z] - e_k*||^2 + beta * ||z - sg[e_k*]||^2            (eq. 5: codebook + commitment)

Squared norms are summed over the D dimensions and averaged over the batch, exactly as written in eq. 5.

Why initialisation and revival matter here: with the paper's tiny weights (beta = lambda = 0.001) the codebook
only moves by its optimizer's step size, and a code that wins no profile gets no gradient at all. Two
mechanisms keep a small codebook (3-4 codes) from collapsing onto one code:

* ``init="kmeans"`` (default): the first training batches' profiles are buffered; once ``kmeans_init_samples``
  vectors are held, the codebook is set to their k-means++ / Lloyd centroids. Until then ``forward`` passes
  ``z`` through unchanged with zero loss (the codebook has nothing meaningful to say yet).
  ``init_from(points)`` does the same at once from a given set (e.g. every user's current profile).
* dead-code revival: a code not chosen by any vector for ``dead_code_threshold`` consecutive training steps is
  moved onto the batch vector farthest from every current code (one code at a time, farthest-point style, so
  two revived codes never land in the same group). ``dead_code_threshold=0`` disables it.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from userip.codebook.kmeans import kmeans


class CodebookInit(enum.Enum):
    RANDOM = "random"  # N(0, 1/D) vectors: norm about 1
    KMEANS = "kmeans"  # k-means on the first training profiles (or on ``init_from``)


class CodebookError(ValueError):
    """A codebook argument is invalid (size below 2, bad shape, unknown profile)."""


def check_codebook_size(size: int, where: str = "codebook_size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise CodebookError(
            f"{where}: a codebook needs at least 2 codes (one code carries no information), got {size!r}"
        )
    return size


class ProfileQuantizer(nn.Module):
    """One codebook of ``codebook_size`` vectors of width ``dim`` for one profile."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        beta: float = 0.001,
        init: CodebookInit | str = CodebookInit.KMEANS,
        dead_code_threshold: int = 20,
        kmeans_init_samples: int = 256,
        kmeans_iters: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_codebook_size(codebook_size)
        if dim < 1:
            raise CodebookError(f"dim must be >= 1, got {dim}")
        if beta < 0:
            raise CodebookError(f"beta must be >= 0, got {beta}")
        if dead_code_threshold < 0:
            raise CodebookError(
                f"dead_code_threshold must be >= 0 (0 disables revival), got {dead_code_threshold}"
            )
        self.init = CodebookInit(init)
        if self.init is CodebookInit.KMEANS and kmeans_init_samples < codebook_size:
            raise CodebookError(
                f"kmeans_init_samples ({kmeans_init_samples}) must be >= codebook_size ({codebook_size})"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_init_samples = kmeans_init_samples
        self.kmeans_iters = kmeans_iters
        self.generator = torch.Generator().manual_seed(seed)
        self.codebook = nn.Parameter(
            torch.randn(codebook_size, dim, generator=self.generator) / dim**0.5
        )  # (K, D)
        self.register_buffer("initialized", torch.tensor(self.init is CodebookInit.RANDOM))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))  # (K,)
        self._init_buffer: list[torch.Tensor] = []  # profiles seen before k-means init (not checkpointed)

    # ------------------------------------------------------------------ the contract
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (B,) of the nearest codebook vectors (eq. 6) for ``z`` (B, D); no side effects."""
        self._check_input(z)
        with torch.no_grad():
            return torch.cdist(z.detach().float(), self.codebook.detach().float()).argmin(-1)

    def ids_to_vectors(self, code_ids: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (..., D) for ``code_ids`` (...); the inverse of quantization."""
        if code_ids.dtype not in (torch.int64, torch.int32):
            raise CodebookError(f"code_ids must be integer, got {code_ids.dtype}")
        if code_ids.numel() and (int(code_ids.min()) < 0 or int(code_ids.max()) >= self.codebook_size):
            raise CodebookError(
                f"code_ids must lie in [0, {self.codebook_size}), got {code_ids.unique().tolist()}"
            )
        return self.codebook[code_ids]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D) -> quantized (B, D) (straight-through), code_ids (B,), loss (scalar, eq. 5)."""
        self._check_input(z)
        if self.training and not bool(self.initialized):
            self._collect_for_init(z)
        if not bool(self.initialized):  # k-means init pending: identity, no loss
            return z, self.nearest(z), z.new_zeros(())
        code_ids = self.nearest(z)  # (B,)
        chosen = self.codebook[code_ids]  # (B, D)
        codebook_loss = ((chosen - z.detach()) ** 2).sum(-1).mean()
        commitment_loss = ((z - chosen.detach()) ** 2).sum(-1).mean()
        loss = codebook_loss + self.beta * commitment_loss
        # = z + sg[e_k* - z], written so that its value is e_k* bit for bit (z - sg[z] is exactly 0) while
        # d quantized / d z is the identity: ids_to_vectors(code_ids) reproduces it exactly.
        quantized = chosen.detach() + (z - z.detach())
        if self.training and self.dead_code_threshold > 0:
            self._revive_dead_codes(z, code_ids)
        return quantized, code_ids, loss

    # ------------------------------------------------------------------ initialisation and revival
    @torch.no_grad()
    def init_from(self, points: torch.Tensor) -> None:
        """Set the codebook to the k-means centroids of ``points`` (N, D) and mark it initialised."""
        self._check_input(points)
        centroids, _ = kmeans(points, self.codebook_size, self.kmeans_iters, self.generator)
        if points.shape[0] < self.codebook_size:  # surplus codes: sampled points (revival sorts them out)
            extra = points[torch.randint(points.shape[0], (self.codebook_size,), generator=self.generator)]
            centroids = torch.where(
                torch.arange(self.codebook_size)[:, None] < points.shape[0], centroids, extra
            )
        self.codebook.data.copy_(centroids.to(self.codebook.dtype))
        self.initialized.fill_(True)
        self.steps_unused.zero_()
        self._init_buffer = []

    def _collect_for_init(self, z: torch.Tensor) -> None:
        self._init_buffer.append(z.detach().float().cpu())
        held = torch.cat(self._init_buffer)
        if held.shape[0] >= self.kmeans_init_samples:
            self.init_from(held.to(self.codebook.device))

    @torch.no_grad()
    def _revive_dead_codes(self, z: torch.Tensor, code_ids: torch.Tensor) -> None:
        used = torch.bincount(code_ids, minlength=self.codebook_size) > 0  # (K,)
        self.steps_unused.copy_(torch.where(used, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        dead = (self.steps_unused >= self.dead_code_threshold).nonzero().flatten().tolist()
        if not dead:
            return
        x = z.detach().to(self.codebook.dtype)
        for k in dead:
            # Farthest point from every current code (revived ones included): a new group's representative.
            dist_sq = torch.cdist(x, self.codebook.data).pow(2).min(-1).values  # (B,)
            self.codebook.data[k] = x[int(dist_sq.argmax())]
            self.steps_unused[k] = 0

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[-1] != self.dim:
            raise CodebookError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, init={self.init.value}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )


class MultiProfileQuantizer(nn.Module):
    """One ``ProfileQuantizer`` per profile; works on (B, P, D) profile embeddings."""

    def __init__(
        self,
        profile_names: list[str],
        codebook_sizes: list[int],
        dim: int,
        beta: float = 0.001,
        init: CodebookInit | str = CodebookInit.KMEANS,
        dead_code_threshold: int = 20,
        kmeans_init_samples: int = 256,
        kmeans_iters: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(profile_names) != len(codebook_sizes) or not profile_names:
            raise CodebookError(
                f"need one codebook size per profile: profiles {profile_names}, sizes {codebook_sizes}"
            )
        if len(set(profile_names)) != len(profile_names):
            raise CodebookError(f"duplicate profile names {profile_names}")
        for name, size in zip(profile_names, codebook_sizes):
            check_codebook_size(size, f"codebook size of profile {name!r}")
        self.profile_names = list(profile_names)
        self.codebook_sizes = list(codebook_sizes)
        self.dim = dim
        self.quantizers = nn.ModuleList(
            ProfileQuantizer(
                dim, size, beta, init, dead_code_threshold, kmeans_init_samples, kmeans_iters, seed + p
            )
            for p, size in enumerate(codebook_sizes)
        )

    def index(self, profile: int | str) -> int:
        if isinstance(profile, str):
            if profile not in self.profile_names:
                raise CodebookError(f"unknown profile {profile!r}; profiles are {self.profile_names}")
            return self.profile_names.index(profile)
        if not 0 <= profile < len(self.profile_names):
            raise CodebookError(f"profile index {profile} outside 0..{len(self.profile_names) - 1}")
        return profile

    def forward(self, profile_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """profile_embeds (B, P, D) -> quantized (B, P, D), code_ids (B, P), loss (sum over profiles)."""
        self._check_input(profile_embeds)
        outs = [q(profile_embeds[:, p]) for p, q in enumerate(self.quantizers)]
        quantized = torch.stack([o[0] for o in outs], dim=1)
        code_ids = torch.stack([o[1] for o in outs], dim=1)
        loss = torch.stack([o[2] for o in outs]).sum()
        return quantized, code_ids, loss

    def nearest(self, profile_embeds: torch.Tensor) -> torch.Tensor:
        """Code ids (B, P) without side effects."""
        self._check_input(profile_embeds)
        return torch.stack([q.nearest(profile_embeds[:, p]) for p, q in enumerate(self.quantizers)], dim=1)

    def ids_to_vectors(self, code_ids: torch.Tensor) -> torch.Tensor:
        """code_ids (B, P) -> codebook vectors (B, P, D)."""
        if code_ids.dim() != 2 or code_ids.shape[1] != len(self.quantizers):
            raise CodebookError(
                f"expected code_ids of shape (B, {len(self.quantizers)}), got {tuple(code_ids.shape)}"
            )
        return torch.stack([q.ids_to_vectors(code_ids[:, p]) for p, q in enumerate(self.quantizers)], dim=1)

    def init_from(self, profile_embeds: torch.Tensor) -> None:
        """k-means initialise every codebook from (N, P, D) profiles."""
        self._check_input(profile_embeds)
        for p, q in enumerate(self.quantizers):
            q.init_from(profile_embeds[:, p])

    def codebook(self, profile: int | str) -> torch.Tensor:
        return self.quantizers[self.index(profile)].codebook

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != len(self.quantizers) or x.shape[2] != self.dim:
            raise CodebookError(
                f"expected profile_embeds of shape (B, {len(self.quantizers)}, {self.dim}), "
                f"got {tuple(x.shape)}"
            )
