"""The feature bank the profile stage writes after Algorithm 1: final IDs, the bank, its report.

    aux = build_aux(dataset, prompt_config.profiles, profile_dim=lm_hidden_size, config=quant_cfg)
    ProfileTrainer(model, examples, train_cfg, aux=aux, ...).train()            # Algorithm 1
    table = model.profile_embeds(torch.arange(dataset.num_users))               # (U, P, D)
    bank, report = write_bank(run_dir / "bank", dataset, aux, table, trained_user_ids=examples.user_ids, ...)

``build_aux`` makes the trainer's joint objective (codebooks + surrogate, ``userip.codebook``) for a dataset;
``write_bank`` assigns each user's final IDs, writes a new bank version and ``report.json`` (code usage, and
profile recovery when the dataset knows its users' true profiles) and saves the trained codebooks + surrogate
under ``<bank_dir>/objectives/`` (``save_objective_state`` / ``load_objective_state``), which new users are
later fitted against (``userip.profile.new_users``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from userip.codebook.config import QuantizationConfig
from userip.codebook.kmeans import kmeans
from userip.codebook.objective import JointObjective, build_joint_objective
from userip.codebook.quantizer import check_codebook_size
from userip.codebook.recovery import recovery_report
from userip.data.schema import Dataset
from userip.feature_bank import (
    CODE_LEVELS_KEY,
    KIND_CODES,
    KIND_CONTINUOUS,
    UNKNOWN_CODE,
    FeatureBank,
    FeatureBankError,
)
from userip.feature_bank.embedded import OBJECTIVES_DIR  # trained codebooks + surrogate, for new users later
from userip.utils.artifacts import tensors_digest
from userip.utils.config import to_dict
from userip.utils.io import atomic_write_json, atomic_write_with
from userip.utils.run_layout import BANK_REPORT_FILE

log = logging.getLogger(__name__)

REPORT_FILE = BANK_REPORT_FILE


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
    """(codes (U, F), codebooks [(K_f, D)], profile_vectors (U, P, d) or None) after training; one code
    field per profile, or per profile and residual level (``MultiProfileQuantizer.field_names``).

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
            objective.config.check_codebook_sizes(objective.quantizer.field_sizes)
        fitted = (
            profile_table if trained_user_ids is None else profile_table[torch.as_tensor(trained_user_ids)]
        )
        counts = objective.quantizer.fit_balance(fitted, share)  # share 0: offsets reset to zero
        per_code = {name: c.tolist() for name, c in zip(objective.quantizer.field_names, counts)}
        log.info("final codes: users per code %s (balance_min_share %s)", per_code, share)
        codes = objective.assign_codes(profile_table)
        codebooks = [
            cb.detach().cpu().numpy().astype(np.float32) for cb in objective.quantizer.field_codebooks()
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
    fields = objective.quantizer.field_names  # the profiles, or each profile's residual levels
    report = code_report(codes, fields, [len(cb) for cb in codebooks])
    if dataset.truth is not None:
        report["recovery"] = recovery_report(codes, fields, dataset.truth)
    bank = FeatureBank.build(
        profile_names=fields,
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
            **code_levels_entry(objective),
        },
    )
    bank.write(bank_dir)
    report["bank_version"] = bank.version
    atomic_write_json(Path(report_path) if report_path else Path(bank_dir) / REPORT_FILE, report)
    log.info("feature bank %s written to %s (%d users)", bank.version, bank_dir, bank.manifest["num_users"])
    return bank, report


