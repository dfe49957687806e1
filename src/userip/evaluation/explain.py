"""Explainability (paper 3.8, Table 5): which vocabulary words a user's learned soft tokens are closest to.

A soft token lives in the LLM's input-embedding space, so its nearest vocabulary embeddings (cosine) say what
the frozen LLM "reads" in that slot: for a user whose hobby is outdoors, the hobby token should sit near words
like "outdoors" or "hiking".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from userip.data.ids import IdIndex
from userip.utils.run_layout import RunLayout


def nearest_tokens(
    soft_embeds: torch.Tensor,
    vocab_embeds: torch.Tensor,
    k: int = 5,
    candidate_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` vocabulary ids by cosine similarity for each soft token.

    soft_embeds (N, D), vocab_embeds (V, D) -> (ids (N, k), cosine (N, k)). ``candidate_ids`` restricts the
    search to a word list (e.g. the profile words), returning ids of the full vocabulary.
    """
    if soft_embeds.ndim != 2 or vocab_embeds.ndim != 2 or soft_embeds.shape[1] != vocab_embeds.shape[1]:
        raise ValueError(
            f"expected soft_embeds (N, D) and vocab_embeds (V, D); got {tuple(soft_embeds.shape)} and "
            f"{tuple(vocab_embeds.shape)}"
        )
    vocab = vocab_embeds.float()
    ids = torch.arange(vocab.shape[0], device=vocab.device)
    if candidate_ids is not None:
        ids = torch.as_tensor(list(candidate_ids), dtype=torch.long, device=vocab.device)
        vocab = vocab[ids]
    sims = (
        torch.nn.functional.normalize(soft_embeds.float().to(vocab.device), dim=-1)
        @ torch.nn.functional.normalize(vocab, dim=-1).T
    )  # (N, V') on the vocabulary's device (the LM's)
    top = sims.topk(min(k, vocab.shape[0]), dim=-1)
    return ids[top.indices].cpu(), top.values.cpu()


def select_users(
    dataset: Any, trained: torch.Tensor, raw_user_ids: Sequence[str] | None, limit: int, run_dir: Path
) -> np.ndarray:
    """Internal ids of ``raw_user_ids``, or of the first ``limit`` users with trained soft tokens."""
    if raw_user_ids is None:
        return np.flatnonzero(trained.numpy())[:limit]
    index = IdIndex(dataset.users["raw_user_id"].astype(str))
    missing = [r for r in raw_user_ids if str(r) not in index]
    if missing:
        raise KeyError(f"unknown user(s) {missing[:5]} (not in {RunLayout(run_dir).data})")
    return index.rows([str(r) for r in raw_user_ids], len(raw_user_ids))


def explain_run(run_dir: str | Path, raw_user_ids: Sequence[str] | None = None, k: int = 5, limit: int = 10):
    """For users of a finished ``userip profile`` run: each profile's top-``k`` nearest words and, where the
    bank knows them, their profile IDs. Returns a list of dicts (one per user)."""
    from userip.feature_bank import FeatureBank
    from userip.profile.lm import load_causal_lm, load_tokenizer
    from userip.profile.model import profile_means
    from userip.profile.recipe import load_soft_tokens
    from userip.profile.stage import reopen_profile

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    finished = reopen_profile(run_dir)
    dataset, stage_config = finished.dataset, finished.config
    soft_tokens, trained, _ = load_soft_tokens(layout.profile)
    lm = load_causal_lm(finished.lm_path)  # verified against the hashes recorded with it, like every LM load
    tokenizer = load_tokenizer(finished.lm_path)
    vocab_embeds = lm.get_input_embeddings().weight.detach()
    bank = FeatureBank.load(layout.bank)
    raw_of = dataset.users["raw_user_id"].astype(str).to_numpy()
    user_ids = select_users(dataset, trained, raw_user_ids, limit, run_dir)
    prompt_config = stage_config.prompt
    profile_embeds = profile_means(soft_tokens[torch.as_tensor(user_ids)], prompt_config)  # (N, P, D)
    nearest = [nearest_tokens(profile_embeds[:, p], vocab_embeds, k) for p in range(profile_embeds.shape[1])]
    codes = bank.lookup(user_ids)
    truth = None if dataset.truth is None else dataset.truth.set_index("user_id").loc[user_ids]
    out: list[dict[str, Any]] = []
    for row, uid in enumerate(user_ids):
        entry: dict[str, Any] = {"raw_user_id": raw_of[uid]}
        for p, spec in enumerate(prompt_config.profiles):
            ids, sims = nearest[p]
            entry[spec.name] = {
                "code": int(codes[row, p]),
                "nearest": [
                    (tokenizer.decode([int(i)]).strip(), round(float(s), 3))
                    for i, s in zip(ids[row], sims[row])
                ],
            }
        if truth is not None:
            entry["truth"] = {c: int(v) for c, v in truth.iloc[row].items()}
        out.append(entry)
    return out
