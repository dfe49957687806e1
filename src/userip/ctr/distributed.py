"""CTR training on torch.distributed: the single-process recipe with the model in DistributedDataParallel.

    torchrun --nproc_per_node N -m userip.cli train --model dcn --run-dir RUN [--with-profiles]

Every rank loads the data and builds the same model (same seed; DDP also broadcasts rank 0's weights). Each
epoch every rank draws the single-process trainer's permutation (same generator, same seed) and trains on its
``DistributedSampler``-style share of it with ``batch_size // world_size`` rows per step; DDP averages the
gradients, so one step of the N ranks sees exactly the rows of one single-process batch (``shard_rows``).
Validation metrics are rank 0's evaluation of the whole split with the single-process code (the numbers one
process reports for these weights), sent to the others so that every rank takes the same early-stopping
decision; the test split is scored by the recipe as in one process. Only rank 0 writes
``RUN/ctr/<model>[+profiles]/`` and its numbers are the ones reported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from userip.ctr.calibration import Calibration
from userip.ctr.data import SplitTensors
from userip.ctr.recipe import CTRResult, train_ctr
from userip.ctr.trainer import CTRTrainerConfig, Trainer
from userip.data.schema import Dataset
from userip.utils.distributed import DistContext, DistributedError, all_reduce_sum


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's rows per step: ``batch_size`` stays the global batch, so it must split evenly."""
    if world_size < 1 or batch_size % world_size:
        raise DistributedError(
            f"batch_size {batch_size} is not divisible by the {world_size} ranks: the global batch is split "
            f"evenly over them; use a multiple of {world_size}"
        )
    return batch_size // world_size


def shard_rows(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of one epoch's shuffled index, as ``DistributedSampler(drop_last=False)`` splits it:
    padded by wrapping around to a multiple of ``world_size`` (every rank takes the same number of steps),
    then rank r takes positions r, r + W, r + 2W, ...

    The split rule is the sampler's, applied here to the trainer's own permutation (drawn by the generator
    that also draws ``user_id_dropout``) rather than to the sampler's (its own seed + epoch stream, yielded as
    Python ints): then with ``B / W`` rows per local step, the W local batches of step b together are exactly
    positions ``[b * B, (b + 1) * B)`` of the permutation, the single-process run's batch b.
    """
    n = perm.numel()
    pad = (-n) % world_size
    if pad:
        perm = torch.cat([perm, perm.repeat(math.ceil(pad / n))[:pad]])
    return perm[rank::world_size]


class DistributedTrainer(Trainer):
    """``Trainer`` whose steps run through ``DistributedDataParallel`` on this rank's share of every epoch.

    ``self.model`` stays the plain model (the optimizer, the fixed-entry masks of a warm start, the best-state
    copies and the checkpoint all use it: state-dict keys without ``module.``); the wrapper is used for the
    training forward/backward only, where it all-reduces the gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CTRTrainerConfig | None = None,
        fixed_masks: dict[str, torch.Tensor] | None = None,
        *,
        ctx: DistContext,
    ) -> None:
        config = config or CTRTrainerConfig()
        self._local_batch = local_batch_size(config.batch_size, ctx.world_size)
        if ctx.device.type == "cuda":  # NCCL: this rank's GPU (cuda:LOCAL_RANK), whatever index config names
            config = dataclasses.replace(config, device=str(ctx.device))
        super().__init__(model, config, fixed_masks)
        self.ctx = ctx
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)

    @property
    def train_module(self) -> nn.Module:
        return self.ddp

    @property
    def step_batch_size(self) -> int:
        return self._local_batch

    def epoch_rows(self, perm: torch.Tensor) -> torch.Tensor:
        return shard_rows(perm, self.ctx.rank, self.ctx.world_size)

    def mean_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        total, rows = all_reduce_sum([float(loss_sum), float(count)], self.ctx)
        return total / rows

    def evaluate(self, split: SplitTensors) -> dict[str, float]:
        return self._on_rank0(lambda: (super(DistributedTrainer, self).evaluate(split), None))[0]

    def validate(self, split: SplitTensors) -> tuple[dict[str, float], Calibration]:
        metrics, calibration = self._on_rank0(lambda: super(DistributedTrainer, self).validate(split))
        assert calibration is not None
        return metrics, calibration

    def _on_rank0(
        self, compute: Callable[[], tuple[dict[str, float], Calibration | None]]
    ) -> tuple[dict[str, float], Calibration | None]:
        """Rank 0 alone evaluates, with the single-process batching, and broadcasts: a sharded evaluation
        could change a row's float result (BLAS blocking depends on the batch), the metrics must be the
        single-process ones, and every rank must take the same early-stopping and checkpoint decisions."""
        keys = ("auc", "logloss", "logloss_raw", "calibration.scale", "calibration.bias")
        values = torch.full((len(keys),), math.nan, dtype=torch.float64)
        error: BaseException | None = None
        if self.ctx.is_main:
            try:
                metrics, calibration = compute()
                cal = [math.nan, math.nan] if calibration is None else [calibration.scale, calibration.bias]
                values = torch.tensor([metrics[k] for k in keys[:3]] + cal, dtype=torch.float64)
            except (ValueError, FloatingPointError) as e:  # e.g. a one-class split: tell the others first
                error = e
        values = values.to(self.ctx.comm_device)
        dist.broadcast(values, src=0)
        if error is not None:
            raise error
        got = dict(zip(keys, values.cpu().tolist()))
        if math.isnan(got["auc"]):
            raise DistributedError("rank 0 could not evaluate the split (see its log)")
        scale, bias = got.pop("calibration.scale"), got.pop("calibration.bias")
        return got, None if math.isnan(scale) else Calibration(scale, bias)


def train_ctr_distributed(
    source: str | Path | Dataset,
    model_name: str = "dcn",
    *,
    ctx: DistContext,
    config: CTRTrainerConfig | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> CTRResult:
    """``userip.ctr.recipe.train_ctr`` on every rank of ``ctx`` (other keyword arguments pass through).

    Every rank returns the same trained weights and validation metrics (test metrics: each rank scores the
    test split itself); only rank 0 writes the outputs (the single-process layout) and shows a progress bar.
    A warm start trains its base model the same way.
    """
    config = config or CTRTrainerConfig()
    local_batch_size(config.batch_size, ctx.world_size)  # before loading anything
    save = bool(kwargs.pop("save", True)) and ctx.is_main
    if not ctx.is_main:
        config = dataclasses.replace(config, progress=False)
    return train_ctr(
        source,
        model_name,
        config=config,
        seed=seed,
        save=save,
        trainer_factory=functools.partial(DistributedTrainer, ctx=ctx),
        **kwargs,
    )


__all__ = ["DistributedTrainer", "local_batch_size", "shard_rows", "train_ctr_distributed"]
