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
* **The bank once**: rank 0 gathers every user's (P, D) profile vector (not the soft tokens, not the Adam
  state) and writes the bank with the single-process code (atomic versioned write).

The single-process path (``userip.profile.stage.run_profile_stage``) is untouched by this module.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
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
from userip.profile.trainer import ProfileTrainer, TrainConfig, micro_batch_mean
from userip.prompts import ExampleSet, PromptBuilder
from userip.utils.artifacts import CorruptArtifactError, save_tensors
from userip.utils.distributed import (
    DistContext,
    DistributedError,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    gather_rows_to_main,
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
    if world_size < 1:
        raise DistributedError(f"world_size must be >= 1, got {world_size}")
    counts = np.bincount(np.asarray(example_user_ids, dtype=np.int64), minlength=num_users)
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
        config: TrainConfig,
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


# --------------------------------------------------------------------------------------------- the stage
def run_profile_stage_distributed(
    run_dir: str | Path, config: Any = None, resume: bool = False, ctx: DistContext | None = None
) -> Any:
    """``run_profile_stage`` on every rank of an initialised process group; returns the
    ``ProfileStageResult`` on rank 0 and None on the other ranks."""
    from userip.data.schema import Dataset
    from userip.profile.bank import build_aux
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.model import resolve_value_words
    from userip.profile.recipe import MANIFEST_FILE, SOFT_TOKENS_FILE
    from userip.profile.stage import (
        ProfileStageConfig,
        ProfileStageResult,
        _profile_config,
        bind_checkpoints,
        checkpoint_identity,
        finish_stage,
        plan_resume,
        resolve_stage_lm,
    )
    from userip.prompts import build_examples
    from userip.utils.distributed import init_distributed
    from userip.utils.io import run_relative
    from userip.utils.seed import seed_everything

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    config = config or ProfileStageConfig()
    ctx = ctx or init_distributed(config.lm.device)
    dataset = Dataset.load(layout.data)
    # Before any work, on every rank: a resume with another number of ranks is the same named error on each.
    identity = checkpoint_identity(config, dataset, ctx.world_size)
    resume = plan_resume(run_dir, identity, resume)
    if ctx.is_main:
        bind_checkpoints(run_dir, identity, resume)
    if ctx.device.type == "cuda":  # one GPU per rank
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, device=str(ctx.device)))
    # The offline LM is pre-trained (and cached in RUN/lm) once, by rank 0; the others then find it.
    if ctx.is_main:
        lm_path = resolve_stage_lm(run_dir, config, dataset, progress=config.train.progress)
    barrier(ctx)
    if not ctx.is_main:
        lm_path = resolve_stage_lm(run_dir, config, dataset, progress=False)
    profile_config = _profile_config(config, lm_path)
    lm_cfg = profile_config.lm
    seed_everything(config.train.seed)
    lm = load_causal_lm(
        lm_cfg.name_or_path, lm_cfg.dtype, lm_cfg.device, lm_cfg.resolved_attn(), tf32=lm_cfg.tf32
    )
    builder = PromptBuilder(load_tokenizer(lm_cfg.name_or_path), config.prompt)
    examples = build_examples(dataset, builder)
    if len(examples) == 0:
        raise ValueError("no training examples (every user was skipped: empty targets after filtering)")
    bounds = shard_bounds(examples.user_ids, dataset.num_users, ctx.world_size)
    lo, hi = int(bounds[ctx.rank]), int(bounds[ctx.rank + 1])
    shard = local_examples(examples, lo, hi)
    embeddings = lm.get_input_embeddings().weight
    value_words = resolve_value_words(config.soft_tokens, config.prompt, dataset.hints)
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
    objective = build_aux(dataset, config.prompt.profiles, embeddings.shape[1], config.quantization)
    aux = ShardObjective(objective.to(model.lm_device), lo, ctx)
    batches_per_epoch = math.ceil(len(examples) / config.train.batch_size)
    log.info(
        "rank %d/%d: users [%d, %d) (%d examples of %d), %d batches per epoch",
        ctx.rank, ctx.world_size, lo, hi, len(shard), len(examples), batches_per_epoch,
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

    # Each rank's soft tokens in its own file (never the whole table on one rank).
    trained = torch.zeros(hi - lo, dtype=torch.bool)
    trained[torch.from_numpy(shard.user_ids)] = True
    shard_file = layout.profile / SHARDS_DIR / f"rank-{ctx.rank}-of-{ctx.world_size}.safetensors"
    save_tensors(
        shard_file,
        {"soft_tokens": table.weight, "trained": trained},
        {"user_lo": str(lo), "user_hi": str(hi)},
    )
    with torch.no_grad():
        local_profiles = model.profile_embeds(torch.arange(hi - lo)).float().cpu()
    profiles = gather_rows_to_main(local_profiles, ctx)
    out: ProfileStageResult | None = None
    if ctx.is_main:
        assert profiles is not None
        atomic_write_json(
            layout.profile / MANIFEST_FILE,
            {
                "lm": run_relative(lm_path, run_dir),
                "hidden_size": int(embeddings.shape[1]),
                "profiles": [dataclasses.asdict(p) for p in config.prompt.profiles],
                "value_words": value_words,
                "dataset_hash": dataset.content_hash,
                "num_users": dataset.num_users,
                "num_examples": len(examples),
                "num_users_skipped": examples.num_skipped_users,
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
        template = builder.tokenizer.decode(builder.build("<target>").input_ids)
        out = finish_stage(
            run_dir,
            config,
            dataset,
            lm_path,
            aux.objective,
            profiles,
            examples.user_ids,
            template,
            result,
            world_size=ctx.world_size,
        )
    barrier(ctx)  # nobody exits (and tears the group down) before the bank is written
    return out
