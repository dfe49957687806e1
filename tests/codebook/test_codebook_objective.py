"""Surrogate recommender, interaction sampler and the joint objective (the trainer's ``aux``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from userip.codebook import InteractionSampler, QuantizationConfig, build_joint_objective
from userip.codebook.objective import code_perplexity
from userip.utils.config import ConfigError, from_dict


def test_sampler_draws_only_each_users_training_rows(tiny_dataset):
    train = tiny_dataset.split("train")
    sampler = InteractionSampler.from_interactions(train, tiny_dataset.num_users + 2)
    users = np.array([3, 0, 25, 7])  # 25 is a user without training rows
    pos, items, labels = sampler.sample(users, 5, np.random.default_rng(0))
    assert len(pos) == 15 and np.array_equal(np.bincount(pos, minlength=4), [5, 5, 0, 5])
    pairs = set(zip(train["user_id"], train["item_id"], train["label"]))
    for p, i, y in zip(pos, items, labels):
        assert (users[p], i, int(y)) in pairs
    again = sampler.sample(users, 5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip((pos, items, labels), again))


def _objective(dataset, **overrides):
    args = {
        "codebook_init": "random",
        "loss_weight": 0.5,
        "beta": 0.25,
        "interactions_per_user": 4,
        **overrides,
    }
    cfg = QuantizationConfig(**args)
    return build_joint_objective(dataset, ["hobby", "background"], [3, 2], 6, cfg)


def test_aux_loss_is_lambda_times_vq_plus_bce(tiny_dataset):
    torch.manual_seed(0)
    aux = _objective(tiny_dataset).train()
    users = torch.tensor([0, 4, 9])
    embeds = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, metrics = aux(users, embeds)
    # Independent recomputation: same sample (seed, step 0), BCE written out, eq. 5 by hand.
    pos, items, labels = aux.sampler.sample(users.numpy(), 4, np.random.default_rng([0, 0]))
    cbs = [q.codebook.detach() for q in aux.quantizer.quantizers]
    chosen, vq = [], 0.0
    for p, cb in enumerate(cbs):
        z = embeds.detach()[:, p]
        e = cb[((z[:, None] - cb[None]) ** 2).sum(-1).argmin(-1)]
        chosen.append(e)
        vq += 1.25 * float(((z - e) ** 2).sum(-1).mean())
    logits = aux.surrogate(torch.stack(chosen, 1)[torch.as_tensor(pos)], torch.as_tensor(items)).detach()
    prob = torch.sigmoid(logits).numpy()
    bce = float(-np.mean(labels * np.log(prob) + (1 - labels) * np.log(1 - prob)))
    assert metrics["rec_loss"] == pytest.approx(bce, rel=1e-5)
    assert metrics["vq_loss"] == pytest.approx(vq, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * (vq + bce), rel=1e-5)
    assert int(aux.step) == 1
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert aux.surrogate.item_embedding.weight.grad is not None
    assert all(q.codebook.grad is not None for q in aux.quantizer.quantizers)


def test_surrogate_gradient_reaches_profiles_through_straight_through(tiny_dataset):
    aux = _objective(tiny_dataset, beta=0.0).train()  # beta 0: L_VQ gives z no gradient, only L_rec does
    users = torch.tensor([1, 2])
    embeds = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, _ = aux(users, embeds)
    loss.backward()
    # Same surrogate loss evaluated directly at the chosen codes: its gradient must equal embeds.grad.
    pos, items, labels = aux.sampler.sample(users.numpy(), 4, np.random.default_rng([0, 0]))
    codes = aux.quantizer.nearest(embeds.detach())
    at_codes = aux.quantizer.ids_to_vectors(codes).detach().requires_grad_(True)
    logits = aux.surrogate(at_codes[torch.as_tensor(pos)], torch.as_tensor(items))
    direct = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(labels))
    direct.backward()
    assert torch.allclose(embeds.grad, at_codes.grad, atol=1e-7)


def test_without_vq_uses_continuous_profiles_and_no_codebook_loss(tiny_dataset):
    aux = _objective(tiny_dataset, without_vq=True).train()
    embeds = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss, metrics = aux(torch.tensor([0, 1, 2]), embeds)
    assert float(metrics["vq_loss"]) == 0.0
    assert loss.item() == pytest.approx(0.5 * float(metrics["rec_loss"]), rel=1e-6)
    loss.backward()
    assert all(q.codebook.grad is None for q in aux.quantizer.quantizers)
    assert aux.projected_profiles(embeds.detach()).shape == (3, 2, 8)


def test_state_dict_survives_safetensors_round_trip(tiny_dataset, tmp_path):
    aux = _objective(tiny_dataset, use_user_features=True).train()
    aux(torch.tensor([0, 1]), torch.randn(2, 2, 6))
    save_file(
        {k: v.detach().clone().contiguous() for k, v in aux.state_dict().items()}, str(tmp_path / "a.st")
    )
    fresh = _objective(tiny_dataset, use_user_features=True)
    fresh.load_state_dict(load_file(str(tmp_path / "a.st")))
    assert int(fresh.step) == 1
    for (k, a), (_, b) in zip(aux.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_code_perplexity():
    assert float(code_perplexity(torch.tensor([1, 1, 1]), 4)) == pytest.approx(1.0)
    assert float(code_perplexity(torch.tensor([0, 1, 2, 3]), 4)) == pytest.approx(4.0)
    assert float(code_perplexity(torch.tensor([0, 0, 1, 1]), 4)) == pytest.approx(2.0)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="codebook_init"):
        from_dict(QuantizationConfig, {"codebook_init": "spectral"})
    with pytest.raises(ConfigError, match="interactions_per_user"):
        QuantizationConfig(interactions_per_user=0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(QuantizationConfig, {"lambda": 0.1})
    assert from_dict(QuantizationConfig, {"surrogate_mlp_dims": [8]}).surrogate_mlp_dims == (8,)
