"""Per-profile vector quantization (paper 2.4, eq. 5-6).

Contract (as in vector-quantize-pytorch): ``forward(z) -> (quantized, code_ids, loss)`` and the inverse
``ids_to_vectors(code_ids)``; once the codebook is initialised,
``ids_to_vectors(forward(z)[1]) == forward(z)[0]`` exactly (bit for bit).

    k*        = argmin_k ||z - e_k||^2 - b_k                              (eq. 6 + balance offsets b)
    quantized = z + sg[e_k* - z]          value e_k*, gradient flows to z unchanged (straight-through)
    loss      = ||sg[z] - e_k*||^2 + beta * ||z - sg[e_k*]||^2            (eq. 5: codebook + commitment)

Squared norms are summed over the D dimensions and averaged over the batch, exactly as written in eq. 5.
``b`` is the per-code buffer ``code_bias`` (K,): zeros (plain eq. 6) until ``fit_balance`` sets it; it is part
of the state dict, so checkpoints and the saved objective carry it and every later lookup (``nearest``, new
users) uses the same rule. A state dict without it (written before it existed) loads as zeros.

Why initialisation and revival matter here: with the paper's tiny weights (beta = lambda = 0.001) the codebook
only moves by its optimizer's step size, and a code that wins no profile gets no gradient at all. Two
mechanisms keep a small codebook (3-4 codes) from collapsing onto one code during training:

* ``init="kmeans"`` (default): the first training batches' profiles are held in the buffer ``init_samples``
  (state dict, so a checkpoint taken before the init carries them); once ``kmeans_init_samples``
  vectors are held, the codebook is set to their k-means++ / Lloyd centroids. Until then ``forward`` passes
  ``z`` through unchanged with zero loss (the codebook has nothing meaningful to say yet).
  ``init_from(points)`` does the same at once from a given set (e.g. every user's current profile).
* dead-code revival: a code not chosen by any vector for ``dead_code_threshold`` consecutive training steps is
  re-seeded *inside the batch's most populous group* (the batch vectors assigned to the most-used code): at
  the group's coordinate-wise median moved by the median absolute projection along the group's first
  principal direction. The seed sits in the bulk of that group, so it takes over a sizeable part of it (the
  big group is split). The former rule, the batch vector farthest from every code, picked outliers: with 3-4
  codes a revived code ended up holding a single user. Median and median absolute projection keep the seed
  in the bulk even when the group holds an outlier. Dead codes are revived one at a time, each against the
  codebook with the previous ones already placed. ``dead_code_threshold=0`` disables it.

Balanced final assignment (after training): revival alone does not guarantee use; on MovieLens-100K the
trained codebooks put [521, 421, 1] users on the background codes. ``fit_balance(points, min_share)`` sets
``code_bias`` over all users' profiles so that every code is the (biased) nearest code of at least
``ceil(min_share * N)`` of them, and leaves it at zero when plain eq. 6 already does so. It solves the dual
of "assign every point to a code, each code gets >= floor points, minimum total squared distance":

1. entropic optimal transport with floor-constrained code marginals (log-domain Sinkhorn, block coordinate
   ascent of the smoothed dual, eps annealed from the mean cost down to 1e-3 of it):

       f_i = -eps LSE_k((b_k - c_ik) / eps)
       b_k = max(0, eps log floor - eps LSE_i((f_i - c_ik) / eps))

   which moves all codes' offsets together (no price war between two under-used codes);
2. an exact auction-style repair on the very numbers ``nearest`` computes: while some code has fewer than
   ``floor`` points, raise its offset just past the gap of its ``floor - count``-th cheapest outside point.

Rows split over processes (the distributed profile stage, each rank holding its users' rows only): every
step above reads the rows through per-code sums, maxima and counts, so ``fit_balance_distances(...,
reduce=...)`` runs the same code on each process's rows with ``reduce`` summing / taking the maximum of those
(K,)-sized numbers over the processes (an all-reduce); the repair's k-th cheapest gap is found by bisection
on its float32 bits over the reduced counts of gaps below each candidate, so it is exact without gathering a
row. One process is the case ``reduce = local_rows`` (the identity).

It is written here, not taken from a library: POT's ``sinkhorn`` solves equality marginals only (it would
force equal-size codes instead of a floor), its output is a soft plan whose hard argmin does not guarantee
the floor, and the repair must use exactly the float32 distances that ``nearest`` uses. Everything is
deterministic (no random numbers, fixed iteration counts, ties to the lowest index).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from userip.codebook.errors import CodebookError, check_codebook_size
from userip.codebook.kmeans import kmeans
from userip.codebook.residual import LEVEL_SEED_STRIDE, ResidualQuantizer, residual_level_sizes
from userip.feature_bank.base import level_field_names

log = logging.getLogger(__name__)


class CodebookInit(enum.Enum):
    RANDOM = "random"  # N(0, 1/D) vectors: norm about 1
    KMEANS = "kmeans"  # k-means on the first training profiles (or on ``init_from``)


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
        # ``initialized`` on the host, kept equal to the buffer (set together; read back once on load): the
        # training step branches on it without reading a device value.
        self.is_initialized = self.init is CodebookInit.RANDOM
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))  # (K,)
        # b_k of k* = argmin ||z - e_k||^2 - b_k; zeros = plain eq. 6 (set by ``fit_balance``)
        self.register_buffer("code_bias", torch.zeros(codebook_size, dtype=torch.float32))  # (K,)
        # Profiles seen before the k-means init (N, D): state like the codebook, so a checkpoint taken while
        # the init is pending resumes with the same samples (and the same centroids) as an uninterrupted run.
        self.register_buffer("init_samples", torch.zeros(0, dim, dtype=torch.float32))
        # False: forward leaves the collection to the caller (the distributed trainer feeds every rank's
        # vectors to ``collect_for_init``).
        self.init_from_forward = True
        # Training steps until a code can first have been unused ``dead_code_threshold`` times: the revival
        # reads ``steps_unused`` back only then (see ``_revive_dead_codes``); 1 = check at the next step.
        # Whoever overwrites ``steps_unused`` sets it too (1 is always safe; the distributed trainer copies
        # rank 0's along with rank 0's counts).
        self.steps_to_revival_check = max(dead_code_threshold, 1)  # every count is 0

    # ------------------------------------------------------------------ the contract
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (B,) for ``z`` (B, D): argmin_k ||z - e_k||^2 - code_bias_k (eq. 6 when the offsets are
        zero); no side effects. Ties go to the lowest code id."""
        self._check_input(z)
        return self._scores(z).argmin(-1)

    @torch.no_grad()
    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K) float32 ||z - e_k||^2 - code_bias_k: the one place assignments are computed."""
        # z may come from another device (the CPU soft-token table vs a CUDA codebook): scores live with the
        # codebook.
        d2 = torch.cdist(z.detach().float().to(self.codebook.device), self.codebook.detach().float()).pow(2)
        return d2 - self.code_bias.float()

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
        if self.training and self.init_from_forward and not self.is_initialized:
            self.collect_for_init(z)
        if not self.is_initialized:  # k-means init pending: identity, no loss
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
        points = points.detach().float().cpu()  # the CPU generator draws; moved to the codebook below
        centroids, _ = kmeans(points, self.codebook_size, self.kmeans_iters, self.generator)
        if points.shape[0] < self.codebook_size:  # surplus codes: sampled points (revival sorts them out)
            extra = points[torch.randint(points.shape[0], (self.codebook_size,), generator=self.generator)]
            centroids = torch.where(
                torch.arange(self.codebook_size)[:, None] < points.shape[0], centroids, extra
            )
        self.codebook.data.copy_(centroids.to(self.codebook))
        self.initialized.fill_(True)
        self.is_initialized = True
        self.steps_unused.zero_()
        self.steps_to_revival_check = max(self.dead_code_threshold, 1)
        self.code_bias.zero_()  # offsets fitted to another codebook mean nothing for this one
        self.init_samples = self.init_samples.new_zeros(0, self.dim)

    @torch.no_grad()
    def collect_for_init(self, z: torch.Tensor) -> None:
        """Hold ``z`` (B, D) for the pending k-means init; initialise once ``kmeans_init_samples`` are
        held."""
        held = torch.cat([self.init_samples, z.detach().float().to(self.init_samples.device)])
        self.init_samples = held
        if held.shape[0] >= self.kmeans_init_samples:
            self.init_from(held)

    @torch.no_grad()
    def _revive_dead_codes(self, z: torch.Tensor, code_ids: torch.Tensor) -> None:
        """Count each code's unused steps on the device; revive the codes unused ``dead_code_threshold``
        times in a row.

        Which codes are dead is a device value; reading it every step would make each step wait. The counts
        are read back only at the first step where a code *can* have reached the threshold: after a read
        whose largest count is s, each count grows by at most one per step, so none reaches the threshold T
        in the next T - s - 1 steps. The codes are revived at the very steps a per-step check revives them
        (the same codebooks bit for bit), with one read per T - s steps (about one per T while every code is
        in use) instead of one per step.
        """
        used = code_counts(code_ids, self.codebook_size) > 0  # (K,)
        self.steps_unused.copy_(torch.where(used, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        self.steps_to_revival_check -= 1
        if self.steps_to_revival_check > 0:
            return
        unused = self.steps_unused.tolist()  # the one read, at a step where a code may be dead
        dead = [k for k, n in enumerate(unused) if n >= self.dead_code_threshold]
        x = z.detach().float().to(self.codebook.device)
        for k in dead:
            # Split the batch's most populous group (revived codes included: each one sees the previous).
            assign = self._scores(x).argmin(-1)  # (B,)
            biggest = int(code_counts(assign, self.codebook_size).argmax())  # first on ties
            self.codebook.data[k] = split_seed(x[assign == biggest]).to(self.codebook.dtype)
            self.steps_unused[k] = 0
            unused[k] = 0
        self.steps_to_revival_check = self.dead_code_threshold - max(unused)

    # ------------------------------------------------------------------ balanced final assignment
    @torch.no_grad()
    def fit_balance(
        self, points: torch.Tensor, min_share: float, *, sinkhorn_iters: int = 60, max_repairs: int = 200
    ) -> torch.Tensor:
        """Set ``code_bias`` so that ``nearest(points)`` gives every code >= ceil(min_share * N) points.

        ``points`` (N, D): every user's profile (rows with a NaN/inf are ignored). ``min_share`` in [0, 1/K);
        0 resets the offsets to zero. The offsets stay zero when plain eq. 6 already meets the floor. Returns
        the codes' point counts (K,) under the new offsets (a warning is logged if the floor was not reached,
        e.g. two identical codes, which no offset can separate). See the module docstring for the algorithm.
        """
        self._check_input(points)
        x = points.detach().float().to(self.codebook.device)
        x = x[torch.isfinite(x).all(-1)]
        self.code_bias.zero_()
        return self.fit_balance_distances(
            self._scores(x), min_share, sinkhorn_iters=sinkhorn_iters, max_repairs=max_repairs
        )

    @torch.no_grad()
    def fit_balance_distances(
        self,
        distances: torch.Tensor,
        min_share: float,
        *,
        sinkhorn_iters: int = 60,
        max_repairs: int = 200,
        reduce: RowReduce | None = None,
    ) -> torch.Tensor:
        """``fit_balance`` from the points' (N, K) squared distances to the codes (``_scores`` with zero
        offsets): all the fit reads of the points. ``reduce``: when the rows are split over processes, each
        process passes its rows and a ``RowReduce`` over the processes (e.g. ``utils.distributed.
        rank_reduce``); every process then sets the offsets the fit on all rows gives and returns every
        row's counts. None: this process holds every row."""
        reduce = reduce or local_rows
        size = self.codebook_size
        if isinstance(min_share, bool) or not 0.0 <= float(min_share) < 1.0 / size:
            raise CodebookError(
                f"min_share must be in [0, 1/{size}) for a codebook of {size} codes, got {min_share!r}"
            )
        d2 = distances.float().to(self.codebook.device)
        self.code_bias.zero_()
        n = int(reduce(torch.tensor([d2.shape[0]], dtype=torch.long, device=d2.device), "sum"))
        floor = min(math.ceil(float(min_share) * n - 1e-9), n // size)

        def counts_of(scores: torch.Tensor) -> torch.Tensor:  # every row's nearest-code counts (K,)
            return reduce(code_counts(scores.argmin(-1), size), "sum")

        counts = counts_of(d2)  # (the offsets are zero here)
        if floor <= 0 or int(counts.min()) >= floor:
            return counts
        bias = floor_sinkhorn_offsets(d2.double(), floor, sinkhorn_iters, reduce)
        self.code_bias.copy_(bias.to(self.code_bias))
        # Exact repair on the float32 numbers nearest() uses: raise a short code's offset just past the gap of
        # its (floor - count)-th cheapest outside point. tol: a few float32 ulps of the largest score.
        for _ in range(max_repairs):
            scores = d2 - self.code_bias.float()
            assign = scores.argmin(-1)
            counts = reduce(code_counts(assign, size), "sum")
            if int(counts.min()) >= floor:
                break
            k = int(counts.argmin())  # the shortest code (first on ties)
            outside = assign != k
            gaps = (scores[:, k] - scores.min(-1).values)[outside]  # (rows outside k,) >= 0
            gap = kth_smallest(gaps, floor - int(counts[k]), reduce)
            tol = 1e-6 * float(reduce(_max_or_zero(scores.abs()), "max")) + 1e-30
            self.code_bias[k] += gap + tol
        counts = counts_of(d2 - self.code_bias.float())
        if int(counts.min()) < floor:
            log.warning(
                "fit_balance: could not give every code %d of %d points (counts %s); identical codes?",
                floor, n, counts.tolist(),
            )  # fmt: skip
        return counts

    def _check_input(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[-1] != self.dim:
            raise CodebookError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints and saved objectives from before ``code_bias`` existed assigned plain eq. 6: zeros.
        state_dict.setdefault(prefix + "code_bias", torch.zeros_like(self.code_bias))
        # Pending k-means samples: any number of rows (none in files from before they were saved).
        samples = state_dict.setdefault(prefix + "init_samples", self.init_samples.new_zeros(0, self.dim))
        if isinstance(samples, torch.Tensor) and samples.dim() == 2 and samples.shape[1] == self.dim:
            self.init_samples = self.init_samples.new_empty(samples.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The host copies follow the loaded buffers (read once here, never in a step).
        self.is_initialized = bool(self.initialized)
        self.steps_to_revival_check = 1

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, init={self.init.value}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )


def code_counts(code_ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How many of ``code_ids`` (N,) chose each code: (K,) int64, ``torch.bincount(code_ids, minlength=K)``
    for ids below K but of a fixed size (a CUDA ``bincount`` reads the largest id back to size its output)."""
    counts = torch.zeros(codebook_size, dtype=torch.long, device=code_ids.device)
    return counts.scatter_add_(0, code_ids, torch.ones_like(code_ids))


def split_seed(group: torch.Tensor) -> torch.Tensor:
    """A vector (D,) inside ``group`` (n, D) that splits it: the coordinate-wise median moved along the
    group's first principal direction by the median absolute projection. Median-based, so one far outlier in
    the group neither drags the seed out of the bulk nor becomes the seed (as the farthest point would).
    Deterministic.
    """
    if group.shape[0] == 1:
        return group[0].clone()
    centre = group.median(0).values  # (D,)
    dev = group - centre  # (n, D)
    if not bool(dev.abs().max() > 0):  # every member at the same point: nothing to split
        return centre
    direction = torch.linalg.svd(dev, full_matrices=False).Vh[0]  # (D,) unit
    direction = direction * torch.sign(direction[direction.abs().argmax()])  # SVD's sign is arbitrary: fix it
    proj = (dev @ direction).abs()  # (n,)
    step = proj.median()
    if not bool(step > 0):
        step = proj.max()
    return centre + step * direction


RowReduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``reduce(t, op)``, op "sum" or "max": the element-wise sum / maximum of ``t`` (the same shape on every
process, computed from that process's rows) over every process holding rows; the same result everywhere."""


def local_rows(t: torch.Tensor, op: str) -> torch.Tensor:
    """The ``RowReduce`` of one process holding every row: nothing to combine."""
    return t


def _max_or_zero(t: torch.Tensor) -> torch.Tensor:
    """(1,) largest entry of ``t`` (0 when it is empty: a process may hold no row of the fit)."""
    return t.amax().reshape(1) if t.numel() else t.new_zeros(1)


def column_logsumexp(blocks: Iterable[torch.Tensor], like: torch.Tensor, reduce: RowReduce) -> torch.Tensor:
    """(K,) log-sum-exp over the rows of every block (n_b, K) of every process: ``torch.logsumexp(x, 0)`` of
    their concatenation, streamed (a running maximum and a sum rescaled to it), so no (N, K) copy is made.
    ``like``: a (K,) tensor of the result's dtype and device (for a process without rows)."""
    top = total = None
    for x in blocks:
        if not x.shape[0]:
            continue
        m = x.amax(0)
        if top is None:
            top, total = m, torch.exp(x - m).sum(0)
        else:
            new = torch.maximum(top, m)
            total = total * torch.exp(top - new) + torch.exp(x - new).sum(0)
            top = new
    if top is None or total is None:  # no row here
        top, total = torch.full_like(like, -math.inf), torch.zeros_like(like)
    overall = reduce(top, "max")
    return overall + torch.log(reduce(total * torch.exp(top - overall), "sum"))


def kth_smallest(values: torch.Tensor, k: int, reduce: RowReduce) -> float:
    """The k-th smallest (1-based) of every process's ``values`` (non-negative float32), exactly.

    Non-negative floats order as their int32 bit patterns, so a bisection over those bits with the reduced
    count of values at or below each candidate finds it in 31 steps, whatever the number of values (no
    process sends a value)."""
    bits = values.float().abs().contiguous().view(torch.int32)  # abs: -0.0 counts as +0.0
    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    while lo < hi:
        mid = (lo + hi) // 2
        below = reduce((bits <= mid).sum().reshape(1), "sum")
        if int(below) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))


def floor_sinkhorn_offsets(
    cost: torch.Tensor, floor: int, iters_per_eps: int = 60, reduce: RowReduce | None = None
) -> torch.Tensor:
    """Code offsets b (K,) >= 0 from entropic OT with floor-constrained code marginals on ``cost`` (N, K).

    Maximizes the smoothed dual of min <P, C> s.t. P 1 = 1, P^T 1 >= floor by block coordinate ascent
    (log-domain Sinkhorn whose column step is clipped at 0: a code already at its floor keeps b = 0), eps
    annealed from the mean (row-shifted) cost down to 1e-3 of it. The hard argmin of cost - b is close to
    the floor; ``ProfileQuantizer.fit_balance`` makes it exact. ``reduce``: see ``fit_balance_distances``
    (each process's rows of ``cost``; the row step is local, the column step reduces (K,) numbers).
    """
    reduce = reduce or local_rows
    c = cost - cost.min(-1, keepdim=True).values  # a per-row shift changes no assignment
    total = reduce(torch.stack([c.sum(), c.new_tensor(float(c.numel()))]), "sum")
    scale = float(total[0] / total[1])
    if not scale > 0.0:
        return torch.zeros(cost.shape[1], dtype=cost.dtype, device=cost.device)
    c /= scale
    num_rows, num_codes = c.shape
    g = torch.zeros(num_codes, dtype=cost.dtype, device=cost.device)
    f = torch.empty(num_rows, dtype=cost.dtype, device=cost.device)
    log_floor = math.log(floor)
    # rows in blocks of SINKHORN_BLOCK: an iteration's (rows, K) temporaries stay one block's
    spans = [(a, min(a + SINKHORN_BLOCK, num_rows)) for a in range(0, num_rows, SINKHORN_BLOCK)]
    for eps in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001):
        for _ in range(iters_per_eps):
            for a, b in spans:  # every point's mass is 1
                f[a:b] = -eps * torch.logsumexp((g - c[a:b]) / eps, dim=1)
            columns = column_logsumexp(((f[a:b, None] - c[a:b]) / eps for a, b in spans), g, reduce)
            g_new = (eps * log_floor - eps * columns).clamp(min=0.0)
            # a maximum is exact in any order: every process stops at the same iteration
            done = float(reduce((g_new - g).abs().amax().reshape(1), "max")) < 1e-9
            g = g_new
            if done:
                break
    return g * scale


