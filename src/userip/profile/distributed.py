"""The profile stage (Algorithm 1) on torch.distributed: users sharded over ranks.

    torchrun --nproc_per_node N -m userip.cli profile --run-dir RUN [--distributed] ...

What each rank holds and does:

* **Its shard of users**: a contiguous range ``[lo, hi)`` of user ids (``shard_bounds``: balanced by the
  number of training examples), its rows of the soft-token table and their ``RowAdam`` state, nothing of
  the other ranks' rows. Rows are indexed locally (``user_id - lo``); the objective gets global ids back.
* **The frozen LM**, replicated (loaded by every rank; it gets no gradients, so nothing to synchronise).
* **The shared codebooks + surrogate** (``JointObjective``) wrapped in ``DistributedDataParallel``: their
  gradients are all-reduced (averaged) in backward, so the identical AdamW steps keep them identical.
  What DDP does not cover is done here: k-means initialisation runs on samples all-gathered from every
  rank (same data, same generator on every rank -> same centroids; the samples held so far are quantizer
  state, so a checkpoint carries them), and after each step the codebooks and
  their dead-code counters are broadcast from rank 0, because dead-code revival edits the codebook in
  forward from the local batch (rank 0's revival wins).
* **Same steps everywhere**: every rank cuts its shard into the same number of micro-batches per epoch
  (``ceil(total examples / train.batch_size)``, so ``train.batch_size`` stays the *global* batch), the LM
  loss is all-reduced for logging and the stopping rule, so all ranks stop at the same step.
* **Checkpoints per rank, one consistent step**: ``checkpoints/dist/step-<S>/rank-<r>/`` (the single-process
  trainer's safetensors + JSON format, content-hashed); once every rank has written step S, rank 0 replaces
  ``checkpoints/dist/COMMIT.json`` atomically, and only then are older steps removed. A rank killed at any
  point leaves COMMIT naming a step that every rank has whole; ``--resume`` loads that step on every rank.
  torch.distributed.checkpoint was not used: its metadata file is a pickle, and this project writes
  safetensors + JSON only.
* **Its users' data only** (``load_rank_data``): the shard bounds come from per-user example counts read one
  row group at a time; each rank then reads only the row groups of its users (``userip.data.shards``) and
  tokenizes only their targets.
* **Its part of the bank** (``write_rank_bank``): each rank assigns its users' codes and writes its part;
  rank 0 commits the version (one atomic pointer naming every part). The balance fit (``balance_min_share``
  > 0) runs on every rank over its own rows, all-reducing (K,) sums, maxima and counts per iteration.
  Gathered to rank 0: the code counts and, on data with true profiles, the (code, truth) pair counts of
  the recovery report; never a per-user row (except with ``quantization.without_vq``, whose k-means
  gathers the profile vectors).

The single-process path (``userip.profile.stage.run_profile_stage``) is untouched by this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from userip.codebook.objective import JointObjective
from userip.codebook.quantizer import CodebookInit
from userip.profile.model import (
    ProfileModel,
    SoftTokenConfig,
    SoftTokenTable,
    init_token_ids,
)
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, micro_batch_mean
from userip.prompts import ExampleSet, PromptBuilder
from userip.utils.artifacts import CorruptArtifactError, save_tensors
from userip.utils.config import to_dict
from userip.utils.distributed import (
    DistContext,
    DistributedError,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    gather_rows_to_main,
    rank_reduce,
)
from userip.utils.io import atomic_write_json, read_json
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)

DIST_CHECKPOINTS = "dist"
COMMIT_FILE = "COMMIT.json"
SHARDS_DIR = "shards"
# Users per noise block of the initial table: block b's noise comes from its own generator, so a user's
# initial soft tokens do not depend on the number of ranks (nor need the whole table to be drawn).
INIT_BLOCK = 65536


# --------------------------------------------------------------------------------------------- sharding
def shard_bounds(example_user_ids: np.ndarray, num_users: int, world_size: int) -> np.ndarray:
    """(world_size + 1,) user-id bounds: rank r owns users ``[b[r], b[r+1])``, contiguous, with about the same
    number of training examples each (users without an example still get a row, in whichever range they
    fall). Raises ``DistributedError`` when a rank would get no example."""
    counts = np.bincount(np.asarray(example_user_ids, dtype=np.int64), minlength=num_users)
    return shard_bounds_from_counts(counts, world_size)


def shard_bounds_from_counts(counts: np.ndarray, world_size: int) -> np.ndarray:
    """``shard_bounds`` from each user's number of examples (``counts[u]``, one entry per user)."""
    if world_size < 1:
        raise DistributedError(f"world_size must be >= 1, got {world_size}")
    num_users = len(counts)
    total = int(counts.sum())
    if total < world_size:
        raise DistributedError(
            f"{total} training examples cannot be shared by {world_size} ranks; use fewer ranks"
        )
    cum = np.cumsum(counts)  # cum[u]: examples of users 0..u
    targets = [math.ceil(total * r / world_size) for r in range(1, world_size)]
    # first user after which at least the target share is covered
    inner = np.searchsorted(cum, targets, side="left") + 1
    bounds = np.concatenate([[0], inner, [num_users]]).astype(np.int64)
    per_rank = [
        int(cum[b - 1] - (cum[a - 1] if a else 0)) if b > a else 0 for a, b in zip(bounds, bounds[1:])
    ]
    if min(per_rank) < 1 or (np.diff(bounds) < 0).any():
        raise DistributedError(
            f"cannot give each of {world_size} ranks a training example (examples per rank {per_rank})"
        )
    return bounds