def code_levels_entry(objective: JointObjective) -> dict[str, Any]:
    """The bank manifest's record of residual levels (``CODE_LEVELS_KEY``); nothing with one level, so a
    one-level bank's manifest is as before."""
    quantizer = objective.quantizer
    if quantizer.num_levels == 1:
        return {}
    return {CODE_LEVELS_KEY: {"profiles": list(quantizer.profile_names), "num_levels": quantizer.num_levels}}


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
    if bank.kind == KIND_CODES and bank.profile_names != objective.quantizer.field_names:
        raise FeatureBankError(
            f"{bank_dir}: bank {bank.version} has code fields {bank.profile_names}; this objective makes "
            f"{objective.quantizer.field_names} (other profiles or quantization.num_levels)"
        )
    source = bank.verify_objective(bank_dir)  # confined to the bank, present, SHA-256 as recorded
    try:
        objective.load_state_dict(load_file(str(source)))
    except (RuntimeError, OSError, ValueError) as e:  # shape mismatch, truncated file
        raise FeatureBankError(f"{source}: does not fit this objective (other config or corrupt): {e}") from e
    return objective


def code_report(
    codes: np.ndarray | None, profile_names: list[str], codebook_sizes: list[int], counts: Any = None
) -> dict[str, Any]:
    """Per profile: users per code and perplexity (1 = everyone on one code; 0 without known users).
    ``counts`` instead of ``codes``: see ``code_usage``."""
    usage = code_usage(codes, profile_names, codebook_sizes, counts)
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


def code_counts(codes: np.ndarray, codebook_sizes: list[int]) -> np.ndarray:
    """(P, 1 + max K) int64: per profile, users with code -1 (unknown) in column 0, code k in column 1 + k.
    Counts of disjoint user sets add up (the distributed profile stage all-reduces them)."""
    codes = np.asarray(codes)
    out = np.zeros((codes.shape[1], 1 + max(codebook_sizes)), dtype=np.int64)
    for p, size in enumerate(codebook_sizes):
        col = codes[:, p]
        known = col[col >= 0]
        if len(known) and known.max() >= size:
            raise ValueError(f"profile {p}: code {known.max()} outside codebook of size {size}")
        out[p, 0] = int((col < 0).sum())
        out[p, 1 : 1 + size] = np.bincount(known, minlength=size)
    return out


def code_usage(
    codes: np.ndarray | None, profile_names: list[str], codebook_sizes: list[int], counts: Any = None
) -> pd.DataFrame:
    """One row per profile: how evenly users spread over its codes (a collapsed codebook knows nothing).

    Codes of -1 (unknown user) are left out of the distribution and counted in ``unknown_users``.
    ``normalized_entropy`` is entropy / log2 K (1 = uniform; NaN for K = 1); ``perplexity`` = 2 ** entropy,
    the effective number of codes in use. ``code_report`` (the bank's report.json) is a summary of it.
    """
    if counts is None:
        codes = np.asarray(codes)
        if (
            codes.ndim != 2
            or codes.shape[1] != len(profile_names)
            or len(profile_names) != len(codebook_sizes)
        ):
            raise ValueError(
                f"codes {codes.shape} must be (num_users, {len(profile_names)}) with one codebook size per "
                f"profile; got {len(codebook_sizes)} sizes"
            )
        for p, name in enumerate(profile_names):
            top = codes[:, p].max(initial=-1)
            if top >= codebook_sizes[p]:
                raise ValueError(f"profile {name!r}: code {top} outside codebook of size {codebook_sizes[p]}")
        counts = code_counts(codes, codebook_sizes)
    table = np.asarray(counts, dtype=np.int64)
    rows = []
    for p, (name, size) in enumerate(zip(profile_names, codebook_sizes)):
        unknown = int(table[p, 0])
        counts = table[p, 1 : 1 + size]
        num_known = int(counts.sum())
        probs = counts / max(num_known, 1)
        nz = probs[probs > 0]
        entropy = float(-(nz * np.log2(nz)).sum()) if num_known else float("nan")
        rows.append(
            {
                "profile": name,
                "codebook_size": int(size),
                "num_users": num_known,
                "unknown_users": unknown,
                "users_per_code": counts.tolist(),
                "num_unused_codes": int((counts == 0).sum()),
                "smallest_code_share": float(counts.min() / num_known) if num_known else float("nan"),
                "entropy_bits": entropy,
                "normalized_entropy": entropy / np.log2(size) if size > 1 else float("nan"),
                "perplexity": float(2.0**entropy),
            }
        )
    return pd.DataFrame(rows)
