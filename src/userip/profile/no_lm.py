"""The no-LM profile mode (``lm: {name_or_path: none}``): what the LLM adds, measured by leaving it out.

The same per-user soft-token table, codebooks, surrogate and trainer as the LM modes (RowAdam on the rows,
AdamW on codebooks + surrogate, the same epochs, batches over users and per-step interaction samples), trained
by the joint objective alone: lambda * (L_VQ + L_rec) without L_LM. No LM is resolved, loaded, tokenized or
run, and nothing is written to ``RUN/lm``.

* Shape: (num_users, num_slots, ``offline_lm.hidden_size``): the table the default ``lm: offline`` gives.
* Start: every row from N(0, s^2) seeded by ``train.seed``, s = the std the offline LM's embeddings are
  initialised with (``embedding_init_std``: its HF config's ``initializer_range``, 0.02). The LM modes start a
  row at its LM's embeddings of the profile's words; with no LM there are no words (``soft_tokens.init`` does
  not apply).
* Examples: one per user with a profile row (history mode's one example per user, without the text). With no
  text there is no length to bucket by: ``plan_batches`` gets equal lengths, so a batch is a seeded draw of
  users, as in the LM modes less the length sort. ``prompt.target_mode: review`` (one example per review) is
  refused.
* lambda (``quantization.loss_weight``): with no other term it would only scale every gradient by one
  constant. Adam (RowAdam, AdamW) undoes such a scale except against its eps (1e-8), and there lies the harm:
  at the paper's lambda 0.001 the rows' gradients come near eps and their steps shrink (measured on the
  synthetic set: the table after 12 steps differed from lambda 1's by 80% of its std, lambda 4's by 5%). So
  the loss is divided by lambda: any lambda > 0 trains on L_VQ + L_rec at unit weight (as
  ``requantize`` does), and lambda 0 still leaves every row where it started.
* The step's recorded loss (history, log, ``train.min_epoch_improvement``) is that unit-weight objective
  (``objective_loss``); the stage report's ``final_lm_loss`` is None.
* New users (``userip profile --new-users``): their rows are fitted by the same trainer from their known
  interactions, codebooks and surrogate frozen (``surrogate_fit_profiles``).
* The distributed stage refuses it (``NoLMError``): one process only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from userip.codebook.objective import JointObjective
from userip.data.schema import Dataset
from userip.lm.offline_config import OfflineLMConfig
from userip.lm.pretrain import embedding_init_std
from userip.profile.model import SoftTokenModel, SoftTokenTable
from userip.profile.new_users import FitProfiles, train_new_rows
from userip.profile.recipe import ProfileConfig, ProfileSetup
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, StepRows
from userip.prompts import PromptConfig, TargetMode
from userip.utils.config import ConfigError
from userip.utils.seed import seed_everything
from userip.utils.threads import dense_flops_per_row, set_intra_op_threads

log = logging.getLogger(__name__)


class NoLMError(ConfigError):
    """A setting the no-LM mode cannot honour (the message names it)."""


@dataclasses.dataclass
class UserExamples:
    """One no-LM training example per user: the part of ``ExampleSet`` the trainer reads, without text."""

    user_ids: np.ndarray  # (N,) int64, sorted
    skipped_user_ids: np.ndarray  # users with no profile row: never trained

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) zeros: no text, nothing to bucket by (``plan_batches`` keeps its shuffled order)."""
        return np.zeros(len(self.user_ids), dtype=np.int64)

    @property
    def num_skipped_users(self) -> int:
        return len(self.skipped_user_ids)

    def subset(self, keep_user_ids: Iterable[int]) -> UserExamples:
        keep = np.isin(self.user_ids, np.fromiter(keep_user_ids, dtype=np.int64))
        return UserExamples(self.user_ids[keep], self.skipped_user_ids)


def user_examples(dataset: Dataset) -> UserExamples:
    """One example per user of ``dataset`` with a profile row (the evidence the surrogate reads)."""
    user_ids = np.unique(dataset.profile_rows()["user_id"].to_numpy(np.int64))
    skipped = np.setdiff1d(np.arange(*dataset.user_range, dtype=np.int64), user_ids)
    if len(skipped):
        log.warning("%d of %d users have no profile row; skipped", len(skipped), dataset.num_users)
    return UserExamples(user_ids, skipped)


def check_no_lm_prompt(prompt: PromptConfig) -> None:
    if prompt.target_mode is not TargetMode.HISTORY:
        raise NoLMError(
            f"lm none: prompt.target_mode {prompt.target_mode.value!r} makes one example per review, which "
            "needs the LM's text; with no LM each user is one example (target_mode 'history')"
        )