def local_examples(examples: ExampleSet, lo: int, hi: int) -> ExampleSet:
    """The examples of users ``[lo, hi)`` with user ids shifted to ``0..hi-lo-1`` (the shard's table rows)."""
    sub = examples.subset(range(lo, hi))
    return dataclasses.replace(
        sub,
        user_ids=sub.user_ids - lo,
        skipped_user_ids=sub.skipped_user_ids[(sub.skipped_user_ids >= lo) & (sub.skipped_user_ids < hi)]
        - lo,
    )


def shard_soft_token_table(
    lo: int,
    hi: int,
    input_embeds: torch.Tensor,
    builder: PromptBuilder,
    config: SoftTokenConfig,
    value_words: dict[str, list[str]],
    seed: int,
    device: str | torch.device = "cpu",
) -> SoftTokenTable:
    """Rows ``[lo, hi)`` of an initial table (same rule as ``initial_soft_token_table``), drawn block by
    block (``INIT_BLOCK`` users per generator) so that no rank draws the whole table and the result does not
    depend on the number of ranks. (The noise differs from the single-process table's, which draws all rows
    from one generator; the distribution is the same.)"""
    prompt = builder.config
    ids = init_token_ids(builder, config, value_words)
    slots = [p.num_soft_tokens for p in prompt.profiles]
    table = SoftTokenTable(hi - lo, prompt.num_slots, input_embeds.shape[1], device)
    first, last = lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK if hi > lo else lo // INIT_BLOCK - 1
    for block in range(first, last + 1):
        start = block * INIT_BLOCK
        block_table = SoftTokenTable(INIT_BLOCK, prompt.num_slots, input_embeds.shape[1])
        block_table.initialise(input_embeds, ids, slots, config, seed * 1_000_003 + block + 1)
        a, b = max(lo, start), min(hi, start + INIT_BLOCK)
        table.weight[a - lo : b - lo] = block_table.weight[a - start : b - start].to(table.weight.device)
    return table


