"""Train a CTR model on in-memory tensors: BCE with logits, Adam, early stopping on validation AUC, a
Platt calibration of the logit fitted on validation, and a checkpoint chosen on AUC and calibrated Logloss.

Batches are slices of a shuffled index over the split's tensors (``x_ids[perm[i:i + B]]``): no DataLoader and
no per-row Python, which is what keeps a small CTR model's step time dominated by the model itself. Evaluation
runs under ``torch.inference_mode()`` in large batches.

Stopping and checkpoint rule (docs/ctr_training.md): training stops after ``patience`` epochs without a
validation-AUC gain (not before ``min_epochs``). After every epoch a Platt calibration
(``userip.ctr.calibration``) is fitted on the validation logits; the weights kept are those of the epoch with
the lowest *calibrated* validation Logloss among the epochs whose validation AUC is within
``checkpoint_auc_tolerance`` of the best, so ranking quality comes first and, among rankings equal to within
noise, the one whose probabilities are best. The kept weights and their calibration are held in memory,
optionally written to safetensors (calibration included) whenever the choice changes, and restored when
training ends.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from userip.ctr.calibration import CALIBRATION_METHODS, IDENTITY, Calibration, fit_calibration
from userip.ctr.data import USER_COLUMN, SplitTensors
from userip.ctr.features import UNKNOWN_INDEX
from userip.evaluation.metrics import ctr_metrics
from userip.utils.artifacts import save_tensors
from userip.utils.config import ConfigError, check_fields
from userip.utils.logging import get_logger
from userip.utils.threads import dense_flops_per_row, set_intra_op_threads

log = get_logger(__name__)

# Inference batch: 4k-16k rows keep DCN's activations in cache; 65536 measured ~3x slower per row on CPU.
DEFAULT_EVAL_BATCH = 8192


@dataclasses.dataclass
class CTRTrainerConfig:
    """Optimisation settings for one CTR training run (keys equal constructor arguments).

    The default batch size, 1024, is a compromise for CTR tables of 10^4-10^6 rows: the paper's 128 (used for
    the profile stage) is 8x slower per epoch on CPU, and 4096 (the benchmark's) takes too few steps per epoch
    on MovieLens-100K's 80k training rows for Adam at lr 1e-3 to converge in a handful of epochs.
    """

    lr: float = 1e-3
    batch_size: int = 1024
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    max_epochs: int = 30
    # Epochs without a validation-AUC gain before stopping (best weights are restored). With 2, runs with
    # profile fields on ML-100K stopped at a transient dip in epochs 3-5 in 3 of 5 seeds (AUC -0.008) while
    # the others trained to epoch ~15; 5 costs at most 5 cheap extra epochs.
    patience: int = 5
    # No early stop before this epoch. On the synthetic default an MLP-based model sometimes sits on a plateau
    # (valid AUC ~0.64, best epoch 2) for more than `patience` epochs before it learns the user x item
    # interactions (the other seeds' best epochs: 19-53); a floor lets such a run leave it. The best weights
    # are still the best validation epoch's.
    min_epochs: int = 0
    min_delta: float = 0.0  # a gain must exceed this to count as an improvement
    weight_decay: float = 0.0  # Adam (coupled L2) on dense, non-embedding parameters
    embedding_weight_decay: float = 0.0  # Adam (coupled L2) on nn.Embedding tables
    # Share of training rows (redrawn every epoch) whose user_id is replaced by the unknown index 0, so that
    # row of the user embedding learns what to predict for a user never seen in training (cold start). With
    # 0 it never gets a gradient and every unseen user is scored from a random vector.
    user_id_dropout: float = 0.0
    # With profile (or attribute) fields: first train the model without them under these same settings and
    # seed, then extend it (userip.ctr.extend): the extra fields start at zero, the base model's weights stay
    # fixed and the start is validation epoch 0, so the extra fields cannot lower validation AUC.
    warm_start: bool = False
    # Embedding tables with sparse gradients (nn.Embedding(sparse=True)) stepped by torch.optim.SparseAdam: a
    # step touches, and under DistributedDataParallel all-reduces, only the rows in its batch instead of
    # every row of every table (64 MB per step at 1M users x 16 dims). SparseAdam is lazy Adam (rows absent
    # from a batch keep their moments and do not move), so results differ from dense Adam's; it has no weight
    # decay, so embedding_weight_decay must be 0. For tables too large to step densely; off by default.
    sparse_embeddings: bool = False
    # Fitted on the validation logits (userip.ctr.calibration): "platt" (scale and bias) or "none".
    calibration: str = "platt"
    # Checkpoint choice: among the epochs whose validation AUC is within this of the best epoch's, the one
    # with the lowest calibrated validation Logloss (0: the best-AUC epoch). 0.001 is below the seed-to-seed
    # std of validation AUC in every table (0.002-0.005), so the choice never trades a real AUC difference.
    checkpoint_auc_tolerance: float = 0.001
    seed: int = 0
    device: str = "cpu"
    # torch.set_num_threads (process-wide); None: userip.utils.threads picks it from the model's size
    num_threads: int | None = None
    progress: bool = False  # tqdm bar per epoch; library calls stay silent by default

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive_ints=("batch_size", "eval_batch_size", "max_epochs", "patience"),
            optional_positive_ints=("num_threads",),
            positive_numbers=("lr",),
            nonnegative_numbers=(
                "min_delta",
                "weight_decay",
                "embedding_weight_decay",
                "checkpoint_auc_tolerance",
            ),
            fractions=("user_id_dropout",),
            devices=("device",),
            choices={"calibration": CALIBRATION_METHODS},
        )
        if not isinstance(self.min_epochs, int) or not 0 <= self.min_epochs <= self.max_epochs:
            raise ConfigError(
                f"CTRTrainerConfig.min_epochs must be an integer in [0, max_epochs], got {self.min_epochs!r} "
                f"with max_epochs {self.max_epochs!r} (a trainer section updates its defaults: lowering "
                "max_epochs may need min_epochs too)"
            )
        if self.sparse_embeddings and self.embedding_weight_decay > 0:
            raise ConfigError(
                "CTRTrainerConfig.sparse_embeddings: SparseAdam has no weight decay; set "
                f"embedding_weight_decay to 0 (got {self.embedding_weight_decay})"
            )


# The name this config had before it said which stage it belongs to (issue 28); kept for old code.
TrainerConfig = CTRTrainerConfig


@dataclasses.dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None  # None for epoch 0 (the starting weights, not trained)
    train_seconds: float
    train_samples_per_s: float
    valid_auc: float | None = None
    valid_logloss: float | None = None  # calibrated (the epoch's own validation fit)
    valid_logloss_raw: float | None = None  # before calibration


@dataclasses.dataclass
class FitResult:
    best_epoch: int  # 1-based epoch whose weights the model now holds (0: the starting weights)
    best_valid_auc: float | None  # that epoch's validation AUC
    stopped_early: bool
    history: list[EpochRecord]
    calibration: Calibration = IDENTITY  # fitted on that epoch's validation logits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def embedding_table_ids(model: nn.Module) -> set[int]:
    """``id`` of each embedding table: the model's ``embedding_parameters()`` hook (every zoo model has one),
    else every ``nn.Embedding``'s weight."""
    hook = getattr(model, "embedding_parameters", None)
    tables = hook() if callable(hook) else [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return {id(p) for p in tables}


def parameter_groups(
    model: nn.Module, weight_decay: float, embedding_weight_decay: float
) -> list[dict[str, Any]]:
    """Split parameters into embedding tables and the rest, so each gets its own weight decay."""
    if isinstance(model, DistributedDataParallel):  # the hook lives on the wrapped model
        model = model.module
    embedding_ids = embedding_table_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in embedding_ids], "weight_decay": embedding_weight_decay},
        {"params": [p for p in params if id(p) not in embedding_ids], "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


class Optimizers:
    """Several optimizers stepped as one: dense Adam beside SparseAdam (no torch optimizer takes both kinds
    of gradient)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build_optimizer(model: nn.Module, config: CTRTrainerConfig) -> torch.optim.Optimizer | Optimizers:
    """Adam over ``parameter_groups``; with ``sparse_embeddings``, the model's ``nn.Embedding`` tables switch
    to sparse gradients and go to ``SparseAdam`` (same lr), everything else stays with Adam.

    Call before wrapping the model in ``DistributedDataParallel``: DDP reads each table's ``sparse`` flag when
    it is built, to all-reduce those gradients as sparse tensors.
    """
    groups = parameter_groups(model, config.weight_decay, config.embedding_weight_decay)
    if not config.sparse_embeddings:
        return torch.optim.Adam(groups, lr=config.lr)
    tables = embedding_table_ids(model)
    sparse = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) in tables and module.weight.requires_grad:
            module.sparse = True
            sparse.append(module.weight)
    if not sparse:
        raise ConfigError("CTRTrainerConfig.sparse_embeddings: the model has no trainable nn.Embedding table")
    sparse_ids = {id(p) for p in sparse}
    dense = [{**g, "params": [p for p in g["params"] if id(p) not in sparse_ids]} for g in groups]
    dense = [g for g in dense if g["params"]]
    optimizers = [torch.optim.SparseAdam(sparse, lr=config.lr)]
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=config.lr))
    return Optimizers(*optimizers)


@dataclasses.dataclass
class _Kept:
    auc: float
    logloss: float  # calibrated
    calibration: Calibration
    state: dict[str, torch.Tensor]


class CheckpointChoice:
    """The checkpoint rule: epochs whose validation AUC is within ``tolerance`` of the best so far are kept
    (weights and calibration); the chosen one has the lowest calibrated Logloss among them (ties: the higher
    AUC, then the earlier epoch). The best AUC only grows, so an epoch that falls out of the window never
    comes back: the kept set stays small."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.best_auc = -math.inf
        self.kept: dict[int, _Kept] = {}

    @property
    def chosen(self) -> int | None:
        if not self.kept:
            return None
        return min(self.kept, key=lambda e: (self.kept[e].logloss, -self.kept[e].auc, e))

    def offer(
        self, epoch: int, auc: float, logloss: float, calibration: Calibration, model: nn.Module
    ) -> bool:
        """Consider an epoch's weights (copied only if they enter the window); True if the choice changed."""
        if auc < self.best_auc - self.tolerance:
            return False
        before = self.chosen
        self.best_auc = max(self.best_auc, auc)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.kept[epoch] = _Kept(auc, logloss, calibration, state)
        self.kept = {e: k for e, k in self.kept.items() if k.auc >= self.best_auc - self.tolerance}
        return self.chosen != before


class Trainer:
    """Fits one model; ``fit`` leaves the model holding its best weights and in eval mode.

    ``fixed_masks`` ({parameter name: bool mask}, from ``userip.ctr.extend``) marks entries that keep their
    values: they are restored after every optimizer step (a projection, exact whatever the optimizer and its
    weight decay do). ``userip.ctr.distributed.DistributedTrainer`` overrides the hooks below (rows of an
    epoch, rows per step, the module the step calls, the epoch's mean loss) and ``evaluate``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CTRTrainerConfig | None = None,
        fixed_masks: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config or CTRTrainerConfig()
        self.calibration = IDENTITY  # set by fit from the validation split
        self.device = torch.device(self.config.device)
        set_intra_op_threads(
            self.config.num_threads,
            dense_flops_per_row(model) * self.config.batch_size,
            "CTR training",
        )
        self.model = model.to(self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("model has no trainable parameters")
        self.optimizer = build_optimizer(self.model, self.config)
        params = dict(self.model.named_parameters())
        unknown = sorted(set(fixed_masks or {}) - set(params))
        if unknown:
            raise ValueError(f"fixed_masks names parameters the model does not have: {unknown}")
        # (parameter, mask, the masked entries' values) for every parameter with fixed entries
        self._fixed = []
        for name, mask in (fixed_masks or {}).items():
            if bool(mask.any()):
                mask = mask.to(self.device)
                self._fixed.append((params[name], mask, params[name].detach()[mask].clone()))

    # ------------------------------------------------------------------ hooks (userip.ctr.distributed)
    @property
    def train_module(self) -> nn.Module:
        """What the training step calls (a ``DistributedDataParallel`` wrapper in a distributed run)."""
        return self.model

    @property
    def step_batch_size(self) -> int:
        """Rows per optimizer step in this process (a rank's share of the global batch when distributed)."""
        return self.config.batch_size

    def epoch_rows(self, perm: torch.Tensor) -> torch.Tensor:
        """The rows of the epoch's shuffled index this process trains on, in order (all of them here)."""
        return perm

    def mean_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        """Mean training loss of the epoch from this process's row-weighted sum over ``count`` rows."""
        return float(loss_sum) / count

    # ------------------------------------------------------------------ training
    def train_epoch(self, train: SplitTensors, generator: torch.Generator, epoch: int = 1) -> float:
        """One pass over ``train`` in shuffled mini-batches; returns the mean training loss."""
        cfg = self.config
        x_all, y_all = train.x_ids.to(self.device), train.labels.to(self.device)
        n = len(train)
        perm = torch.randperm(n, generator=generator).to(self.device)
        if cfg.user_id_dropout > 0:
            dropped = (torch.rand(n, generator=generator) < cfg.user_id_dropout).to(self.device)
            x_all = x_all.clone()
            x_all[dropped, USER_COLUMN] = UNKNOWN_INDEX
        rows, batch_size, module = self.epoch_rows(perm), self.step_batch_size, self.train_module
        count = rows.numel()  # n, or this rank's share
        module.train()
        loss_sum = torch.zeros((), device=self.device)
        num_batches = math.ceil(count / batch_size)
        bar = tqdm(total=count, desc=f"epoch {epoch}", unit="rows", disable=not cfg.progress, leave=False)
        for b in range(num_batches):
            idx = rows[b * batch_size : (b + 1) * batch_size]
            # index_select: measured ~2x faster than advanced indexing (x_all[idx]) on CPU.
            x_ids, labels = x_all.index_select(0, idx), y_all.index_select(0, idx)
            logits = module(x_ids)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self._fixed:
                with torch.no_grad():
                    for param, mask, values in self._fixed:
                        param[mask] = values
            # Weighted by batch size so a short last batch counts for what it is; no per-step host sync.
            loss_sum += loss.detach() * idx.numel()
            if cfg.progress and (b % 20 == 19 or b == num_batches - 1):
                bar.update(min((b + 1) * batch_size, count) - bar.n)
        bar.close()
        mean_loss = self.mean_loss(loss_sum, count)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"epoch {epoch}: training loss is {mean_loss}; lower lr or check inputs")
        return mean_loss

    def fit(
        self,
        train: SplitTensors,
        valid: SplitTensors | None = None,
        checkpoint_path: str | Path | None = None,
        start_is_candidate: bool = False,
    ) -> FitResult:
        """Train up to ``max_epochs``; with ``valid``, stop after ``patience`` epochs without an AUC gain (not
        before ``min_epochs``) and restore the weights the checkpoint rule chose (module docstring) with their
        calibration. Without ``valid`` the last epoch's weights are kept, uncalibrated.
        ``start_is_candidate``: the weights before training compete as epoch 0 (a warm start that no epoch
        improves on validation is kept as it is)."""
        cfg = self.config
        if len(train) == 0:
            raise ValueError("empty train split")
        torch.manual_seed(cfg.seed)  # dropout stream
        generator = torch.Generator().manual_seed(cfg.seed)  # shuffling stream, independent of the model
        history: list[EpochRecord] = []
        choice = CheckpointChoice(cfg.checkpoint_auc_tolerance)
        best_auc, bad_epochs, stopped_early = -math.inf, 0, False

        def consider(record: EpochRecord) -> None:
            """Validate the current weights into ``record``; offer them to the checkpoint rule."""
            assert valid is not None
            metrics, calibration = self.validate(valid)
            record.valid_auc, record.valid_logloss = metrics["auc"], metrics["logloss"]
            record.valid_logloss_raw = metrics["logloss_raw"]
            changed = choice.offer(record.epoch, metrics["auc"], metrics["logloss"], calibration, self.model)
            if changed and checkpoint_path is not None:
                kept = choice.kept[record.epoch]
                save_state_dict(
                    {**kept.state, **calibration.to_tensors()},
                    checkpoint_path,
                    {"epoch": str(record.epoch), "valid_auc": repr(kept.auc)},
                )

        if start_is_candidate and valid is not None:
            record = EpochRecord(0, None, 0.0, 0.0)
            consider(record)
            history.append(record)
            best_auc = record.valid_auc
            log.info("epoch 0 (start): valid AUC %.5f, Logloss %.5f", record.valid_auc, record.valid_logloss)
        last_epoch = 0
        for epoch in range(1, cfg.max_epochs + 1):
            start = time.perf_counter()
            train_loss = self.train_epoch(train, generator, epoch)
            seconds = time.perf_counter() - start
            record = EpochRecord(epoch, train_loss, seconds, len(train) / seconds)
            history.append(record)
            last_epoch = epoch
            if valid is None:
                log.info(
                    "epoch %d: train loss %.5f (%.0f rows/s)", epoch, train_loss, record.train_samples_per_s
                )
                continue
            consider(record)
            improved = record.valid_auc > best_auc + cfg.min_delta
            log.info(
                "epoch %d: train loss %.5f, valid AUC %.5f, Logloss %.5f (raw %.5f) (%.0f rows/s)%s",
                epoch,
                train_loss,
                record.valid_auc,
                record.valid_logloss,
                record.valid_logloss_raw,
                record.train_samples_per_s,
                " *" if improved else "",
            )
            if improved:
                best_auc, bad_epochs = record.valid_auc, 0
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience and epoch >= cfg.min_epochs:
                    stopped_early = epoch < cfg.max_epochs
                    break
        chosen = choice.chosen
        if chosen is None:  # no validation split: the final weights, uncalibrated
            self.calibration = IDENTITY
            if checkpoint_path is not None:
                save_state_dict(self.model.state_dict(), checkpoint_path, {"epoch": str(last_epoch)})
            self.model.eval()
            return FitResult(last_epoch, None, stopped_early, history)
        kept = choice.kept[chosen]
        self.model.load_state_dict(kept.state)
        self.calibration = kept.calibration
        self.model.eval()
        if kept.auc < choice.best_auc:
            log.info(
                "checkpoint: epoch %d, calibrated Logloss %.5f at AUC %.5f (best AUC %.5f, tolerance %.4g)",
                chosen,
                kept.logloss,
                kept.auc,
                choice.best_auc,
                cfg.checkpoint_auc_tolerance,
            )
        return FitResult(chosen, kept.auc, stopped_early, history, kept.calibration)

    # ------------------------------------------------------------------ inference
    def predict(self, x_ids: torch.Tensor) -> np.ndarray:
        """Calibrated click probabilities (uncalibrated before ``fit``)."""
        return predict_probs(self.model, x_ids, self.config.eval_batch_size, self.device, self.calibration)

    def evaluate(self, split: SplitTensors) -> dict[str, float]:
        """``{"auc", "logloss" (calibrated), "logloss_raw"}`` under the current calibration."""
        logits = predict_logits(self.model, split.x_ids, self.config.eval_batch_size, self.device)
        return calibrated_metrics(split.labels.numpy(), logits, self.calibration)

    def validate(self, split: SplitTensors) -> tuple[dict[str, float], Calibration]:
        """The current weights on a validation split: a calibration fitted on it, and the metrics under it."""
        cfg = self.config
        return validate_model(self.model, split, cfg.calibration, cfg.eval_batch_size, self.device)


def validate_model(
    model: nn.Module,
    split: SplitTensors,
    method: str = "platt",
    batch_size: int = DEFAULT_EVAL_BATCH,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], Calibration]:
    """A calibration of ``model`` fitted on the validation ``split`` (``method``: userip.ctr.calibration),
    and the split's metrics under it (``calibrated_metrics``)."""
    logits = predict_logits(model, split.x_ids, batch_size, device)
    labels = split.labels.numpy()
    calibration = fit_calibration(method, logits, labels)
    return calibrated_metrics(labels, logits, calibration), calibration


