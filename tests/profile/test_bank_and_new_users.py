"""The profile stage's bank and new users (``userip.profile.bank``, ``userip.profile.new_users``): bank +
report after training, and new users against frozen modules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tests.codebook.conftest import hobby_dataset, planted_clusters

from userip.codebook import QuantizationConfig
from userip.data.schema import Dataset
from userip.feature_bank import KIND_CONTINUOUS, UNKNOWN_CODE, FeatureBank, FeatureBankError
from userip.profile.bank import build_aux, load_objective_state, write_bank
from userip.profile.new_users import infer_new_users, read_new_users, trainer_fit_profiles
from userip.prompts import ProfileSpec

PROFILES = (
    ProfileSpec("hobby", "This user's hobby is", codebook_size=3),
    ProfileSpec("background", ", his background is", codebook_size=2),
)


@pytest.fixture
def tiny_dataset() -> Dataset:
    """24 users with a known hobby (``tests.codebook.conftest.hobby_dataset``)."""
    return hobby_dataset()


def _planted_table(num_users: int) -> torch.Tensor:
    """(U, 2, 6): profile 0 clusters by u % 3 (the dataset's hobby), profile 1 is noise."""
    points, _ = planted_clusters(n_per=num_users, k=3)
    hobby = points.view(3, num_users, 6).permute(1, 0, 2)[
        torch.arange(num_users), torch.arange(num_users) % 3
    ]
    noise = torch.randn(num_users, 6, generator=torch.Generator().manual_seed(5))
    return torch.stack([hobby, noise], dim=1)


def test_write_bank_assigns_nearest_codes_and_reports_recovery(tiny_dataset, tmp_path):
    aux = build_aux(tiny_dataset, PROFILES, 6, QuantizationConfig(kmeans_init_samples=24))
    table = _planted_table(tiny_dataset.num_users)
    aux.quantizer.init_from(table)
    trained = np.arange(1, tiny_dataset.num_users)  # user 0 had no training target
    bank, report = write_bank(
        tmp_path / "bank", tiny_dataset, aux, table, trained_user_ids=trained, lm="tiny"
    )
    loaded = FeatureBank.load(tmp_path / "bank", expected_dataset_hash=tiny_dataset.content_hash)
    expected = aux.quantizer.nearest(table).numpy()
    assert np.array_equal(loaded.lookup(trained), expected[trained])
    assert (loaded.lookup(np.array([0])) == UNKNOWN_CODE).all()
    assert loaded.manifest["config"]["quantization"]["kmeans_init_samples"] == 24
    assert report["recovery"]["profiles"]["hobby"]["vs"]["hobby"]["nmi"] == pytest.approx(1.0)
    assert report["profiles"]["hobby"]["unknown_users"] == 1
    assert (tmp_path / "bank" / "report.json").exists() and report["bank_version"] == bank.version


def test_without_vq_bank_keeps_vectors_and_kmeans_ids(tiny_dataset, tmp_path):
    aux = build_aux(tiny_dataset, PROFILES, 6, QuantizationConfig(without_vq=True))
    table = _planted_table(tiny_dataset.num_users)
    bank, _ = write_bank(tmp_path / "bank", tiny_dataset, aux, table)
    assert bank.kind == KIND_CONTINUOUS and bank.profile_vectors.shape == (tiny_dataset.num_users, 2, 8)
    assert bank.codes[:, 0].max() < 3 and bank.codes[:, 1].max() < 2 and bank.codes.min() >= 0


def test_codebook_size_below_two_in_profile_specs(tiny_dataset):
    with pytest.raises(ValueError, match="at least 2 codes"):
        build_aux(tiny_dataset, (ProfileSpec("hobby", "This user's hobby is", codebook_size=1),), 6)


def _new_users_file(tmp_path):
    frame = pd.DataFrame(
        {
            "raw_user_id": ["n1", "n1", "n2", "u3", "n3"],
            "raw_item_id": ["i0", "i3", "i1", "i2", "unknown-item"],
            "rating": [5.0, 4.0, 1.0, 5.0, 5.0],
        }
    )
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    return path


def test_new_users_are_upserted_without_touching_others(tiny_dataset, tmp_path):
    aux = build_aux(tiny_dataset, PROFILES, 6, QuantizationConfig(kmeans_init_samples=24))
    table = _planted_table(tiny_dataset.num_users)
    aux.quantizer.init_from(table)
    bank, _ = write_bank(tmp_path / "bank", tiny_dataset, aux, table)
    new = read_new_users(_new_users_file(tmp_path), tiny_dataset, bank)
    assert new.raw_user_ids == ["n1", "n2"] and new.skipped_known == ["u3"] and new.dropped_interactions == 1
    assert new.user_ids.tolist() == [0, 1] and new.dataset.num_users == 2
    assert new.dataset.split("train").query("user_id == 0")["label"].tolist() == [1, 1]
    before = {k: v.clone() for k, v in aux.state_dict().items()}
    seen = {}

    def fit_profiles(new_dataset, user_ids, frozen_aux):
        seen["training"] = frozen_aux.training
        embeds = table[[0, 1]].clone().requires_grad_(True)  # stand-in for soft tokens fit by the trainer
        loss, _ = frozen_aux(torch.as_tensor(user_ids), embeds)
        loss.backward()  # gradients reach the new users' profiles, never the frozen modules
        seen["grad"] = embeds.grad.abs().sum().item()
        return embeds.detach()

    updated = infer_new_users(tmp_path / "bank", tiny_dataset, aux, new, fit_profiles)
    assert seen["training"] is False and seen["grad"] > 0
    assert all(torch.equal(before[k], v) for k, v in aux.state_dict().items() if k != "step")
    loaded = FeatureBank.load(tmp_path / "bank")
    assert loaded.version == updated.version
    codes, known = loaded.lookup_raw(["n1", "n2"])
    assert known.all() and np.array_equal(codes, aux.assign_codes(table[[0, 1]]))
    assert np.array_equal(loaded.lookup(np.arange(24)), bank.codes)
    with pytest.raises(FeatureBankError, match="built from dataset"):
        other = build_aux(tiny_dataset, PROFILES, 6)
        tiny_dataset.interactions.loc[0, "rating"] = 2.0  # a different dataset now
        infer_new_users(tmp_path / "bank", tiny_dataset, other, new, fit_profiles)


def test_new_users_join_a_multi_part_bank(tiny_dataset, tmp_path):
    """A bank written in parts (the distributed stage's) takes new users like a one-file bank: the next
    version (one file) keeps every part's users and adds the new ones."""
    aux = build_aux(tiny_dataset, PROFILES, 6, QuantizationConfig(kmeans_init_samples=24))
    table = _planted_table(tiny_dataset.num_users)
    aux.quantizer.init_from(table)
    bank, _ = write_bank(tmp_path / "bank", tiny_dataset, aux, table)
    bank.write_parts(tmp_path / "bank", [0, 10, tiny_dataset.num_users])
    new = read_new_users(_new_users_file(tmp_path), tiny_dataset, FeatureBank.load(tmp_path / "bank"))

    def fit_profiles(new_dataset, user_ids, frozen_aux):
        return table[[0, 1]].clone()

    updated = infer_new_users(tmp_path / "bank", tiny_dataset, aux, new, fit_profiles)
    loaded = FeatureBank.load(tmp_path / "bank")
    assert loaded.version == updated.version and loaded.manifest["parent_version"] == bank.version
    codes, known = loaded.lookup_raw(["n1", "n2"])
    assert known.all() and np.array_equal(codes, aux.assign_codes(table[[0, 1]]))
    assert np.array_equal(loaded.lookup(np.arange(tiny_dataset.num_users)), bank.codes)


def test_joint_training_with_the_profile_trainer(tiny_dataset, tmp_path):
    """Algorithm 1 end to end on a tiny LM: the trainer's aux hook, checkpoint of the aux state, the bank."""
    from tests.profile.conftest import llama_config, make_setup
    from tests.prompts.conftest import make_word_tokenizer

    from userip.profile.lm import load_causal_lm
    from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer
    from userip.prompts import PromptConfig

    tokenizer = make_word_tokenizer(with_bos=True)
    torch.manual_seed(0)
    lm = load_causal_lm(llama_config(len(tokenizer)), dtype="fp32", device="cpu")  # hidden 32
    model, examples = make_setup(lm, tokenizer, tiny_dataset, PromptConfig(profiles=PROFILES))
    aux = build_aux(tiny_dataset, PROFILES, 32, QuantizationConfig(kmeans_init_samples=8, loss_weight=1.0))
    train_cfg = ProfileTrainConfig(batch_size=8, num_epochs=2, progress=False, checkpoint_every=0)
    result = ProfileTrainer(model, examples, train_cfg, aux=aux, checkpoint_dir=tmp_path / "ckpt").train()
    assert result.steps == 6 and "rec_loss" in result.aux_metrics and "perplexity_hobby" in result.aux_metrics
    assert all(bool(q.initialized) for q in aux.quantizer.quantizers) and int(aux.step) == 6
    resumed_aux = build_aux(
        tiny_dataset, PROFILES, 32, QuantizationConfig(kmeans_init_samples=8, loss_weight=1.0)
    )
    ProfileTrainer(
        model, examples, train_cfg, aux=resumed_aux, checkpoint_dir=tmp_path / "ckpt"
    ).load_checkpoint()
    assert torch.equal(resumed_aux.quantizer.quantizers[0].codebook, aux.quantizer.quantizers[0].codebook)
    profile_table = model.profile_embeds(torch.arange(tiny_dataset.num_users))
    bank, report = write_bank(
        tmp_path / "bank", tiny_dataset, aux, profile_table, trained_user_ids=examples.user_ids
    )
    assert np.array_equal(FeatureBank.load(tmp_path / "bank").codes, aux.assign_codes(profile_table))
    assert "recovery" in report
    # New users in a "later process": objective restored from the bank folder, trainer with aux frozen.
    restored = load_objective_state(build_aux(tiny_dataset, PROFILES, 32), tmp_path / "bank")
    assert torch.equal(restored.quantizer.quantizers[1].codebook, aux.quantizer.quantizers[1].codebook)
    new = read_new_users(_new_users_file(tmp_path), tiny_dataset, bank)
    fit = trainer_fit_profiles(lm, tokenizer, model.prompt_config, train_cfg)
    updated = infer_new_users(tmp_path / "bank", tiny_dataset, restored, new, fit)
    codes, known = updated.lookup_raw(["n1", "n2", "u5"])
    assert known.all() and (codes[:2] < np.array([3, 2])).all()
    assert np.array_equal(updated.lookup(np.arange(tiny_dataset.num_users)), bank.codes)
    assert torch.equal(restored.quantizer.quantizers[1].codebook, aux.quantizer.quantizers[1].codebook)


def _skewed_aux(dataset, share: float):
    """Planted hobby codebook with code 2 moved far away: plain nearest gives it no user."""
    aux = build_aux(dataset, PROFILES, 6, QuantizationConfig(kmeans_init_samples=24, balance_min_share=share))
    table = _planted_table(dataset.num_users)
    aux.quantizer.init_from(table)
    with torch.no_grad():
        aux.quantizer.quantizers[0].codebook[2] = 10.0
    return aux, table


def _plain_nearest(aux, table):
    """Codes without offsets, by a plain numpy argmin of squared distances."""
    cols = []
    for p, q in enumerate(aux.quantizer.quantizers):
        x, e = table[:, p].numpy().astype(np.float64), q.codebook.detach().numpy().astype(np.float64)
        cols.append(((x[:, None] - e[None]) ** 2).sum(-1).argmin(1))
    return np.stack(cols, axis=1)


def test_balance_zero_keeps_plain_nearest_codes(tiny_dataset, tmp_path):
    aux, table = _skewed_aux(tiny_dataset, 0.0)
    bank, report = write_bank(tmp_path / "bank", tiny_dataset, aux, table)
    assert np.array_equal(bank.codes, _plain_nearest(aux, table))
    assert report["profiles"]["hobby"]["users_per_code"][2] == 0
    assert all(not q.code_bias.any() for q in aux.quantizer.quantizers)


def test_balanced_bank_and_new_users_use_the_saved_offsets(tiny_dataset, tmp_path):
    aux, table = _skewed_aux(tiny_dataset, 0.05)  # floor: ceil(0.05 * 24) = 2 users per code
    plain = _plain_nearest(aux, table)
    bank, report = write_bank(tmp_path / "bank", tiny_dataset, aux, table)
    for name in ("hobby", "background"):
        assert min(report["profiles"][name]["users_per_code"]) >= 2
    assert float(aux.quantizer.quantizers[0].code_bias[2]) > 0
    moved = np.flatnonzero(bank.codes[:, 0] != plain[:, 0])  # users the offsets put on another code
    assert len(moved) >= 2 and (bank.codes[moved, 0] == 2).all()
    # "Later process": the objective comes back from the bank folder with its offsets.
    restored = load_objective_state(build_aux(tiny_dataset, PROFILES, 6), tmp_path / "bank")
    for q_new, q_old in zip(restored.quantizer.quantizers, aux.quantizer.quantizers):
        assert torch.equal(q_new.code_bias, q_old.code_bias)
    new = read_new_users(_new_users_file(tmp_path), tiny_dataset, bank)  # n1, n2

    def fit_profiles(new_dataset, user_ids, frozen_aux):  # new users with the moved users' profiles
        return table[moved[:2]].clone()

    updated = infer_new_users(tmp_path / "bank", tiny_dataset, restored, new, fit_profiles)
    codes, known = updated.lookup_raw(["n1", "n2"])
    assert known.all() and np.array_equal(codes, bank.codes[moved[:2]])  # the trained users' rule
    assert not np.array_equal(codes, plain[moved[:2]])  # which is not the plain nearest code
