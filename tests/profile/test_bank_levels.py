"""The profile stage's bank with residual levels (``quantization.num_levels`` > 1): Algorithm 1 trains every
level, the bank holds one field per profile and level, new users get every level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.codebook.conftest import hobby_dataset

from userip.codebook import QuantizationConfig
from userip.feature_bank import CODE_LEVELS_KEY, FeatureBank, FeatureBankError
from userip.profile.bank import build_aux, load_objective_state, write_bank
from userip.profile.new_users import infer_new_users, read_new_users, trainer_fit_profiles
from userip.prompts import ProfileSpec

from .test_bank_and_new_users import PROFILES, _new_users_file

FIELDS = ["hobby", "hobby_r1", "background", "background_r1"]


def _levels(**kwargs) -> QuantizationConfig:
    return QuantizationConfig(kmeans_init_samples=8, loss_weight=1.0, num_levels=2, **kwargs)


def test_joint_training_writes_every_level_and_new_users_get_them(tmp_path):
    from tests.profile.conftest import llama_config, make_setup
    from tests.prompts.conftest import make_word_tokenizer

    from userip.profile.lm import load_causal_lm
    from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer
    from userip.prompts import PromptConfig

    dataset = hobby_dataset()
    tokenizer = make_word_tokenizer(with_bos=True)
    torch.manual_seed(0)
    lm = load_causal_lm(llama_config(len(tokenizer)), dtype="fp32", device="cpu")  # hidden 32
    model, examples = make_setup(lm, tokenizer, dataset, PromptConfig(profiles=PROFILES))
    aux = build_aux(dataset, PROFILES, 32, _levels(residual_sizes=(2,)))
    train_cfg = ProfileTrainConfig(batch_size=8, num_epochs=2, progress=False, checkpoint_every=0)
    result = ProfileTrainer(model, examples, train_cfg, aux=aux, checkpoint_dir=tmp_path / "ckpt").train()
    assert {f"perplexity_{f}" for f in FIELDS} <= set(result.aux_metrics)
    assert all(q.is_initialized for q in aux.quantizer.quantizers)
    resumed = build_aux(dataset, PROFILES, 32, _levels(residual_sizes=(2,)))
    ProfileTrainer(
        model, examples, train_cfg, aux=resumed, checkpoint_dir=tmp_path / "ckpt"
    ).load_checkpoint()
    assert all(
        torch.equal(a, b)
        for a, b in zip(resumed.quantizer.field_codebooks(), aux.quantizer.field_codebooks())
    )

    profile_table = model.profile_embeds(torch.arange(dataset.num_users))
    bank, report = write_bank(
        tmp_path / "bank", dataset, aux, profile_table, trained_user_ids=examples.user_ids
    )
    loaded = FeatureBank.load(tmp_path / "bank")
    assert loaded.profile_names == FIELDS and loaded.codebook_sizes == [3, 2, 2, 2]
    assert loaded.manifest[CODE_LEVELS_KEY] == {"profiles": ["hobby", "background"], "num_levels": 2}
    assert np.array_equal(loaded.codes, aux.assign_codes(profile_table))
    assert set(report["profiles"]) == set(FIELDS) and set(report["recovery"]["profiles"]) == set(FIELDS)
    # Every level's balance floor (default 5%: 2 of 24 users per code).
    assert all(min(report["profiles"][f]["users_per_code"]) >= 2 for f in FIELDS)

    # New users, "later process": objective restored from the bank folder, soft tokens fit with aux frozen.
    restored = load_objective_state(
        build_aux(dataset, PROFILES, 32, _levels(residual_sizes=(2,))), tmp_path / "bank"
    )
    new = read_new_users(_new_users_file(tmp_path), dataset, bank)
    updated = infer_new_users(
        tmp_path / "bank",
        dataset,
        restored,
        new,
        trainer_fit_profiles(lm, tokenizer, model.prompt_config, train_cfg),
    )
    codes, known = updated.lookup_raw(["n1", "n2"])
    assert known.all() and codes.shape == (2, 4) and ((codes >= 0) & (codes < [3, 2, 2, 2])).all()
    assert np.array_equal(updated.lookup(np.arange(dataset.num_users)), bank.codes)
    assert updated.num_levels == 2

    with pytest.raises(FeatureBankError, match="num_levels"):  # a one-level objective cannot read it
        load_objective_state(build_aux(dataset, PROFILES, 32), tmp_path / "bank")


def test_new_users_codes_are_the_residual_rule(tmp_path):
    """The new users' 4 fields are exactly what the saved quantizer assigns (balance offsets included)."""
    dataset = hobby_dataset()
    specs = (ProfileSpec("hobby", "This user's hobby is", codebook_size=3),
             ProfileSpec("background", ", his background is", codebook_size=2))  # fmt: skip
    aux = build_aux(dataset, specs, 6, _levels(balance_min_share=0.3))
    table = torch.randn(dataset.num_users, 2, 6, generator=torch.Generator().manual_seed(1))
    aux.quantizer.init_from(table)
    bank, _ = write_bank(tmp_path / "bank", dataset, aux, table)
    restored = load_objective_state(
        build_aux(dataset, specs, 6, _levels(balance_min_share=0.3)), tmp_path / "bank"
    )
    new = read_new_users(_new_users_file(tmp_path), dataset, bank)
    fresh = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(2))
    updated = infer_new_users(tmp_path / "bank", dataset, restored, new, lambda *_: fresh.clone())
    codes, known = updated.lookup_raw(["n1", "n2"])
    assert known.all() and np.array_equal(codes, aux.quantizer.nearest(fresh).numpy())
    assert any(bool(level.code_bias.any()) for q in restored.quantizer.quantizers for level in q.levels)