def calibrated_metrics(labels: np.ndarray, logits: np.ndarray, calibration: Calibration) -> dict[str, float]:
    """``{"auc", "logloss", "logloss_raw"}`` of logits: AUC and raw Logloss of ``sigmoid(logits)``, Logloss
    of the calibrated probabilities."""
    return ctr_metrics(labels, IDENTITY.probs(logits), calibration.probs(logits))


def predict_logits(
    model: nn.Module,
    x_ids: torch.Tensor,
    batch_size: int = DEFAULT_EVAL_BATCH,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Logits (N,) float32 for ``x_ids`` (N, F); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    out = torch.empty(x_ids.shape[0], dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, x_ids.shape[0], batch_size):
            batch = x_ids[start : start + batch_size].to(device)
            out[start : start + batch.shape[0]] = model(batch).float().cpu()
    model.train(was_training)
    return out.numpy()


def predict_probs(
    model: nn.Module,
    x_ids: torch.Tensor,
    batch_size: int = DEFAULT_EVAL_BATCH,
    device: torch.device | str = "cpu",
    calibration: Calibration | None = None,
) -> np.ndarray:
    """Click probabilities (N,) float32 for ``x_ids`` (N, F), calibrated when ``calibration`` is given."""
    return (calibration or IDENTITY).probs(predict_logits(model, x_ids, batch_size, device))


def save_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a state dict as safetensors with its content hash (``userip.utils.artifacts``: a
    serving process refuses altered weights); tied tensors are not expected."""
    save_tensors(path, state, metadata)
