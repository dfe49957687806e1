"""New users (``userip profile --new-users FILE``): fit profiles for just them against the frozen result of
a finished profile stage and upsert their IDs into a new bank version.

    aux = build_aux(dataset, prompt_config.profiles, lm_hidden_size, quant_cfg)      # userip.profile.bank
    load_objective_state(aux, run_dir / "bank")
    new = read_new_users(FILE, dataset, FeatureBank.load(run_dir / "bank"))   # a dataset of just them
    fit = trainer_fit_profiles(lm, tokenizer, prompt_config, train_cfg)
    bank = infer_new_users(run_dir / "bank", dataset, aux, new, fit)

``fit`` trains fresh soft tokens for just those users against the frozen LM with ``train_aux=False``
(codebooks and surrogate frozen) and returns their profile embeddings; nobody else is retrained and every
other bank row is copied unchanged into the new version. ``userip.profile.stage.add_new_users`` runs these
steps on a finished run folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from userip.codebook.objective import InteractionSampler, JointObjective
from userip.data.ids import IdIndex
from userip.data.schema import Dataset
from userip.feature_bank import KIND_CONTINUOUS, UNKNOWN_CODE, FeatureBank, FeatureBankError
from userip.profile.model import ProfileModel, SoftTokenConfig, initial_soft_token_table
from userip.profile.trainer import ProfileTrainer
from userip.prompts import PromptBuilder, build_examples

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NewUsers:
    """Users to add to a bank, as a dataset of their own: user ids 0..N-1, the original items, their
    interactions all in ``train`` (prompts, soft-token table and sampler are sized by N, not by everyone).
    """

    dataset: Dataset | None  # None: nobody left to fit (every user of the file already has IDs)
    raw_user_ids: list[str]  # raw_user_ids[i] is user i of ``dataset``
    skipped_known: list[str]  # raw ids the dataset or bank already has: left as they are
    dropped_interactions: int  # rows whose item is not in the dataset

    @property
    def user_ids(self) -> np.ndarray:
        return np.arange(len(self.raw_user_ids), dtype=np.int64)


def read_new_users(path: str | Path, dataset: Dataset, bank: FeatureBank | None = None) -> NewUsers:
    """Read a CSV or Parquet file of new users' interactions (see ``new_users_from_frame``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: new-users file not found")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.stat().st_size == 0:
        frame = pd.DataFrame()  # pandas' EmptyDataError would not name the file; the check below does
    else:
        frame = pd.read_csv(path, dtype={"raw_user_id": str, "raw_item_id": str})
    return new_users_from_frame(frame, dataset, bank, where=str(path))


