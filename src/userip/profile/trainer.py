"""Training the soft tokens (and an optional shared ``aux`` module) against the frozen LM.

* Only the batch's table rows get gradients: they are gathered as one leaf tensor per optimizer step and
updated
  with ``RowAdam``; step cost and optimizer traffic do not depend on the number of users.
* Length-bucketed batches (deterministic by seed and epoch) cut padding.
* Gradient accumulation over ``grad_accum_steps`` micro-batches (rows of all micro-batches gathered once).
* Checkpoints every N steps: tensors in safetensors, then step/config/RNG in JSON, both written atomically,
JSON
  last; a killed run resumes from its last checkpoint and ends with the same table as an uninterrupted run.
  The tensors carry their content hash (``userip.utils.artifacts``): a truncated or altered checkpoint is a
  ``CorruptArtifactError`` on ``--resume``, never a silently different run.
* Joint training hook: ``aux.forward(user_ids (B,), profile_embeds (B, P, D)) -> (loss, metrics)``; its loss
  (already weighted by its owner) is added to the LM loss; ``aux.parameters()`` train with a dense AdamW.
  ``user_ids`` is the host-side int64 numpy array of the batch's (unique) users; ``metrics`` values are floats
  or 0-dim tensors, read (all in one copy) only when the trainer logs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from userip.profile.model import ProfileModel
from userip.profile.optim import RowAdam
from userip.prompts import ExampleSet, collate
from userip.utils.artifacts import CorruptArtifactError, load_tensors, save_tensors
from userip.utils.config import ConfigError, check_fields, to_dict
from userip.utils.device import host_to_device
from userip.utils.io import atomic_write_json, read_json
from userip.utils.threads import set_intra_op_threads

log = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
AUTO_CUDA_PAD_MULTIPLE = 64  # ``pad_to_multiple_of: 0`` on CUDA
# Keys that fix the batch order and update rule: a resumed run must use the same values to match.
_RESUME_KEYS = (
    "batch_size",
    "grad_accum_steps",
    "seed",
    "bucket_by_length",
    "bucket_window",
    "lr",
    "weight_decay",
)


@dataclasses.dataclass
class ProfileTrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    aux_lr: float = 1e-3
    aux_weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum_steps: int = 1
    num_epochs: int = 1
    max_steps: int = 0  # 0: no limit (num_epochs decides)
    checkpoint_every: int = 100  # steps; 0: only at the end
    seed: int = 0
    bucket_by_length: bool = True
    bucket_window: int = 32  # batches whose examples are length-sorted together
    train_aux: bool = True  # False: aux frozen (e.g. fitting new users against a trained codebook)
    # Pad each batch's length to a multiple of this: a few fixed shapes instead of one per length (GPU
    # kernels and their caches are per shape; a GPT-2 shape in bf16 on an H100 ran 6.6k tokens/s unpadded,
    # 65k at 64, 87k at 256). 0: automatic, AUTO_CUDA_PAD_MULTIPLE on CUDA and 1 (no padding) on CPU.
    pad_to_multiple_of: int = 0
    # Recompute each decoder layer in the backward pass (``ProfileModel.set_activation_checkpointing``): a 7B
    # LM at batch 64 x 256 then fits in 80 GB, at the cost of one more forward per step.
    activation_checkpointing: bool = False
    # Steps between two reads of the loss (the device is waited for only then: a GPU step never syncs).
    log_every: int = 20
    progress: bool = True
    # Stop after an epoch whose mean LM loss improved on the previous epoch's by less than this fraction
    # (0: always run num_epochs). A pretrained LM's loss flattens within a few epochs; on a CPU each epoch
    # of ML-100K costs minutes.
    min_epoch_improvement: float = 0.0

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive_ints=(
                "batch_size",
                "grad_accum_steps",
                "num_epochs",
                "bucket_window",
                "log_every",
            ),
            counts=("max_steps", "checkpoint_every", "pad_to_multiple_of"),
            flags=("activation_checkpointing",),
            positive_numbers=("lr", "aux_lr"),
            nonnegative_numbers=("weight_decay", "aux_weight_decay"),
            fractions=("min_epoch_improvement",),
            where="train",
        )


# The name this config had before it said which stage it belongs to (issue 28); kept for old code.
TrainConfig = ProfileTrainConfig


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    bucket_by_length: bool = True,
    window: int = 32,
    num_batches: int | None = None,
) -> list[np.ndarray]:
    """Example indices per micro-batch for one epoch; a pure function of its arguments (so resumable).

    Bucketing: shuffle, sort each window of ``window * batch_size`` examples by length, cut into batches, then
    shuffle the batch order, so a batch holds similar lengths while epochs still differ.
    ``num_batches``: cut into exactly that many batches of near-equal size instead of ``batch_size`` each
    (distributed ranks must take the same number of steps whatever their shard's size).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if bucket_by_length:
        span = window * batch_size
        chunks = [order[i : i + span] for i in range(0, len(order), span)]
        order = (
            np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks]) if chunks else order
        )
    if num_batches is None:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches = np.array_split(order, num_batches)
    if bucket_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)
    stopped_early: bool = False  # the stopping rule ended training (a resume does not continue it)