# --------------------------------------------------------------------------------------------- the objective
class ShardObjective(nn.Module):
    """The trainer's ``aux`` on one rank: local row ids -> global user ids, the joint objective under DDP,
    k-means initialisation on samples gathered from every rank, codebooks kept identical (see the module
    docstring)."""

    def __init__(self, objective: JointObjective, offset: int, ctx: DistContext) -> None:
        super().__init__()
        self.offset, self.ctx = offset, ctx
        for q in objective.quantizer.quantizers:
            # A quantizer would initialise itself from this rank's batches alone; _kmeans_init feeds it the
            # samples of every rank instead (held in its checkpointed ``init_samples``).
            q.init_from_forward = False
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # find_unused_parameters: the codebooks get no gradient while their k-means init is pending.
        # broadcast_buffers=False: quantizer buffers are synchronised after each step (sync_quantizers).
        self.ddp = DistributedDataParallel(
            objective, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=True
        )

    @property
    def objective(self) -> JointObjective:
        return self.ddp.module  # type: ignore[return-value]

    def forward(
        self, user_ids: np.ndarray, profile_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training:
            self._kmeans_init(profile_embeds)
        return self.ddp(user_ids + self.offset, profile_embeds)

    @torch.no_grad()
    def _kmeans_init(self, profile_embeds: torch.Tensor) -> None:
        quantizers = list(self.objective.quantizer.quantizers)
        pending = [
            p for p, q in enumerate(quantizers) if q.init is CodebookInit.KMEANS and not q.is_initialized
        ]
        if not pending:
            return
        gathered = all_gather_rows(profile_embeds.detach().float(), self.ctx).cpu()  # (sum B_r, P, D)
        for p in pending:
            quantizers[p].collect_for_init(gathered[:, p])  # identical input and generator on every rank

    @torch.no_grad()
    def sync_quantizers(self) -> None:
        """Rank 0's codebooks and dead-code counters to every rank (revival edits them outside autograd)."""
        if self.ctx.world_size == 1:
            return
        for q in self.objective.quantizer.quantizers:
            for t in (q.codebook.data, q.steps_unused):
                if t.device != self.ctx.comm_device:  # e.g. CPU codebook under NCCL
                    buf = t.to(self.ctx.comm_device)
                    dist.broadcast(buf, src=0)
                    t.copy_(buf.to(t.device))
                else:
                    dist.broadcast(t, src=0)


# --------------------------------------------------------------------------------------------- the trainer
class ShardTrainer(ProfileTrainer):
    """``ProfileTrainer`` on one rank's shard: same step count on every rank, reduced loss, per-rank
    checkpoints under one committed step."""

    def __init__(
        self,
        model: ProfileModel,
        examples: ExampleSet,
        config: ProfileTrainConfig,
        ctx: DistContext,
        bounds: np.ndarray,
        batches_per_epoch: int,
        aux: ShardObjective | None = None,
        checkpoint_root: str | Path | None = None,
    ) -> None:
        if len(examples) < batches_per_epoch:
            raise DistributedError(
                f"rank {ctx.rank}: {len(examples)} examples cannot fill {batches_per_epoch} batches per "
                f"epoch; use fewer ranks or a larger train.batch_size (>= number of ranks)"
            )
        # The shard's batch size: the global batch shared by the ranks (recorded in checkpoints, so a
        # resume with another number of ranks is refused by the usual config check too).
        local = dataclasses.replace(
            config,
            batch_size=math.ceil(len(examples) / batches_per_epoch),
            progress=config.progress and ctx.is_main,
        )
        self.ctx, self.bounds = ctx, np.asarray(bounds, dtype=np.int64)
        self.root = Path(checkpoint_root) if checkpoint_root is not None else None
        super().__init__(model, examples, local, aux, self.root, batches_per_epoch)

    def _step(self, group: list[np.ndarray]) -> tuple[float, int, dict[str, float]]:
        losses, tokens, metrics = super()._step(group)
        quantizers = []
        if isinstance(self.aux, ShardObjective) and self.aux_optimizer is not None:
            self.aux.sync_quantizers()
            quantizers = list(self.aux.objective.quantizer.quantizers)
        # The all-reduce waits for the step anyway: read this rank's loss here.
        loss = micro_batch_mean(torch.as_tensor(losses).cpu().tolist())
        # Every rank now holds rank 0's dead-code counts: it takes rank 0's revival schedule with them (its
        # own, from its own counts, could skip a step where the broadcast counts reach the threshold). Sent
        # in the same all-reduce: rank 0's values plus zeros.
        schedules = [float(q.steps_to_revival_check) if self.ctx.rank == 0 else 0.0 for q in quantizers]
        loss_sum, token_sum, *schedule_sums = all_reduce_sum([loss, float(tokens), *schedules], self.ctx)
        for q, steps in zip(quantizers, schedule_sums):
            q.steps_to_revival_check = int(steps)
        return loss_sum / self.ctx.world_size, int(token_sum), metrics

    # ------------------------------------------------------------------ checkpoints
    def _rank_dir(self, step: int) -> Path:
        assert self.root is not None
        return self.root / f"step-{step:08d}" / f"rank-{self.ctx.rank}"

    def save_checkpoint(self) -> Path:
        if self.root is None:
            raise ValueError("ShardTrainer: no checkpoint_root given")
        step = self.state.step
        self.checkpoint_dir = self._rank_dir(step)
        path = super().save_checkpoint()
        barrier(self.ctx)  # every rank has step S on disk ...
        if self.ctx.is_main:  # ... before the commit names it
            atomic_write_json(
                self.root / COMMIT_FILE,
                {"step": step, "world_size": self.ctx.world_size, "bounds": self.bounds.tolist()},
            )
        barrier(self.ctx)  # the commit is on disk before anyone removes the previous step
        for old in self.root.glob("step-*"):
            if old.name != f"step-{step:08d}":
                shutil.rmtree(old / f"rank-{self.ctx.rank}", ignore_errors=True)
        barrier(self.ctx)
        if self.ctx.is_main:
            for old in self.root.glob("step-*"):
                if old.name != f"step-{step:08d}" and not any(old.iterdir()):
                    old.rmdir()
        return path

    def load_checkpoint(self) -> bool:
        if self.root is None or not (self.root / COMMIT_FILE).exists():
            return False
        record = self.root / COMMIT_FILE
        meta = read_json(record)
        try:
            step, world, bounds = int(meta["step"]), int(meta["world_size"]), list(meta["bounds"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptArtifactError(f"{record}: not a commit record ({e!r})") from e
        if world != self.ctx.world_size or bounds != self.bounds.tolist():
            raise DistributedError(
                f"{record}: checkpoint of {world} ranks (user bounds {bounds}); this run has "
                f"{self.ctx.world_size} ranks ({self.bounds.tolist()}): resume with the same number of ranks "
                "or start a fresh run"
            )
        self.checkpoint_dir = self._rank_dir(step)
        if not super().load_checkpoint():
            raise CorruptArtifactError(
                f"{record}: step {step} is committed but {self.checkpoint_dir} is missing"
            )
        if self.state.step != step:
            raise CorruptArtifactError(
                f"{self.checkpoint_dir}: holds step {self.state.step}, the commit says {step}"
            )
        return True


# --------------------------------------------------------------------------------------------- data
class _LazyDataset:
    """The whole dataset, read only if something needs more than its content hash (the offline LM when it
    is not cached yet); a rank that finds the LM never loads every user."""

    def __init__(self, folder: Path) -> None:
        from userip.data.schema import Dataset

        self._folder, self._dataset = folder, None
        self.content_hash = str(Dataset.read_manifest(folder)["content_hash"])

    def __getattr__(self, name: str) -> Any:
        from userip.data.schema import Dataset

        if self._dataset is None:
            log.info("loading the whole dataset (%s is needed)", name)
            self._dataset = Dataset.load(self._folder)
        return getattr(self._dataset, name)


@dataclasses.dataclass
class RankData:
    """What one rank reads: its users' rows (``UserShard``), their examples, the bounds of every rank."""

    shard: Any  # userip.data.shards.UserShard
    examples: ExampleSet  # this rank's users' examples, global user ids
    bounds: np.ndarray
    total_examples: int
    total_skipped: int  # users without a target, over every rank
    value_words: dict[str, list[str]]


def load_rank_data(data_dir: Path, config: Any, builder: PromptBuilder, ctx: DistContext) -> RankData:
    """Bounds from per-user example counts (one row group at a time), then this rank's users only: their
    row groups, their tokenized targets; the soft tokens' value words from every rank's hints."""
    from userip.data.schema import Dataset
    from userip.data.shards import load_user_shard, profile_example_weights
    from userip.profile.model import resolve_value_words
    from userip.prompts import TargetMode, build_examples

    num_users = int(Dataset.read_manifest(data_dir)["counts"]["users"])
    review = builder.config.target_mode is TargetMode.REVIEW
    weights = profile_example_weights(data_dir, num_users, review)
    bounds = shard_bounds_from_counts(weights, ctx.world_size)
    del weights
    lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
    shard = load_user_shard(data_dir, lo, hi, full_users=config.quantization.use_user_features)
    log.info("rank %d: users [%d, %d): row groups read %s", ctx.rank, lo, hi, shard.row_groups_read)
    examples = build_examples(shard, builder)
    total, skipped = all_reduce_sum([float(len(examples)), float(examples.num_skipped_users)], ctx)
    if int(total) == 0:
        raise ValueError("no training examples (every user was skipped: empty targets after filtering)")
    hints = shard.hints
    if hints is not None and ctx.world_size > 1:  # the same value words on every rank: union of the ranks'
        columns = [c for c in hints.columns if c != "user_id"]
        local = {c: sorted({str(v) for v in hints[c].dropna()}) for c in columns}
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, local)
        union = {c: sorted(set().union(*(e[c] for e in everyone))) for c in columns}
        width = max((len(v) for v in union.values()), default=0)
        hints = pd.DataFrame({c: v + [None] * (width - len(v)) for c, v in union.items()})
    value_words = resolve_value_words(config.soft_tokens, config.prompt, hints)
    return RankData(shard, examples, bounds, int(total), int(skipped), value_words)


# --------------------------------------------------------------------------------------------- the bank
def write_rank_bank(
    bank_dir: Path,
    shard: Any,
    objective: JointObjective,
    profile_rows: Callable[[torch.Tensor], torch.Tensor],
    trained_local_rows: np.ndarray,
    ctx: DistContext,
    *,
    lm: str = "",
    template: str = "",
    config: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """This rank's part of a new bank version (users ``shard.user_range``); rank 0 commits it once every
    part is written. Returns (this rank's part: a ``FeatureBank`` of its rows carrying the version's
    manifest, the report on rank 0 / None elsewhere).

    The same codes as ``write_bank`` on the gathered table: balance offsets fitted by every rank on its
    trained rows' squared distances, the per-code sums and counts all-reduced at each iteration (the
    offsets the single-process fit gives on every rank's rows; no row leaves its rank), then each rank takes
    the nearest code of its rows. ``profile_rows(local row ids) -> (n, P, D)``: this rank's profile vectors,
    asked for in blocks of ``PROFILE_BLOCK`` rows; ``trained_local_rows``: the local rows of
    this rank's examples (one per example, as ``write_bank``'s ``trained_user_ids``).
    """
    from userip.feature_bank import KIND_CODES, UNKNOWN_CODE, FeatureBank
    from userip.profile.bank import code_counts, code_report, save_objective_state
    from userip.utils.io import sha256_file

    lo, hi = shard.user_range
    quant_cfg = to_dict(objective.config) if objective.config is not None else {}
    share = objective.config.balance_min_share if objective.config is not None else 0.0
    if objective.config is not None:
        objective.config.check_codebook_sizes(objective.quantizer.codebook_sizes)
    quantizers = list(objective.quantizer.quantizers)
    trained_rows = torch.as_tensor(np.asarray(trained_local_rows, dtype=np.int64))
    # Each row's squared distances to every code (P x K numbers per user), computed block by block so
    # that no (rows, P, D) copy of the profiles is held: the balance fit and the codes need nothing else.
    distances, finite = _code_distances(profile_rows, hi - lo, quantizers)
    codes = np.empty((hi - lo, len(quantizers)), dtype=np.int64)
    with torch.no_grad():
        for p, q in enumerate(quantizers):
            fitted = distances[p][trained_rows][finite[p][trained_rows]]
            # the offsets fit_balance gives on every rank's rows, each rank holding its own
            q.fit_balance_distances(fitted, share, reduce=rank_reduce(ctx))
            del fitted
            if ctx.world_size > 1:  # the same numbers on every rank, to the last bit
                buf = q.code_bias.detach().to(ctx.comm_device)
                dist.broadcast(buf, src=0)
                q.code_bias.copy_(buf.to(q.code_bias.device))
            # nearest(): argmin of the distances less the offsets, as ``assign_codes``
            codes[:, p] = (distances[p] - q.code_bias.detach().float().cpu()).argmin(-1).numpy()
    untrained = np.setdiff1d(np.arange(hi - lo), np.asarray(trained_local_rows, dtype=np.int64))
    codes[untrained] = UNKNOWN_CODE
    codebooks = [q.codebook.detach().cpu().numpy().astype(np.float32) for q in quantizers]
    sizes = [len(cb) for cb in codebooks]
    counts = torch.from_numpy(code_counts(codes, sizes)).to(ctx.comm_device)
    if ctx.world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    counts_np = counts.cpu().numpy()
    recovery = _recovery_report(codes, objective.profile_names, shard, ctx)
    # rank 0: the objective (identical on every rank) and the version's name and time, for every rank
    head: list[Any] = [None]
    if ctx.is_main:
        rel = save_objective_state(objective, bank_dir)
        head = [{"objective_file": rel, "objective_sha256": sha256_file(bank_dir / rel)}]
    part = FeatureBank.build(
        profile_names=objective.profile_names,
        codebooks=codebooks,
        codes=codes,
        raw_user_ids=_raw_user_ids(shard.users, lo, hi),
        dataset_hash=shard.content_hash,
        lm=lm,
        template=template,
        config={**(config or {}), **({"quantization": quant_cfg} if quant_cfg else {})},
        kind=KIND_CODES,
        extra={"codes_source": "nearest_code"},
    )
    digests: list[Any] = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.broadcast_object_list(head, src=0)
        dist.all_gather_object(digests, part.content_digest())
    else:
        digests = [part.content_digest()]
    created = part.manifest["created"] if ctx.is_main else None
    stamp: list[Any] = [(created, part.version.split("-")[0])]
    if ctx.world_size > 1:
        dist.broadcast_object_list(stamp, src=0)
    created, when = stamp[0]
    version = f"{when}-{hashlib.sha256(''.join(digests).encode()).hexdigest()[:8]}"
    part.rename(version, created, num_users=int(counts_np[0, 1:].sum()), extra=head[0])
    record = part.write_part(bank_dir, ctx.rank, ctx.world_size, lo)
    records: list[Any] = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(records, record)
    else:
        records = [record]
    if not ctx.is_main:
        return part, None
    FeatureBank.commit_parts(bank_dir, version, records)
    report = code_report(None, objective.profile_names, sizes, counts_np)
    if recovery is not None:
        report["recovery"] = recovery
    report["bank_version"] = version
    log.info("feature bank %s written to %s in %d parts", version, bank_dir, len(records))
    return part, report


PROFILE_BLOCK = 65536  # rows per block of the bank step's profile vectors


def _code_distances(
    profile_rows: Callable[[torch.Tensor], torch.Tensor], num_rows: int, quantizers: list[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per profile: (num_rows, K_p) squared distances to the codes (``_scores`` with zero offsets) and a
    (num_rows,) mask of rows whose profile is finite; from ``profile_rows(local row ids) -> (n, P, D)``."""
    distances = [torch.empty(num_rows, q.codebook_size) for q in quantizers]
    finite = [torch.empty(num_rows, dtype=torch.bool) for _ in quantizers]
    with torch.no_grad():
        for q in quantizers:
            q.code_bias.zero_()
        for start in range(0, num_rows, PROFILE_BLOCK):
            rows = torch.arange(start, min(start + PROFILE_BLOCK, num_rows))
            block = profile_rows(rows)
            for p, q in enumerate(quantizers):
                x = block[:, p].float()
                distances[p][rows] = q._scores(x).cpu()
                finite[p][rows] = torch.isfinite(x).all(-1).cpu()
    return distances, finite


def _raw_user_ids(users: pd.DataFrame, lo: int, hi: int) -> list[str]:
    ids = users["user_id"].to_numpy()
    rows = users[(ids >= lo) & (ids < hi)]
    if not np.array_equal(rows["user_id"].to_numpy(), np.arange(lo, hi)):
        raise CorruptArtifactError(f"users table: user ids {lo}..{hi - 1} are not all present in order")
    return rows["raw_user_id"].astype(str).tolist()


def _recovery_report(
    codes: np.ndarray, profile_names: list[str], shard: Any, ctx: DistContext
) -> dict[str, Any] | None:
    """``recovery_report`` of every rank's codes, from counts: NMI and ARI depend only on how many users
    share each (code, true value) pair, so each rank counts its pairs and rank 0 scores the summed
    contingency tables (``profile_recovery_entry``), never a row per user."""
    from userip.codebook.recovery import profile_recovery_entry

    if shard.truth is None:
        return None
    lo, hi = shard.user_range
    truth = shard.truth.set_index("user_id")
    factors = list(truth.columns)
    local: list[Any] = []
    for p in range(len(profile_names)):
        users = np.arange(lo, hi)
        keep = (codes[:, p] >= 0) & np.isin(users, truth.index.to_numpy())
        rows = np.column_stack([codes[keep, p], truth.loc[users[keep], factors].to_numpy(np.int64)])
        pairs, counts = np.unique(rows, axis=0, return_counts=True) if len(rows) else (rows, np.zeros(0))
        local.append((pairs, counts))
    everyone: list[Any] = [local]
    if ctx.world_size > 1:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, local)
    if not ctx.is_main:
        return None
    report: dict[str, Any] = {"profiles": {}}
    for p, name in enumerate(profile_names):
        pairs = np.concatenate([e[p][0] for e in everyone]).reshape(-1, 1 + len(factors))
        counts = np.concatenate([e[p][1] for e in everyone]).astype(np.int64)
        true_labels = {f: pairs[:, 1 + j] for j, f in enumerate(factors)}
        report["profiles"][name] = profile_recovery_entry(pairs[:, 0], true_labels, counts)
    return report


# --------------------------------------------------------------------------------------------- the stage
def run_profile_stage_distributed(
    run_dir: str | Path, config: Any = None, resume: bool = False, ctx: DistContext | None = None
) -> Any:
    """``run_profile_stage`` on every rank of an initialised process group; returns the
    ``ProfileStageResult`` on rank 0 and None on the other ranks."""
    from userip.lm.resolve import NO_LM_SPEC, is_no_lm
    from userip.profile.bank import build_aux
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.no_lm import NoLMError
    from userip.profile.stage import (
        ProfileStageConfig,
        _profile_config,
        bind_checkpoints,
        checkpoint_identity,
        plan_resume,
        resolve_stage_lm,
    )
    from userip.utils.distributed import init_distributed
    from userip.utils.seed import seed_everything

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    config = config or ProfileStageConfig()
    config.quantization.check_distributed()
    if is_no_lm(config.lm.name_or_path):  # its examples and trainer are the single-process stage's
        raise NoLMError(
            f"lm {NO_LM_SPEC} is single-process only: run `userip profile` without --distributed / torchrun"
        )
    ctx = ctx or init_distributed(config.lm.device)
    # Only the manifest is read here; the whole dataset only if the offline LM must be pre-trained.
    dataset = _LazyDataset(layout.data)
    # Before any work, on every rank: a resume with another number of ranks is the same named error on each.
    identity = checkpoint_identity(config, dataset, ctx.world_size)
    resume = plan_resume(run_dir, identity, resume)
    if ctx.is_main:
        bind_checkpoints(run_dir, identity, resume)
    if ctx.device.type == "cuda":  # one GPU per rank
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, device=str(ctx.device)))
    # The offline LM is pre-trained (and cached in RUN/lm) once, by rank 0; the others then find it.
    if ctx.is_main:
        lm_path = resolve_stage_lm(run_dir, config, dataset, progress=config.train.progress)  # type: ignore[arg-type]
    barrier(ctx)
    if not ctx.is_main:
        lm_path = resolve_stage_lm(run_dir, config, dataset, progress=False)  # type: ignore[arg-type]
    profile_config = _profile_config(config, lm_path)
    lm_cfg = profile_config.lm
    seed_everything(config.train.seed)
    lm = load_causal_lm(
        lm_cfg.name_or_path, lm_cfg.dtype, lm_cfg.device, lm_cfg.resolved_attn(), tf32=lm_cfg.tf32
    )
    builder = PromptBuilder(load_tokenizer(lm_cfg.name_or_path), config.prompt)
    data = load_rank_data(layout.data, config, builder, ctx)
    bounds, shard_data = data.bounds, data.shard
    lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
    shard = local_examples(data.examples, lo, hi)
    embeddings = lm.get_input_embeddings().weight
    value_words = data.value_words
    table = shard_soft_token_table(
        lo,
        hi,
        embeddings,
        builder,
        config.soft_tokens,
        value_words,
        config.train.seed,
        lm_cfg.resolved_table_device(hi - lo, config.prompt.num_slots, embeddings.shape[1]),
    )
    model = ProfileModel(lm, table, config.prompt)
    objective = build_aux(shard_data, config.prompt.profiles, embeddings.shape[1], config.quantization)
    aux = ShardObjective(objective.to(model.lm_device), lo, ctx)
    batches_per_epoch = math.ceil(data.total_examples / config.train.batch_size)
    log.info(
        "rank %d/%d: users [%d, %d) (%d examples of %d), %d batches per epoch",
        ctx.rank, ctx.world_size, lo, hi, len(shard), data.total_examples, batches_per_epoch,
    )  # fmt: skip
    trainer = ShardTrainer(
        model,
        shard,
        config.train,
        ctx,
        bounds,
        batches_per_epoch,
        aux=aux,
        checkpoint_root=layout.checkpoints / DIST_CHECKPOINTS,
    )
    result = trainer.train(resume=resume)
    template = builder.tokenizer.decode(builder.build("<target>").input_ids)
    return write_rank_outputs(
        run_dir, config, lm_path, aux.objective, table, model, shard, data, template, result, ctx,
    )  # fmt: skip


def write_rank_outputs(
    run_dir: Path,
    config: Any,
    lm_path: str,
    objective: JointObjective,
    table: SoftTokenTable,
    model: ProfileModel,
    shard: ExampleSet,
    data: RankData,
    template: str,
    result: Any,
    ctx: DistContext,
) -> Any:
    """After training, on every rank: its soft tokens, its part of the bank; rank 0 also the manifest, the
    stage record and the report. ``shard``: this rank's examples, local row ids. Returns the
    ``ProfileStageResult`` on rank 0, None elsewhere."""
    from userip.profile.recipe import MANIFEST_FILE, SOFT_TOKENS_FILE
    from userip.profile.stage import (
        ProfileStageResult,
        finish_stage,
        write_bank_report,
        write_stage_record,
    )
    from userip.utils.io import run_relative

    layout = RunLayout(run_dir)
    shard_data, value_words = data.shard, data.value_words
    lo, hi = shard_data.user_range
    bounds = data.bounds
    # Each rank's soft tokens in its own file (never the whole table on one rank).
    trained = torch.zeros(hi - lo, dtype=torch.bool)
    trained[torch.from_numpy(shard.user_ids)] = True
    shard_file = layout.profile / SHARDS_DIR / f"rank-{ctx.rank}-of-{ctx.world_size}.safetensors"
    save_tensors(
        shard_file,
        {"soft_tokens": table.weight, "trained": trained},
        {"user_lo": str(lo), "user_hi": str(hi)},
    )
    if ctx.is_main:
        atomic_write_json(
            layout.profile / MANIFEST_FILE,
            {
                "lm": run_relative(lm_path, run_dir),
                "hidden_size": int(table.weight.shape[-1]),
                "profiles": [dataclasses.asdict(p) for p in config.prompt.profiles],
                "value_words": value_words,
                "dataset_hash": shard_data.content_hash,
                "num_users": shard_data.num_users,
                "num_examples": data.total_examples,
                "num_users_skipped": data.total_skipped,
                "steps": result.steps,
                "final_lm_loss": result.loss_history[-1] if result.loss_history else None,
                "distributed": {
                    "world_size": ctx.world_size,
                    "backend": ctx.backend,
                    "user_bounds": bounds.tolist(),
                    "shards": [
                        f"{SHARDS_DIR}/rank-{r}-of-{ctx.world_size}.safetensors"
                        for r in range(ctx.world_size)
                    ],
                },
            },
        )
        # A single-process table from an earlier run would no longer match this run's bank.
        (layout.profile / SOFT_TOKENS_FILE).unlink(missing_ok=True)
    if objective.without_vq:
        # k-means over every user's projected profile: the one case still gathered to rank 0
        with torch.no_grad():
            local_profiles = model.profile_embeds(torch.arange(hi - lo)).float().cpu()
        profiles = gather_rows_to_main(local_profiles, ctx)
        trained_ids = all_gather_rows(torch.from_numpy(shard.user_ids + lo), ctx).numpy()
        out = None
        if ctx.is_main:
            from userip.data.schema import Dataset

            assert profiles is not None
            out = finish_stage(
                run_dir, config, Dataset.load(layout.data), lm_path, objective, profiles, trained_ids,
                template, result, world_size=ctx.world_size,
            )  # fmt: skip
        barrier(ctx)
        return out
    recorded_lm = run_relative(lm_path, run_dir)
    bank_config = {**to_dict(config), "distributed": {"world_size": ctx.world_size}}
    part, report = write_rank_bank(
        layout.bank, shard_data, objective, lambda rows: model.profile_embeds(rows).float().cpu(),
        shard.user_ids, ctx,
        lm=recorded_lm, template=template, config=bank_config,
    )  # fmt: skip
    out = None
    if ctx.is_main:
        assert report is not None
        # what finish_stage records, with the bank already written by every rank
        write_stage_record(run_dir, config, lm_path)
        write_bank_report(run_dir, report, result, ctx.world_size)
        # rank 0's part (the version's manifest): loading every user here would undo the sharding
        out = ProfileStageResult(part, report, lm_path, report["final_lm_loss"], result.steps)
    barrier(ctx)  # nobody exits (and tears the group down) before the bank is written
    return out