SINKHORN_BLOCK = 65536  # rows per block of floor_sinkhorn_offsets' iterations


class MultiProfileQuantizer(nn.Module):
    """One ``ProfileQuantizer`` per profile; works on (B, P, D) profile embeddings.

    ``options`` are ``ProfileQuantizer``'s keyword arguments (``beta``, ``init``, ``dead_code_threshold``,
    ``kmeans_init_samples``, ``kmeans_iters``), the same for every profile; profile p is seeded ``seed + p``.

    ``num_levels`` > 1: each profile is a ``userip.codebook.residual.ResidualQuantizer`` of that many levels
    (level 0 of the profile's size, the others of ``residual_sizes`` or, when empty, the profile's size
    again). Code ids are then one column per *field* (``field_names``: profile-major, ``hobby, hobby_r1,
    ...``), (B, P * L); with one level the fields are the profiles and everything is as before.
    """

    def __init__(
        self,
        profile_names: list[str],
        codebook_sizes: list[int],
        dim: int,
        *,
        seed: int = 0,
        num_levels: int = 1,
        residual_sizes: Sequence[int] = (),
        **options: Any,
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
        self.num_levels = num_levels
        if num_levels == 1 and residual_sizes:
            raise CodebookError(f"residual_sizes {list(residual_sizes)} given for a single level")
        if num_levels == 1:
            self.quantizers = nn.ModuleList(
                ProfileQuantizer(dim, size, seed=seed + p, **options) for p, size in enumerate(codebook_sizes)
            )
        else:  # level l of profile p seeded seed + p + LEVEL_SEED_STRIDE * l: level 0 as with one level
            self.quantizers = nn.ModuleList(
                ResidualQuantizer(
                    [
                        ProfileQuantizer(dim, k, seed=seed + p + LEVEL_SEED_STRIDE * level, **options)
                        for level, k in enumerate(residual_level_sizes(size, num_levels, residual_sizes))
                    ]
                )
                for p, size in enumerate(codebook_sizes)
            )
        # One CTR / bank field per (profile, level); with one level, the profiles themselves.
        self.field_names: list[str] = (
            list(profile_names) if num_levels == 1 else level_field_names(profile_names, num_levels)
        )
        self.field_sizes: list[int] = (
            list(codebook_sizes) if num_levels == 1 else [k for q in self.quantizers for k in q.level_sizes]  # type: ignore[union-attr]
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
        """profile_embeds (B, P, D) -> quantized (B, P, D), code_ids (B, F) (one column per field: (B, P)
        with one level), loss (sum over profiles)."""
        self._check_input(profile_embeds)
        outs = [q(profile_embeds[:, p]) for p, q in enumerate(self.quantizers)]
        quantized = torch.stack([o[0] for o in outs], dim=1)
        code_ids = self._field_ids([o[1] for o in outs])
        loss = torch.stack([o[2] for o in outs]).sum()
        return quantized, code_ids, loss

    def nearest(self, profile_embeds: torch.Tensor) -> torch.Tensor:
        """Code ids (B, F) (one column per field; (B, P) with one level) without side effects."""
        self._check_input(profile_embeds)
        return self._field_ids([q.nearest(profile_embeds[:, p]) for p, q in enumerate(self.quantizers)])

    def ids_to_vectors(self, code_ids: torch.Tensor) -> torch.Tensor:
        """code_ids (B, F) -> codebook vectors (B, P, D) (the sum over levels of each profile's codewords)."""
        if code_ids.dim() != 2 or code_ids.shape[1] != len(self.field_names):
            raise CodebookError(
                f"expected code_ids of shape (B, {len(self.field_names)}), got {tuple(code_ids.shape)}"
            )
        if self.num_levels == 1:
            per_profile = [code_ids[:, p] for p in range(len(self.quantizers))]
        else:
            per_profile = list(code_ids.unflatten(1, (len(self.quantizers), self.num_levels)).unbind(1))
        return torch.stack([q.ids_to_vectors(ids) for q, ids in zip(self.quantizers, per_profile)], dim=1)

    def fit_balance(self, profile_embeds: torch.Tensor, min_share: float) -> list[torch.Tensor]:
        """``ProfileQuantizer.fit_balance`` of every profile (every level) on (N, P, D) profiles; the counts
        per field."""
        self._check_input(profile_embeds)
        counts = [q.fit_balance(profile_embeds[:, p], min_share) for p, q in enumerate(self.quantizers)]
        return counts if self.num_levels == 1 else [c for per_level in counts for c in per_level]

    def field_codebooks(self) -> list[torch.Tensor]:
        """Every field's codebook (K_f, D), in ``field_names`` order."""
        if self.num_levels == 1:
            return [q.codebook for q in self.quantizers]
        return [level.codebook for q in self.quantizers for level in q.levels]  # type: ignore[union-attr]

    def _field_ids(self, per_profile: list[torch.Tensor]) -> torch.Tensor:
        """Per-profile ids ((B,) each, or (B, L) with levels) -> (B, F) field ids, profile-major."""
        if self.num_levels == 1:
            return torch.stack(per_profile, dim=1)
        return torch.cat(per_profile, dim=1)

    def init_from(self, profile_embeds: torch.Tensor) -> None:
        """k-means initialise every codebook from (N, P, D) profiles."""
        self._check_input(profile_embeds)
        for p, q in enumerate(self.quantizers):
            q.init_from(profile_embeds[:, p])

    def codebook(self, profile: int | str) -> torch.Tensor:
        """The profile's codebook (K, D); with residual levels, level 0's (``field_codebooks``: all)."""
        quantizer = self.quantizers[self.index(profile)]
        return quantizer.codebook if self.num_levels == 1 else quantizer.levels[0].codebook  # type: ignore[union-attr]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != len(self.quantizers) or x.shape[2] != self.dim:
            raise CodebookError(
                f"expected profile_embeds of shape (B, {len(self.quantizers)}, {self.dim}), "
                f"got {tuple(x.shape)}"
            )