def initial_table(
    num_users: int,
    prompt: PromptConfig,
    offline_lm: OfflineLMConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> SoftTokenTable:
    """(num_users, num_slots, offline_lm.hidden_size), every row from N(0, s^2) seeded by ``seed``, where s is
    the offline LM's embedding init std (``embedding_init_std``): no LM, so no words to start from."""
    table = SoftTokenTable(num_users, prompt.num_slots, offline_lm.hidden_size, device)
    table.initialise_random(embedding_init_std(offline_lm), seed)
    return table


def setup_without_lm(dataset: Dataset, config: ProfileConfig, offline_lm: OfflineLMConfig) -> ProfileSetup:
    """``recipe.setup`` without an LM: one example per user with profile rows and a seeded random table;
    the returned setup trains with ``SurrogateOnlyTrainer``."""
    check_no_lm_prompt(config.prompt)
    seed_everything(config.train.seed)
    examples = user_examples(dataset)
    num_slots, hidden = config.prompt.num_slots, offline_lm.hidden_size
    table = initial_table(
        dataset.num_users,
        config.prompt,
        offline_lm,
        config.train.seed,
        config.lm.resolved_table_device(dataset.num_users, num_slots, hidden),
    )
    log.info(
        "no LM: %d users to train (%d skipped); %d soft tokens of dim %d per user from N(0, %g^2)",
        len(examples), examples.num_skipped_users, num_slots, hidden, embedding_init_std(offline_lm),
    )  # fmt: skip
    model = SoftTokenModel(table, config.prompt, config.lm.device)
    no_words = {p.name: [] for p in config.prompt.profiles}  # nothing started from words
    return ProfileSetup(dataset, None, examples, model, no_words, trainer_class=SurrogateOnlyTrainer)


class SurrogateOnlyTrainer(ProfileTrainer):
    """``ProfileTrainer`` less the LM term: a micro-batch's loss is ``aux``'s (the joint objective) alone.

    Rows, batches, checkpoints, resume and the optimizers are the base trainer's; only the step differs."""

    LOSS_NAME = "objective_loss"

    def __init__(
        self,
        model: SoftTokenModel,
        examples: UserExamples,
        config: ProfileTrainConfig,
        aux: JointObjective | None = None,
        checkpoint_dir: Any = None,
    ) -> None:
        if aux is None:
            raise ValueError("SurrogateOnlyTrainer: no objective (aux) to train the soft tokens by")
        # lambda * (L_VQ + L_rec) -> L_VQ + L_rec (see the module doc); lambda 0 stays 0
        self.loss_scale = 1.0 / aux.loss_weight if aux.loss_weight > 0 else 1.0
        super().__init__(model, examples, config, aux=aux, checkpoint_dir=checkpoint_dir)  # type: ignore[arg-type]

    def _prepare_step(self) -> None:
        """No LM: a step costs the objective's dense layers on the batch's sampled interactions."""
        assert self.aux is not None
        set_intra_op_threads(None, dense_flops_per_row(self.aux) * self.config.batch_size, "profile stage")

    def _step(self, group: list[np.ndarray]) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """One optimizer step: per micro-batch the objective's loss (at unit weight) on its users' rows, then
        RowAdam (and AdamW on ``aux``). Like the base step it never waits on the device. No tokens: 0."""
        step: StepRows = self._step_rows(group)
        losses, metrics = [], {}
        for k in range(len(group)):
            weighted_loss, metrics = self._aux_loss(step, k)
            loss = weighted_loss * self.loss_scale
            losses.append(loss.detach())
            if loss.requires_grad:  # lambda * 0 without a graph: no user of the batch had evidence
                (loss / len(group)).backward()
        if step.rows.grad is None:
            step.rows.grad = torch.zeros_like(step.rows)
        self._update(step)
        return torch.stack(losses), 0, metrics


def surrogate_fit_profiles(
    prompt_config: PromptConfig,
    train_config: ProfileTrainConfig,
    offline_lm: OfflineLMConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FitProfiles:
    """``trainer_fit_profiles`` without the LM: fresh rows (``initial_table``) for the new users, trained by
    ``SurrogateOnlyTrainer`` against the frozen objective (``train_aux`` forced off, no checkpoints)."""

    def fit(new_dataset: Dataset, user_ids: np.ndarray, frozen_aux: JointObjective) -> torch.Tensor:
        table = initial_table(new_dataset.num_users, prompt_config, offline_lm, seed)
        model = SoftTokenModel(table, prompt_config, device)
        examples = user_examples(new_dataset).subset(user_ids)
        return train_new_rows(SurrogateOnlyTrainer, model, examples, train_config, frozen_aux, user_ids)

    return fit