def new_users_from_frame(
    frame: pd.DataFrame, dataset: Dataset, bank: FeatureBank | None = None, where: str = "new users"
) -> NewUsers:
    """New users' interactions as a ``NewUsers`` dataset.

    Columns: ``raw_user_id``, ``raw_item_id``, and ``rating`` and/or ``label``; optional ``timestamp`` and
    ``review``. A missing ``label`` is ``rating > 3`` (the paper's rule). Items must be the dataset's (matched
    on ``raw_item_id``; others are dropped and counted). Users that already have a profile are skipped: with a
    bank, those whose codes are known (a dataset user without a profile, e.g. one with no training rows, is
    fitted); without one, every dataset user. Every user skipped leaves nobody to fit (``raw_user_ids``
    empty): a rerun of a file already added (e.g. after a kill that came after the bank write) changes
    nothing.
    """
    if frame.empty:
        raise ValueError(
            f"{where}: no interactions (an empty file); expected rows of raw_user_id, raw_item_id and rating "
            "or label"
        )
    if not {"raw_user_id", "raw_item_id"} <= set(frame.columns) or not {"rating", "label"} & set(
        frame.columns
    ):
        raise ValueError(
            f"{where}: needs columns raw_user_id, raw_item_id and rating or label; has {list(frame.columns)}"
        )
    frame = frame.assign(
        raw_user_id=frame["raw_user_id"].astype(str), raw_item_id=frame["raw_item_id"].astype(str)
    )
    if bank is None:
        known_raw = set(dataset.users["raw_user_id"].astype(str))
    else:
        profiled = (bank.codes != UNKNOWN_CODE).all(axis=1)
        known_raw = {raw for raw, ok in zip(bank.raw_user_ids, profiled) if ok and raw}
    skipped = sorted(set(frame["raw_user_id"]) & known_raw)
    frame = frame[~frame["raw_user_id"].isin(known_raw)]
    item_of = dict(zip(dataset.items["raw_item_id"].astype(str), dataset.items["item_id"]))
    item_ids = frame["raw_item_id"].map(item_of)
    dropped = int(item_ids.isna().sum())
    frame = frame[item_ids.notna().to_numpy()].assign(item_id=item_ids.dropna().astype(np.int64).to_numpy())
    raw_new = list(dict.fromkeys(frame["raw_user_id"]))  # first-appearance order
    if not raw_new and not skipped:
        raise ValueError(f"{where}: no new user with an interaction on a known item")
    if not raw_new:
        return NewUsers(None, [], skipped, dropped)
    uid_of = IdIndex(raw_new).row_of  # the new users' own ids, in first-appearance order
    rating = frame["rating"].astype(np.float32) if "rating" in frame else pd.Series(np.nan, index=frame.index)
    label = frame["label"].astype(np.int8) if "label" in frame else (rating > 3.0).astype(np.int8)
    interactions = pd.DataFrame(
        {
            "user_id": frame["raw_user_id"].map(uid_of).astype(np.int64).to_numpy(),
            "item_id": frame["item_id"].to_numpy(),
            "rating": rating.to_numpy(np.float32),
            "label": label.to_numpy(np.int8),
            "timestamp": frame["timestamp"].astype(np.int64).to_numpy() if "timestamp" in frame else 0,
            "split": "train",
        }
    )
    if "review" in frame:
        interactions["review"] = frame["review"].fillna("").astype(str).to_numpy()
    users = pd.DataFrame({"user_id": np.arange(len(raw_new), dtype=np.int64), "raw_user_id": raw_new})
    new_dataset = Dataset(interactions=interactions, items=dataset.items, users=users, source="new-users")
    new_dataset.validate()
    return NewUsers(new_dataset, raw_new, skipped, dropped)


def frozen_aux_for(objective: JointObjective, new: NewUsers) -> JointObjective:
    """The trained objective over the new users' interactions, frozen (eval mode, no parameter gradients)."""
    if new.dataset is None:
        raise ValueError("no new user to fit: every user given already has IDs in the bank")
    user_features = None
    if objective.user_features is not None:  # vocabularies are fixed: new users get the unknown id 0
        user_features = np.zeros((new.dataset.num_users, objective.user_features.shape[1]), dtype=np.int64)
    sampler = InteractionSampler.from_interactions(new.dataset.split("train"), new.dataset.num_users)
    aux = objective.with_sampler(sampler, user_features)
    aux.requires_grad_(False)
    return aux.eval()


# fit_profiles(new_dataset, user_ids, frozen_aux) -> (len(user_ids), P, D); ids index new_dataset's users.
FitProfiles = Callable[[Dataset, np.ndarray, JointObjective], torch.Tensor]


