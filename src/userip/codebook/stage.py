"""What the ``userip profile`` recipe calls around the profile trainer (quantization, bank, new users).

    aux = build_aux(dataset, prompt_config.profiles, profile_dim=lm_hidden_size, config=quant_cfg)
    ProfileTrainer(model, examples, train_cfg, aux=aux, ...).train()            # Algorithm 1
    table = model.profile_embeds(torch.arange(dataset.num_users))               # (U, P, D)
    bank, report = write_bank(run_dir / "bank", dataset, aux, table, trained_user_ids=examples.user_ids, ...)

``write_bank`` also saves the trained codebooks + surrogate (``<bank_dir>/objectives/``). New users
(``userip profile --new-users FILE``), in a later process::

    aux = build_aux(dataset, prompt_config.profiles, lm_hidden_size, quant_cfg)
    load_objective_state(aux, run_dir / "bank")
    new = read_new_users(FILE, dataset, FeatureBank.load(run_dir / "bank"))   # a dataset of just them
    fit = trainer_fit_profiles(lm, tokenizer, prompt_config, train_cfg)
    bank = infer_new_users(run_dir / "bank", dataset, aux, new, fit)

``fit`` trains fresh soft tokens for just those users against the frozen LM with ``train_aux=False``
(codebooks and surrogate frozen) and returns their profile embeddings; nobody else is retrained and every
other bank row is copied unchanged into the new version.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from userip.codebook.config import QuantizationConfig
from userip.codebook.kmeans import kmeans
from userip.codebook.objective import InteractionSampler, JointObjective, build_joint_objective
from userip.codebook.quantizer import check_codebook_size
from userip.codebook.recovery import recovery_report
from userip.data.schema import Dataset
from userip.feature_bank import KIND_CODES, KIND_CONTINUOUS, UNKNOWN_CODE, FeatureBank, FeatureBankError
from userip.utils.artifacts import tensors_digest
from userip.utils.config import to_dict
from userip.utils.io import atomic_write_json, atomic_write_with

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
OBJECTIVES_DIR = "objectives"  # trained codebooks + surrogate (safetensors), for new users later


def build_aux(
    dataset: Dataset, profiles: Sequence[Any], profile_dim: int, config: QuantizationConfig | None = None
) -> JointObjective:
    """The trainer's ``aux`` for ``dataset``; ``profiles``: the prompt's ``ProfileSpec``s (codebook sizes)."""
    names = [spec.name for spec in profiles]
    sizes = [
        check_codebook_size(spec.codebook_size, f"profile {spec.name!r}: codebook_size") for spec in profiles
    ]
    return build_joint_objective(dataset, names, sizes, profile_dim, config)


def final_codes(
    objective: JointObjective,
    profile_table: torch.Tensor,
    seed: int = 0,
    trained_user_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    """(codes (U, P), codebooks [(K_p, D)], profile_vectors (U, P, d) or None) after training.

    With VQ: nearest code of each profile (eq. 6). When ``balance_min_share`` (QuantizationConfig) is > 0,
    the codebooks' offsets are first fitted (``MultiProfileQuantizer.fit_balance``) over the trained users'
    rows of ``profile_table`` (all rows when ``trained_user_ids`` is None; an untrained row is its initial
    value, not a profile) so every code is the nearest code of at least that share of them; the offsets live
    in the objective's state, which ``write_bank`` saves afterwards, so new users (``infer_new_users``) get
    IDs by the same rule.
    ``without_vq``: the surrogate's projected continuous profiles are the result; IDs from k-means on them
    (K_p clusters) keep the bank's ID contract for ID-only CTR models.
    """
    if not objective.without_vq:
        share = objective.config.balance_min_share if objective.config is not None else 0.0
        if objective.config is not None:
            objective.config.check_codebook_sizes(objective.quantizer.codebook_sizes)
        fitted = (
            profile_table if trained_user_ids is None else profile_table[torch.as_tensor(trained_user_ids)]
        )
        counts = objective.quantizer.fit_balance(fitted, share)  # share 0: offsets reset to zero
        per_code = {name: c.tolist() for name, c in zip(objective.profile_names, counts)}
        log.info("final codes: users per code %s (balance_min_share %s)", per_code, share)
        codes = objective.assign_codes(profile_table)
        codebooks = [
            q.codebook.detach().cpu().numpy().astype(np.float32) for q in objective.quantizer.quantizers
        ]
        return codes, codebooks, None
    vectors = objective.projected_profiles(profile_table)  # (U, P, d)
    gen = torch.Generator().manual_seed(seed)
    codes, codebooks = [], []
    for p, size in enumerate(objective.quantizer.codebook_sizes):
        centroids, assign = kmeans(torch.from_numpy(vectors[:, p]), size, 50, gen)
        codes.append(assign.numpy().astype(np.int64))
        codebooks.append(centroids.numpy().astype(np.float32))
    return np.stack(codes, axis=1), codebooks, vectors


def write_bank(
    bank_dir: str | Path,
    dataset: Dataset,
    objective: JointObjective,
    profile_table: torch.Tensor,
    *,
    trained_user_ids: np.ndarray | None = None,
    lm: str = "",
    template: str = "",
    config: dict[str, Any] | None = None,
    report_path: str | Path | None = None,
) -> tuple[FeatureBank, dict[str, Any]]:
    """Assign final IDs, write a new bank version and the report (code usage; recovery when truth is known).

    ``profile_table`` (U, P, D) holds every dataset user's profile embedding. Users not in
    ``trained_user_ids`` (no training target, so their soft tokens are untrained) get ``UNKNOWN_CODE``. The
    report goes to ``report_path`` (default ``<bank_dir>/report.json``). The trained objective (codebooks +
    surrogate) is saved first under a content-named file that the bank's manifest names (``objective_file``),
    so a bank version and the objective that produced it can never be mixed up.
    """
    if profile_table.shape[0] != dataset.num_users:
        raise ValueError(
            f"profile_table has {profile_table.shape[0]} rows, dataset has {dataset.num_users} users"
        )
    quant_cfg = to_dict(objective.config) if objective.config is not None else {}
    codes, codebooks, vectors = final_codes(objective, profile_table, trained_user_ids=trained_user_ids)
    if trained_user_ids is not None:
        untrained = np.setdiff1d(np.arange(dataset.num_users), np.asarray(trained_user_ids, dtype=np.int64))
        codes[untrained] = UNKNOWN_CODE
    report = code_report(codes, objective.profile_names, [len(cb) for cb in codebooks])
    if dataset.truth is not None:
        report["recovery"] = recovery_report(codes, objective.profile_names, dataset.truth)
    bank = FeatureBank.build(
        profile_names=objective.profile_names,
        codebooks=codebooks,
        codes=codes,
        raw_user_ids=dataset.users["raw_user_id"].astype(str).tolist(),
        dataset_hash=dataset.content_hash,
        lm=lm,
        template=template,
        config={**(config or {}), **({"quantization": quant_cfg} if quant_cfg else {})},
        profile_vectors=vectors,
        kind=KIND_CONTINUOUS if objective.without_vq else KIND_CODES,
        extra={
            "codes_source": "kmeans_on_projected_profiles" if objective.without_vq else "nearest_code",
            "objective_file": save_objective_state(objective, bank_dir),
        },
    )
    bank.write(bank_dir)
    report["bank_version"] = bank.version
    atomic_write_json(Path(report_path) if report_path else Path(bank_dir) / REPORT_FILE, report)
    log.info("feature bank %s written to %s (%d users)", bank.version, bank_dir, bank.manifest["num_users"])
    return bank, report


def save_objective_state(objective: JointObjective, bank_dir: str | Path) -> str:
    """Codebooks, surrogate and counters as ``objectives/<content hash>.safetensors`` (atomic); returns the
    path relative to ``bank_dir``. Content-named: a rewrite never touches a file an older version names.
    """
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in objective.state_dict().items()}
    rel = f"{OBJECTIVES_DIR}/{tensors_digest(tensors)[:16]}.safetensors"
    atomic_write_with(Path(bank_dir) / rel, lambda tmp: save_file(tensors, str(tmp)))
    return rel


def load_objective_state(objective: JointObjective, bank_dir: str | Path) -> JointObjective:
    """Restore, into a freshly built objective of the same config, the one the current bank version names."""
    bank = FeatureBank.load(bank_dir)
    source = bank.verify_objective(bank_dir)  # confined to the bank, present, SHA-256 as recorded
    try:
        objective.load_state_dict(load_file(str(source)))
    except (RuntimeError, OSError, ValueError) as e:  # shape mismatch, truncated file
        raise FeatureBankError(f"{source}: does not fit this objective (other config or corrupt): {e}") from e
    return objective


def code_report(codes: np.ndarray, profile_names: list[str], codebook_sizes: list[int]) -> dict[str, Any]:
    """Per profile: users per code and perplexity (1 = everyone on one code; 0 without known users)."""
    usage = code_usage(codes, profile_names, codebook_sizes)
    return {
        "profiles": {
            row.profile: {
                "users_per_code": list(row.users_per_code),
                "perplexity": float(row.perplexity) if row.num_users else 0.0,
                "unknown_users": int(row.unknown_users),
            }
            for row in usage.itertuples(index=False)
        }
    }


def code_usage(codes: np.ndarray, profile_names: list[str], codebook_sizes: list[int]) -> pd.DataFrame:
    """One row per profile: how evenly users spread over its codes (a collapsed codebook knows nothing).

    Codes of -1 (unknown user) are left out of the distribution and counted in ``unknown_users``.
    ``normalized_entropy`` is entropy / log2 K (1 = uniform; NaN for K = 1); ``perplexity`` = 2 ** entropy,
    the effective number of codes in use. ``code_report`` (the bank's report.json) is a summary of it.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(profile_names) or len(profile_names) != len(codebook_sizes):
        raise ValueError(
            f"codes {codes.shape} must be (num_users, {len(profile_names)}) with one codebook size per "
            f"profile; got {len(codebook_sizes)} sizes"
        )
    rows = []
    for p, (name, size) in enumerate(zip(profile_names, codebook_sizes)):
        col = codes[:, p]
        known = col[col >= 0]
        if len(known) and known.max() >= size:
            raise ValueError(f"profile {name!r}: code {known.max()} outside codebook of size {size}")
        counts = np.bincount(known, minlength=size)
        num_known = int(counts.sum())
        probs = counts / max(num_known, 1)
        nz = probs[probs > 0]
        entropy = float(-(nz * np.log2(nz)).sum()) if num_known else float("nan")
        rows.append(
            {
                "profile": name,
                "codebook_size": int(size),
                "num_users": num_known,
                "unknown_users": int((col < 0).sum()),
                "users_per_code": counts.tolist(),
                "num_unused_codes": int((counts == 0).sum()),
                "smallest_code_share": float(counts.min() / num_known) if num_known else float("nan"),
                "entropy_bits": entropy,
                "normalized_entropy": entropy / np.log2(size) if size > 1 else float("nan"),
                "perplexity": float(2.0**entropy),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- new users
@dataclasses.dataclass
class NewUsers:
    """Users to add to a bank, as a dataset of their own: user ids 0..N-1, the original items, their
    interactions all in ``train`` (prompts, soft-token table and sampler are sized by N, not by everyone).
    """

    dataset: Dataset
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
    fitted); without one, every dataset user.
    """
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
    if not raw_new:
        raise ValueError(
            f"{where}: no new user with an interaction on a known item ({len(skipped)} known skipped)"
        )
    uid_of = {r: i for i, r in enumerate(raw_new)}
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
    profile_embeds = fit_profiles(new.dataset, new.user_ids, aux)  # (N, P, D)
    if tuple(profile_embeds.shape[:2]) != (len(new.raw_user_ids), len(bank.profile_names)):
        raise ValueError(
            f"fit_profiles returned shape {tuple(profile_embeds.shape)} for {len(new.raw_user_ids)} users"
        )
    unfit = torch.isnan(profile_embeds).flatten(1).any(1).cpu().numpy()
    codes = aux.assign_codes(torch.nan_to_num(profile_embeds))
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
    ``TrainConfig`` (``train_aux`` is forced off, checkpoints off); ``soft_token_config`` and ``value_words``
    (the original run's, from its profile manifest) start the new rows where the original ones started.
    """
    from userip.profile.model import ProfileModel, SoftTokenConfig, initial_soft_token_table
    from userip.profile.trainer import ProfileTrainer
    from userip.prompts import PromptBuilder, build_examples

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
        config = dataclasses.replace(train_config, train_aux=False, checkpoint_every=0)
        if len(examples):  # else every row stays NaN below
            ProfileTrainer(model, examples, config, aux=frozen_aux).train()
        profile_embeds = model.profile_embeds(torch.as_tensor(user_ids)).clone()
        profile_embeds[torch.from_numpy(~np.isin(user_ids, examples.user_ids))] = float("nan")  # no target
        return profile_embeds

    return fit