class TrainingExamples(Protocol):
    """What the training loop reads of its examples (``ExampleSet``; the no-LM ``UserExamples``)."""

    user_ids: np.ndarray  # (N,) the user of each example

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray: ...  # (N,) for length bucketing

    @property
    def num_skipped_users(self) -> int: ...


@dataclasses.dataclass
class StepRows:
    """The table rows of one optimizer step (``ProfileTrainer._step_rows``)."""

    batch_users: list[np.ndarray]  # per micro-batch, its examples' user ids (host)
    row_ids: np.ndarray  # (R,) the step's distinct users, sorted
    rows: torch.Tensor  # (R, S, D) their soft tokens: one leaf with grad, on the model's step device
    inverse: torch.Tensor  # (sum of micro-batch sizes,) each example's position in ``rows`` (device)
    bounds: np.ndarray  # (n + 1,) micro-batch k's examples are ``inverse[bounds[k]:bounds[k + 1]]``

    def example_rows(self, k: int) -> torch.Tensor:
        """(B_k, S, D) micro-batch ``k``'s rows, one per example (differentiable)."""
        return self.rows[self.inverse[int(self.bounds[k]) : int(self.bounds[k + 1])]]


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    loss_history: list[float]  # per step, the loss named by ``loss_name``
    aux_metrics: dict[str, float]
    loss_name: str = "lm_loss"  # the no-LM trainer records its objective's loss instead

    @property
    def lm_loss_history(self) -> list[float]:
        """The LM loss per step; empty when no LM was trained against."""
        return self.loss_history if self.loss_name == ProfileTrainer.LOSS_NAME else []

    @property
    def final_lm_loss(self) -> float | None:
        return self.lm_loss_history[-1] if self.lm_loss_history else None