def infer_new_users(
    bank_dir: str | Path,
    dataset: Dataset,
    objective: JointObjective,
    new: NewUsers,
    fit_profiles: FitProfiles,
) -> FeatureBank:
    """Fit profiles for ``new`` users only (LM, codebooks, surrogate frozen); upsert them as a new version.

    ``fit_profiles(new.dataset, new.user_ids, frozen_aux) -> (N, P, D)`` returns every new user's profile
    embedding (NaN
    rows for users it could not fit, e.g. no title in their history: they get ``UNKNOWN_CODE``);
    ``trainer_fit_profiles`` builds one from the profile trainer.
    """
    bank = FeatureBank.load(bank_dir, expected_dataset_hash=dataset.content_hash)
    if bank.kind == KIND_CONTINUOUS:
        raise FeatureBankError(
            "adding users to a without_vq bank is not supported (its IDs come from k-means)"
        )
    aux = frozen_aux_for(objective, new)
    assert new.dataset is not None  # frozen_aux_for refuses None
    profile_embeds = fit_profiles(new.dataset, new.user_ids, aux)  # (N, P, D)
    if tuple(profile_embeds.shape[:2]) != (len(new.raw_user_ids), len(objective.profile_names)):
        raise ValueError(
            f"fit_profiles returned shape {tuple(profile_embeds.shape)} for {len(new.raw_user_ids)} users"
        )
    unfit = torch.isnan(profile_embeds).flatten(1).any(1).cpu().numpy()
    codes = aux.assign_codes(torch.nan_to_num(profile_embeds))  # (N, fields): every residual level too
    codes[unfit] = UNKNOWN_CODE
    updated = bank.upsert(new.raw_user_ids, codes, note=f"{len(new.raw_user_ids)} new users")
    updated.write(bank_dir)
    log.info(
        "added %d new users (%d unfit) to bank %s -> %s; %d already known were skipped",
        len(new.raw_user_ids), int(unfit.sum()), bank.version, updated.version, len(new.skipped_known),
    )  # fmt: skip
    return updated


def trainer_fit_profiles(
    lm: Any,
    tokenizer: Any,
    prompt_config: Any,
    train_config: Any,
    seed: int = 0,
    soft_token_config: Any = None,
    value_words: dict[str, list[str]] | None = None,
) -> FitProfiles:
    """A ``fit_profiles`` that trains fresh soft tokens with ``userip.profile``'s trainer, aux frozen.

    ``lm`` is the frozen LM of the original run, ``prompt_config`` its ``PromptConfig``, ``train_config`` its
    ``ProfileTrainConfig`` (``train_aux`` is forced off, checkpoints off); ``soft_token_config`` and
    ``value_words`` (the original run's, from its profile manifest) start the new rows where the original
    ones started.
    """
    soft_token_config = soft_token_config or SoftTokenConfig()

    def fit(new_dataset: Dataset, user_ids: np.ndarray, frozen_aux: JointObjective) -> torch.Tensor:
        builder = PromptBuilder(tokenizer, prompt_config)
        table = initial_soft_token_table(
            new_dataset.num_users,
            lm.get_input_embeddings().weight,
            builder,
            soft_token_config,
            value_words or {},
            seed,
        )
        model = ProfileModel(lm, table, prompt_config)
        examples = build_examples(new_dataset, builder).subset(user_ids)
        return train_new_rows(ProfileTrainer, model, examples, train_config, frozen_aux, user_ids)

    return fit


def train_new_rows(
    trainer_cls: type[ProfileTrainer],
    model: Any,
    examples: Any,
    train_config: Any,
    frozen_aux: JointObjective,
    user_ids: np.ndarray,
) -> torch.Tensor:
    """New users' fresh rows trained by ``trainer_cls`` against the frozen objective (``train_aux`` forced
    off, no checkpoints); (n, P, D) profile embeddings of ``user_ids``, NaN for users without evidence."""
    config = dataclasses.replace(train_config, train_aux=False, checkpoint_every=0)
    if len(examples):  # else every row stays NaN below
        trainer_cls(model, examples, config, aux=frozen_aux).train()
    profile_embeds = model.profile_embeds(torch.as_tensor(user_ids)).clone()
    profile_embeds[torch.from_numpy(~np.isin(user_ids, examples.user_ids))] = float("nan")  # no evidence
    return profile_embeds
