"""The joint objective of Algorithm 1, as the profile trainer's ``aux`` module.

Per mini-batch of users the trainer computes L_LM and the batch's profile embeddings (B, P, D) (the mean over
each profile's soft tokens) and calls ``aux(user_ids, profile_embeds)``; this module returns

    lambda * (L_VQ + L_rec)                                                   (eq. 7 without L_LM)

where L_VQ is the sum over profiles of eq. 5 and L_rec the surrogate DCN's BCE on ``interactions_per_user``
training interactions per user, sampled by a generator seeded from (seed, step) so a resumed run samples the
same rows. The trainer adds the result to L_LM and takes one optimizer step over soft tokens, codebooks and
surrogate together (Algorithm 1, lines 3-7).

``without_vq=True`` is the paper's ablation: the surrogate reads the continuous profiles and there is no
codebook loss; the bank then stores the surrogate's projected profile vectors (see ``userip.profile.bank``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from userip.codebook.config import QuantizationConfig
from userip.codebook.quantizer import MultiProfileQuantizer, code_counts
from userip.codebook.surrogate import SurrogateRecommender
from userip.data.ids import IdIndex
from userip.data.schema import Dataset
from userip.utils.device import host_to_device


class InteractionSampler:
    """Each user's training interactions as CSR arrays; samples a fixed number per user with replacement."""

    def __init__(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        labels: np.ndarray,
        num_users: int,
        first_user: int = 0,
    ) -> None:
        """Users ``first_user .. first_user + num_users - 1`` (a rank of the distributed profile stage holds
        its range only: the offsets then grow with its users, not with every user)."""
        order = np.argsort(user_ids, kind="stable")
        self.item_ids = np.asarray(item_ids, dtype=np.int64)[order]
        self.labels = np.asarray(labels, dtype=np.float32)[order]
        counts = np.bincount(np.asarray(user_ids, dtype=np.int64) - first_user, minlength=num_users)
        self.indptr = np.concatenate([[0], np.cumsum(counts)])  # (U + 1,)
        self.num_users, self.first_user = num_users, first_user

    @classmethod
    def from_interactions(
        cls, interactions: pd.DataFrame, num_users: int, first_user: int = 0
    ) -> InteractionSampler:
        return cls(
            interactions["user_id"].to_numpy(np.int64),
            interactions["item_id"].to_numpy(np.int64),
            interactions["label"].to_numpy(np.float32),
            num_users,
            first_user,
        )

    def sample(
        self, user_ids: np.ndarray, per_user: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> row_user_pos (N,) (position of the row's user in ``user_ids``), item_ids (N,), labels (N,).

        Users without training interactions (or outside the sampler's users) contribute no rows.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64) - self.first_user
        inside = (user_ids >= 0) & (user_ids < self.num_users)
        safe = np.where(inside, user_ids, 0)
        starts = self.indptr[safe]
        counts = np.where(inside, self.indptr[safe + 1] - starts, 0)  # (B,)
        offsets = np.floor(rng.random((len(user_ids), per_user)) * np.maximum(counts, 1)[:, None]).astype(
            np.int64
        )
        rows = (starts[:, None] + offsets)[counts > 0].ravel()
        row_user_pos = np.repeat(np.nonzero(counts > 0)[0], per_user)
        return row_user_pos, self.item_ids[rows], self.labels[rows]


def _host_ids(user_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """The batch's user ids on the host; a tensor is copied back (callers other than the trainer)."""
    if isinstance(user_ids, torch.Tensor):
        return user_ids.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(user_ids, dtype=np.int64)


def encode_user_features(users: pd.DataFrame) -> tuple[np.ndarray, tuple[int, ...]]:
    """Observable user columns -> (U, F) int64 ids (0 = missing) and the vocabulary sizes (F,)."""
    columns = [c for c in users.columns if c not in ("user_id", "raw_user_id")]
    ids, sizes = [], []
    for col in columns:
        values = users[col].astype("string").fillna("")
        vocab = IdIndex(sorted(set(values) - {""}), first_row=1, missing=0)  # "" (missing) -> 0
        ids.append(vocab.encode(values.to_numpy(dtype=object)))
        sizes.append(len(vocab) + 1)
    if not ids:
        return np.zeros((len(users), 0), dtype=np.int64), ()
    return np.stack(ids, axis=1), tuple(sizes)


class JointObjective(nn.Module):
    """The trainer's ``aux``: forward(user_ids (B,), profile_embeds (B, P, D)) -> (loss, metrics).

    ``loss_weight``, ``interactions_per_user``, ``without_vq`` and ``seed`` come from ``config``
    (``QuantizationConfig``'s defaults when it is None); ``seed`` overrides the config's sampling seed.
    """

    def __init__(
        self,
        quantizer: MultiProfileQuantizer,
        surrogate: SurrogateRecommender,
        sampler: InteractionSampler,
        config: QuantizationConfig | None = None,
        user_features: np.ndarray | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config  # recorded in the bank manifest
        settings = config if config is not None else QuantizationConfig()
        self.quantizer = quantizer
        self.surrogate = surrogate
        self.sampler = sampler
        self.loss_weight = settings.loss_weight
        self.interactions_per_user = settings.interactions_per_user
        self.without_vq = settings.without_vq
        self.seed = settings.seed if seed is None else seed
        # (U, F) int64 on the host: indexed by the host-side user ids, the batch's rows are copied over.
        self.user_features = None if user_features is None else np.asarray(user_features, dtype=np.int64)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # checkpointed: resumes the sampling
        self._steps_done = 0  # ``step`` on the host (kept equal to it): the step never reads the buffer

    @property
    def profile_names(self) -> list[str]:
        return self.quantizer.profile_names

    def with_sampler(
        self, sampler: InteractionSampler, user_features: np.ndarray | None = None
    ) -> JointObjective:
        """The same (shared) quantizer and surrogate over other users' interactions: new-user inference."""
        return JointObjective(
            self.quantizer, self.surrogate, sampler, self.config, user_features, self.seed + 1
        )

    def forward(
        self, user_ids: np.ndarray | torch.Tensor, profile_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``user_ids`` (B,): host ids (numpy, as the trainer has them) or a tensor (copied to the host).
        The metrics are 0-dim device tensors: reading them is left to the caller (the trainer reads them
        only when it logs), so a step never waits on the device."""
        metrics: dict[str, torch.Tensor] = {}
        if self.without_vq:
            profile_vectors, vq_loss = profile_embeds, profile_embeds.new_zeros(())
        else:
            profile_vectors, code_ids, vq_loss = self.quantizer(profile_embeds)  # (B, P, D), (B, F), ()
            for f, name in enumerate(self.quantizer.field_names):  # the profiles, with one level
                metrics[f"perplexity_{name}"] = code_perplexity(code_ids[:, f], self.quantizer.field_sizes[f])
        rec_loss = self._surrogate_loss(_host_ids(user_ids), profile_vectors)
        # also when frozen (new users): each batch draws fresh interaction samples
        self._steps_done += 1
        self.step.fill_(self._steps_done)
        loss = self.loss_weight * (vq_loss + rec_loss)
        metrics.update(vq_loss=vq_loss.detach(), rec_loss=rec_loss.detach(), aux_loss=loss.detach())
        return loss, metrics

    def _surrogate_loss(self, uids: np.ndarray, profile_vectors: torch.Tensor) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self._steps_done])
        pos, item_ids, labels = self.sampler.sample(uids, self.interactions_per_user, rng)
        if len(pos) == 0:  # no user of the batch has a training interaction
            return profile_vectors.new_zeros(())
        device = profile_vectors.device
        feats = None
        if self.user_features is not None:
            feats = host_to_device(self.user_features[uids[pos]], device)  # (N, F)
        logits = self.surrogate(
            profile_vectors[host_to_device(pos, device, np.int64)], host_to_device(item_ids, device), feats
        )
        return nn.functional.binary_cross_entropy_with_logits(logits, host_to_device(labels, device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps_done = int(self.step)  # the host copy the sampling seeds from (read once, at load)

    # ------------------------------------------------------------------ after training
    @torch.no_grad()
    def assign_codes(self, profile_table: torch.Tensor) -> np.ndarray:
        """Final IDs (U, F) int64: nearest code of every user's profile (the paper's post-training step), one
        column per field (``quantizer.field_names``: the profiles, or with residual levels each profile's
        levels)."""
        return self.quantizer.nearest(profile_table).cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def projected_profiles(self, profile_table: torch.Tensor) -> np.ndarray:
        """(U, P, proj_dim) float32: the surrogate's projection of the profiles (``without_vq`` bank)."""
        was_training = self.surrogate.training
        self.surrogate.eval()
        out = self.surrogate.project(profile_table).cpu().numpy().astype(np.float32)
        self.surrogate.train(was_training)
        return out


def code_perplexity(code_ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(entropy) of the batch's code histogram, a 0-dim float64 tensor on ``code_ids``' device: 1 =
    collapse onto one code, K = uniform use. Fixed-size counts (``code_counts``): no read of the ids."""
    counts = code_counts(code_ids.flatten(), codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return entropy.double().exp()


def build_joint_objective(
    dataset: Dataset,
    profile_names: list[str],
    codebook_sizes: list[int],
    profile_dim: int,
    config: QuantizationConfig | None = None,
) -> JointObjective:
    """The ``aux`` module for ``dataset``: codebooks + surrogate over the profile rows only (the training
    split, or a protocol's ``history`` split)."""
    config = config or QuantizationConfig()
    largest = max([*codebook_sizes, *config.residual_sizes])
    quantizer = MultiProfileQuantizer(
        profile_names,
        codebook_sizes,
        profile_dim,
        beta=config.beta,
        init=config.codebook_init,
        dead_code_threshold=config.dead_code_threshold,
        # A dataset smaller than the buffer would wait forever: cap at the number of users.
        kmeans_init_samples=max(largest, min(config.kmeans_init_samples, dataset.num_users)),
        kmeans_iters=config.kmeans_iters,
        seed=config.seed,
        num_levels=config.num_levels,
        residual_sizes=config.residual_sizes,
    )
    user_features, vocab_sizes = (None, ())
    if config.use_user_features:
        user_features, vocab_sizes = encode_user_features(dataset.users)
    surrogate = SurrogateRecommender(
        len(profile_names),
        profile_dim,
        dataset.num_items,
        proj_dim=config.surrogate_proj_dim,
        embed_dim=config.surrogate_embed_dim,
        num_cross_layers=config.surrogate_cross_layers,
        mlp_dims=config.surrogate_mlp_dims,
        dropout=config.surrogate_dropout,
        user_feature_vocab_sizes=vocab_sizes,
    )
    # The surrogate is a recommender: it trains on the profile split's labelled rows, sampled negatives of
    # implicit data included (on positives alone its BCE would only learn "everything is a click").
    lo, hi = dataset.user_range  # a UserShard's sampler holds its users only
    sampler = InteractionSampler.from_interactions(dataset.profile_samples(), hi - lo, lo)
    return JointObjective(quantizer, surrogate, sampler, config, user_features)