class ProfileTrainer:
    LOSS_NAME = "lm_loss"  # what ``_step`` returns per micro-batch (the history, the log, the stopping rule)

    def __init__(
        self,
        model: ProfileModel,
        examples: ExampleSet,
        config: ProfileTrainConfig,
        aux: nn.Module | None = None,
        checkpoint_dir: str | Path | None = None,
        batches_per_epoch: int | None = None,
    ) -> None:
        """``batches_per_epoch``: a fixed number of micro-batches per epoch (``plan_batches(num_batches=)``)
        instead of ``ceil(len(examples) / batch_size)``; the distributed trainer's ranks use it."""
        if len(examples) == 0:
            raise ValueError("no training examples (every user was skipped: empty targets after filtering)")
        self.model, self.examples, self.config, self.aux = model, examples, config, aux
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.optimizer = RowAdam(model.table.weight, lr=config.lr, weight_decay=config.weight_decay)
        self.aux_optimizer: torch.optim.Optimizer | None = None
        if aux is not None:
            params = [p for p in aux.parameters() if p.requires_grad]
            if config.train_aux and params:
                self.aux_optimizer = torch.optim.AdamW(
                    params, lr=config.aux_lr, weight_decay=config.aux_weight_decay
                )
            if not config.train_aux:
                aux.requires_grad_(False)
        self.lengths = examples.lengths
        self.batches_per_epoch = batches_per_epoch
        num_batches = batches_per_epoch or math.ceil(len(examples) / config.batch_size)
        self.steps_per_epoch = math.ceil(num_batches / config.grad_accum_steps)
        total = self.steps_per_epoch * config.num_epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.state = TrainState()
        self._prepare_step()
        # Step losses not read yet (device tensors, or floats from a subclass): ``_read_losses``.
        self._unread_losses: list[torch.Tensor | float] = []
        self._ema: float | None = None
        self._plan: tuple[int, list[np.ndarray]] | None = None  # (epoch, its batches): _epoch_batches

    def _prepare_step(self) -> None:
        """The LM's share of the setup: threads for its step cost, batch padding, activation checkpointing."""
        model, config = self.model, self.config
        # A step is about 6 FLOPs per LM parameter per token (forward + backward through the frozen LM).
        lm_params = sum(p.numel() for p in model.lm.parameters())
        tokens_per_step = float(np.mean(self.lengths)) * config.batch_size
        set_intra_op_threads(None, 6.0 * lm_params * tokens_per_step, "profile stage")
        self.pad_to_multiple_of = config.pad_to_multiple_of or (
            AUTO_CUDA_PAD_MULTIPLE if model.lm_device.type == "cuda" else 1
        )
        model.set_activation_checkpointing(config.activation_checkpointing)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """``plan_batches`` of ``epoch``, planned once per epoch (not once per step: the plan permutes every
        example of the shard)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = None  # the previous epoch's plan goes before the next is built
            cfg = self.config
            plan = plan_batches(
                self.lengths,
                cfg.batch_size,
                cfg.seed,
                epoch,
                cfg.bucket_by_length,
                cfg.bucket_window,
                self.batches_per_epoch,
            )
            self._plan = (epoch, plan)
        return self._plan[1]

    # ------------------------------------------------------------------ training
    def train(self, resume: bool = False, stop_after_steps: int | None = None) -> TrainResult:
        """Train to ``total_steps``. ``stop_after_steps`` stops early *without* a checkpoint (simulates a
        kill)."""
        cfg = self.config
        if resume and self.load_checkpoint():
            log.info("resumed from step %d (epoch %d)", self.state.step, self.state.epoch)
        if self.aux is not None:
            self.aux.train(cfg.train_aux)
        start_time, start_tokens = time.perf_counter(), self.state.tokens
        step_metrics: dict[str, Any] = {}  # the last step's aux metrics, as aux returned them
        aux_metrics: dict[str, float] = {}  # ... read as floats at step ``metrics_step``
        metrics_step = self.state.step
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="profile",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        try:
            while self.state.step < self.total_steps and not self.state.stopped_early:
                if stop_after_steps is not None and self.state.step >= stop_after_steps:
                    break
                batches = self._epoch_batches(self.state.epoch)
                k = self.state.step_in_epoch
                group = batches[k * cfg.grad_accum_steps : (k + 1) * cfg.grad_accum_steps]
                if not group:  # epoch finished
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    self._read_losses()
                    self.state.stopped_early = self._loss_flattened()
                    continue
                step_losses, tokens, step_metrics = self._step(group)
                self.state.step += 1
                self.state.step_in_epoch += 1
                self.state.tokens += tokens
                self._unread_losses.append(step_losses)
                bar.update(1)
                if self.state.step % cfg.log_every == 0 or self.state.step == self.total_steps:
                    self._read_losses()  # the only wait on the device between checkpoints
                    ema = self._ema
                    aux_metrics, metrics_step = _floats(step_metrics), self.state.step
                    elapsed = time.perf_counter() - start_time
                    tok_s = (self.state.tokens - start_tokens) / max(elapsed, 1e-9)
                    bar.set_postfix(
                        loss=f"{ema:.4f}",
                        tok_s=f"{tok_s:.0f}",
                        **{k: f"{v:.4g}" for k, v in aux_metrics.items()},
                    )
                    extra = " ".join(f"{k}={v:.4g}" for k, v in aux_metrics.items())
                    log.info(
                        "step %d/%d epoch %d %s %.4f tokens/s %.0f %s",
                        self.state.step,
                        self.total_steps,
                        self.state.epoch,
                        self.LOSS_NAME,
                        ema,
                        tok_s,
                        extra,
                    )
                if (
                    self.checkpoint_dir
                    and cfg.checkpoint_every
                    and self.state.step % cfg.checkpoint_every == 0
                ):
                    self.save_checkpoint()
        finally:
            bar.close()
        self._read_losses()
        finished = self.state.step >= self.total_steps or self.state.stopped_early
        if finished and self.checkpoint_dir is not None:
            self.save_checkpoint()
        return TrainResult(
            self.state.step,
            self.state.tokens - start_tokens,
            time.perf_counter() - start_time,
            list(self.state.loss_history),
            aux_metrics if metrics_step == self.state.step else _floats(step_metrics),
            self.LOSS_NAME,
        )

    def _read_losses(self) -> None:
        """Move the unread step losses into ``state.loss_history`` (one device-to-host copy for all of them)
        and advance the progress EMA. A step's LM loss is the mean of its micro-batches' losses, summed in
        Python doubles in micro-batch order (as a per-step ``.item()`` would have)."""
        if not self._unread_losses:
            return
        pending, self._unread_losses = self._unread_losses, []
        tensors = [x for x in pending if isinstance(x, torch.Tensor)]
        values = iter(torch.cat(tensors).cpu().tolist()) if tensors else iter(())
        for x in pending:
            loss = (
                micro_batch_mean([next(values) for _ in range(len(x))]) if isinstance(x, torch.Tensor) else x
            )
            self.state.loss_history.append(loss)
            self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss

    def _loss_flattened(self) -> bool:
        """The stopping rule, at an epoch's end: did its mean LM loss improve on the previous epoch's by
        less than ``min_epoch_improvement`` (relative)?"""
        n, history = self.steps_per_epoch, self.state.loss_history
        if self.config.min_epoch_improvement <= 0 or len(history) < 2 * n:
            return False
        last, before = float(np.mean(history[-n:])), float(np.mean(history[-2 * n : -n]))
        improvement = (before - last) / max(abs(before), 1e-12)
        log.info("epoch %d: mean LM loss %.4f (previous %.4f, %+.2f%%)", self.state.epoch, last, before,
                 -100 * improvement)  # fmt: skip
        if improvement < self.config.min_epoch_improvement:
            log.info("stopping: below train.min_epoch_improvement %g", self.config.min_epoch_improvement)
            return True
        return False

    def _step(self, group: list[np.ndarray]) -> tuple[torch.Tensor | float, int, dict[str, Any]]:
        """One optimizer step over ``group``'s micro-batches; never waits on the device (no ``.item()``, no
        device-to-host copy, no branch on a tensor's value: ``tests/profile/test_step_device.py``).

        Host-side bookkeeping (which rows, where each example's row is) is numpy; the batches are built on
        the LM's device (``collate(device=)``). Returns (the micro-batches' LM losses (n,), left on the
        device until ``_read_losses``; real tokens; the aux objective's metrics as it returned them).
        """
        model, examples = self.model, self.examples
        batches = [
            collate(
                [examples[int(i)] for i in idx],
                examples.builder.pad_token_id,
                model.prompt_config.template_sees_soft_tokens,
                model.lm_dtype,
                self.pad_to_multiple_of,
                model.device,
            )
            for idx in group
        ]
        step = self._step_rows(group)
        losses, aux_metrics = [], {}
        for k, batch in enumerate(batches):
            nll, num_targets = model(batch, step.example_rows(k))
            loss = nll / num_targets.clamp(min=1)
            losses.append(loss.detach())
            if self.aux is not None:
                aux_loss, aux_metrics = self._aux_loss(step, k)
                loss = loss + aux_loss
            (loss / len(batches)).backward()
        self._update(step)
        return torch.stack(losses), sum(b.num_tokens for b in batches), aux_metrics

    def _step_rows(self, group: list[np.ndarray]) -> StepRows:
        """The rows of every micro-batch of ``group`` as one leaf: gradients of repeated users (review mode,
        accumulation) add up."""
        batch_users = [self.examples.user_ids[idx] for idx in group]
        row_ids, inverse = np.unique(np.concatenate(batch_users), return_inverse=True)  # sorted (R,)
        rows = self.model.gather_rows(torch.from_numpy(row_ids)).requires_grad_(True)  # (R, S, D) fp32
        bounds = np.cumsum([0] + [len(users) for users in batch_users])
        return StepRows(batch_users, row_ids, rows, host_to_device(inverse, rows.device, np.int64), bounds)

    def _aux_loss(self, step: StepRows, k: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``aux`` on micro-batch ``k``'s users (each once) and their profile vectors."""
        unique_users = np.unique(step.batch_users[k])
        positions = host_to_device(np.searchsorted(step.row_ids, unique_users), step.rows.device, np.int64)
        embeds = self.model.profile_embeds_from(step.rows[positions])
        # host ids: the objective samples each user's interactions on the host, no copy back
        return self.aux(unique_users, embeds)

    def _update(self, step: StepRows) -> None:
        """The optimizer step of the rows (``RowAdam``) and of ``aux`` (AdamW, when it trains)."""
        self.optimizer.step(torch.from_numpy(step.row_ids), step.rows.grad)
        if self.aux_optimizer is not None:
            self.aux_optimizer.step()
            self.aux_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("ProfileTrainer: no checkpoint_dir given")
        self._read_losses()  # the recorded state holds every step's loss
        folder = self.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {"table": self.model.table.weight}
        tensors.update({f"adam.{k}": v for k, v in self.optimizer.state_tensors().items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        aux_param_groups = None
        if self.aux is not None:
            # clone: tied/shared parameters cannot be saved twice by safetensors
            tensors.update({f"aux.{k}": v.detach().clone() for k, v in self.aux.state_dict().items()})
        if self.aux_optimizer is not None:
            opt_state = self.aux_optimizer.state_dict()
            aux_param_groups = opt_state["param_groups"]
            for pid, state in opt_state["state"].items():
                for key, value in state.items():
                    tensors[f"aux_opt.{pid}.{key}"] = torch.as_tensor(value).detach().clone()
        name = f"ckpt-{self.state.step:08d}.safetensors"
        save_tensors(folder / name, tensors)
        atomic_write_json(
            folder / CHECKPOINT_JSON,
            {
                "tensors": name,
                "state": dataclasses.asdict(self.state),
                "config": to_dict(self.config),
                "aux_param_groups": aux_param_groups,
            },
        )
        for old in folder.glob("ckpt-*.safetensors"):  # only after the JSON points at the new file
            if old.name != name:
                old.unlink()
        log.info("checkpoint at step %d -> %s", self.state.step, folder / name)
        return folder / name

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint_dir``; False when there is none."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / CHECKPOINT_JSON).exists():
            return False
        record = self.checkpoint_dir / CHECKPOINT_JSON
        meta = read_json(record)
        try:
            saved, now = dict(meta["config"]), to_dict(self.config)
            tensors_name, state = str(meta["tensors"]), dict(meta["state"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptArtifactError(
                f"{record}: not a checkpoint record (expected keys config, tensors, state; {e!r})"
            ) from e
        if Path(tensors_name).name != tensors_name or not tensors_name.startswith("ckpt-"):
            # The record names a file in its own folder; anything else is corrupt or hostile.
            raise CorruptArtifactError(f"{record}: tensors {tensors_name!r} is not a checkpoint file name")
        changed = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if changed:
            raise ConfigError(
                f"{self.checkpoint_dir / CHECKPOINT_JSON}: cannot resume, {changed} differ from the "
                f"checkpoint "
                f"({ {k: saved.get(k) for k in changed} }); use the same values or start a fresh run"
            )
        tensors = load_tensors(
            self.checkpoint_dir / tensors_name, "profile checkpoint", required=("table", "rng.torch")
        )
        table = self.model.table.weight
        if tensors["table"].shape != table.shape:
            raise ValueError(
                f"checkpoint table shape {tuple(tensors['table'].shape)} != model table "
                f"{tuple(table.shape)}: different dataset, template or LM"
            )
        table.copy_(tensors["table"])
        self.optimizer.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("adam.")})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
        if self.aux is not None:
            aux_state = {k[4:]: v for k, v in tensors.items() if k.startswith("aux.")}
            try:
                self.aux.load_state_dict(aux_state)
            except RuntimeError as e:  # missing keys or shapes: another objective's checkpoint
                raise CorruptArtifactError(
                    f"{self.checkpoint_dir / tensors_name}: its codebooks/surrogate do not fit this run ({e})"
                ) from e
        if self.aux_optimizer is not None and meta.get("aux_param_groups") is not None:
            aux_opt_state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("aux_opt."):
                    _, pid, name = key.split(".", 2)
                    aux_opt_state.setdefault(int(pid), {})[name] = value
            self.aux_optimizer.load_state_dict(
                {"state": aux_opt_state, "param_groups": meta["aux_param_groups"]}
            )
        try:
            self.state = TrainState(**state)
        except TypeError as e:
            raise CorruptArtifactError(f"{record}: unreadable training state ({e})") from e
        return True


def micro_batch_mean(losses: Sequence[float]) -> float:
    """A step's LM loss: the mean of its micro-batches' losses, summed in Python doubles in their order."""
    total = 0.0
    for loss in losses:
        total += loss / len(losses)
    return total


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """The aux metrics as floats: device tensors are read back together, in one copy (at log time only)."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = {}
    if tensors:
        # float64 holds every float32 value exactly: the same floats as a ``.item()`` per metric
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in tensors.values()])
        values = dict(zip(tensors, stacked.cpu().tolist()))
    return {k: values[k] if k in values else float(v) for k, v in metrics.items()}
