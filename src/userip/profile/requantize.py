"""Re-quantization: codebooks + surrogate trained again on the *fixed* soft tokens of a profile stage.

The experiment's ablation (without VQ) and codebook-size sweeps use it: the LM term dominates the soft
tokens' updates at the paper's lambda, so re-running the frozen LM for every codebook setting would change
nothing but the cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from userip.codebook.config import QuantizationConfig
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.profile.bank import build_aux, write_bank
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens
from userip.profile.stage import ProfileStageConfig
from userip.prompts import ProfileSpec
from userip.utils.run_layout import RunLayout


def requantize(
    run_dir: Path,
    dataset: Dataset,
    profile: ProfileStageConfig,
    quant: QuantizationConfig,
    codebook_sizes: list[int],
    bank_dir: Path,
    epochs: int = 30,
    batch_size: int = 128,
) -> FeatureBank:
    """Train codebooks + surrogate (eq. 5, straight-through) on the *fixed* soft tokens of ``RUN/profile``
    with other codebook sizes (or without VQ), and write that bank to ``bank_dir``."""
    soft_tokens, trained_mask, _ = load_soft_tokens(RunLayout(run_dir).profile)
    profile_table = profile_means(soft_tokens, profile.prompt)  # (U, P, D)
    specs = [
        ProfileSpec(p.name, p.phrase, p.num_soft_tokens, k)
        for p, k in zip(profile.prompt.profiles, codebook_sizes)
    ]
    aux = build_aux(dataset, specs, profile_table.shape[-1], quant)
    optimizer = torch.optim.AdamW(aux.parameters(), lr=profile.train.aux_lr)
    trained_ids = torch.nonzero(trained_mask).squeeze(1)
    gen = torch.Generator().manual_seed(quant.seed)
    aux.train()
    for _ in range(epochs):
        perm = trained_ids[torch.randperm(len(trained_ids), generator=gen)]
        for start in range(0, len(perm), batch_size):
            user_ids = perm[start : start + batch_size]
            loss, _ = aux(user_ids, profile_table[user_ids])
            optimizer.zero_grad(set_to_none=True)
            # The loss carries lambda; rescale so the codebook learns at the paper's rate per unit of L_VQ.
            (loss / max(quant.loss_weight, 1e-12)).backward()
            optimizer.step()
    aux.eval()
    bank, _ = write_bank(
        bank_dir,
        dataset,
        aux,
        profile_table,
        trained_user_ids=trained_ids.numpy(),
        config={"requantized": True, "codebook_sizes": codebook_sizes, "without_vq": quant.without_vq},
    )
    return bank
