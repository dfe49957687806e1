from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from userip.profile.optim import RowAdam
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, plan_batches
from userip.prompts import collate
from userip.utils.config import ConfigError

from .conftest import history_dataset, make_setup


def _config(**kw):
    base = dict(lr=0.05, batch_size=4, num_epochs=3, checkpoint_every=0, seed=3, progress=False)
    base.update(kw)
    return ProfileTrainConfig(**base)


def test_frozen_lm_untouched_rows_and_loss_falls(tiny_llama, word_tokenizer):
    ds = history_dataset(num_users=12)
    model, examples = make_setup(tiny_llama, word_tokenizer, ds)
    before_lm = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    table0 = model.table.weight.clone()
    batch = collate([examples[i] for i in range(len(examples))], examples.builder.pad_token_id)
    with torch.no_grad():
        loss0, n0 = model(batch, per_example=True)
    # train only users 0..5: the other rows must not move
    subset = examples.subset(range(6))
    trainer = ProfileTrainer(model, subset, _config(num_epochs=8))
    result = trainer.train()
    assert result.steps == trainer.total_steps == 2 * 8
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before_lm[k]), k  # bit-identical frozen LM
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert torch.equal(model.table.weight[6:], table0[6:])
    assert not torch.equal(model.table.weight[:6], table0[:6])
    with torch.no_grad():
        loss1, n1 = model(batch, per_example=True)
    per_user0, per_user1 = loss0 / n0, loss1 / n1
    assert (per_user1[:6] < per_user0[:6]).all()  # each trained user's loss falls
    assert torch.equal(per_user1[6:], per_user0[6:])


def test_batched_loss_equals_unbatched(tiny_llama, word_tokenizer):
    model, examples = make_setup(tiny_llama, word_tokenizer, history_dataset(num_users=5))
    batch = collate([examples[i] for i in range(5)], examples.builder.pad_token_id)
    with torch.no_grad():
        nll, counts = model(batch, per_example=True)
        for i in range(5):
            single = collate([examples[i]], examples.builder.pad_token_id)
            nll_i, count_i = model(single)
            # independent loss: full logits + manual log-softmax over the single unpadded example
            embeds = model.embed_inputs(single)
            logits = tiny_llama(
                inputs_embeds=embeds, attention_mask=single.attention_mask, position_ids=single.position_ids
            ).logits[0]
            labels = single.labels[0]
            logp = torch.log_softmax(logits[:-1].double(), -1)
            sel = labels[1:] != -100
            manual = -logp[sel].gather(1, labels[1:][sel][:, None]).sum()
            assert count_i == counts[i] == sel.sum()
            assert torch.allclose(nll_i.double(), manual, rtol=1e-5)
            assert torch.allclose(nll[i], nll_i, rtol=1e-5)


def test_kill_and_resume_matches_uninterrupted(tiny_llama, word_tokenizer, tmp_path):
    ds = history_dataset(num_users=10)
    cfg = _config(num_epochs=3, checkpoint_every=2, grad_accum_steps=2, batch_size=2)
    model_a, ex_a = make_setup(tiny_llama, word_tokenizer, ds)
    ProfileTrainer(model_a, ex_a, cfg).train()
    uninterrupted = model_a.table.weight.clone()

    model_b, ex_b = make_setup(tiny_llama, word_tokenizer, ds)
    first = ProfileTrainer(model_b, ex_b, cfg, checkpoint_dir=tmp_path)
    first.train(stop_after_steps=5)  # "killed" after step 5; last checkpoint at step 4
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000004.safetensors"]
    model_c, ex_c = make_setup(tiny_llama, word_tokenizer, ds, seed=99)  # fresh process: different init
    second = ProfileTrainer(model_c, ex_c, cfg, checkpoint_dir=tmp_path)
    result = second.train(resume=True)
    assert result.steps == first.total_steps
    assert torch.equal(model_c.table.weight, uninterrupted)
    saved = load_file(str(tmp_path / f"ckpt-{first.total_steps:08d}.safetensors"))
    assert torch.equal(saved["table"], uninterrupted)
    with pytest.raises(ConfigError, match="cannot resume"):
        ProfileTrainer(model_c, ex_c, _config(batch_size=3), checkpoint_dir=tmp_path).train(resume=True)


class _Aux(torch.nn.Module):
    """Pulls profile embeddings towards a learned centre; weight 0.1."""

    def __init__(self, dim):
        super().__init__()
        self.centre = torch.nn.Parameter(torch.zeros(dim))
        self.calls = 0

    def forward(self, user_ids, profile_embeds):
        self.calls += 1
        loss = 0.1 * (profile_embeds - self.centre).pow(2).mean()
        return loss, {"aux": loss.item()}


def test_aux_hook_trains_and_resumes(tiny_llama, word_tokenizer, tmp_path):
    ds = history_dataset(num_users=8)
    D = tiny_llama.get_input_embeddings().weight.shape[1]
    cfg = _config(num_epochs=2, checkpoint_every=1)
    model, ex = make_setup(tiny_llama, word_tokenizer, ds)
    aux = _Aux(D)
    res = ProfileTrainer(model, ex, cfg, aux=aux).train()
    assert aux.calls == res.steps and "aux" in res.aux_metrics
    assert not torch.equal(aux.centre, torch.zeros(D))
    full_centre, full_table = aux.centre.detach().clone(), model.table.weight.clone()

    model2, ex2 = make_setup(tiny_llama, word_tokenizer, ds)
    aux2 = _Aux(D)
    ProfileTrainer(model2, ex2, cfg, aux=aux2, checkpoint_dir=tmp_path).train(stop_after_steps=3)
    model3, ex3 = make_setup(tiny_llama, word_tokenizer, ds)
    aux3 = _Aux(D)
    ProfileTrainer(model3, ex3, cfg, aux=aux3, checkpoint_dir=tmp_path).train(resume=True)
    assert torch.equal(aux3.centre, full_centre)
    assert torch.equal(model3.table.weight, full_table)

    frozen = _Aux(D)
    model4, ex4 = make_setup(tiny_llama, word_tokenizer, ds)
    ProfileTrainer(model4, ex4.subset([0]), _config(train_aux=False), aux=frozen).train()
    assert torch.equal(frozen.centre, torch.zeros(D))  # aux frozen for new users


def test_row_adam_matches_torch_adam():
    torch.manual_seed(0)
    table = torch.randn(6, 2, 3)
    ref = table[[1, 4]].clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
    row = RowAdam(table, lr=0.01, weight_decay=0.1)
    untouched = table[[0, 2, 3, 5]].clone()
    for _ in range(4):
        g = torch.randn(2, 2, 3)
        ref.grad = g.clone()
        opt.step()
        row.step(torch.tensor([1, 4]), g)
    assert torch.allclose(table[[1, 4]], ref.detach(), atol=1e-6)
    assert torch.equal(table[[0, 2, 3, 5]], untouched)
    assert row.row_steps.tolist() == [0, 4, 0, 0, 4, 0]


def test_plan_batches_deterministic_and_bucketed():
    lengths = np.random.default_rng(0).integers(5, 100, size=103)
    a = plan_batches(lengths, 8, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, plan_batches(lengths, 8, seed=1, epoch=0)))
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    b = plan_batches(lengths, 8, seed=1, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    pad_bucketed = sum(lengths[x].max() * len(x) - lengths[x].sum() for x in a)
    plain = plan_batches(lengths, 8, seed=1, epoch=0, bucket_by_length=False)
    pad_plain = sum(lengths[x].max() * len(x) - lengths[x].sum() for x in plain)
    assert pad_bucketed < 0.5 * pad_plain


def test_stopping_rule_ends_training_when_the_epoch_loss_flattens(tiny_llama, word_tokenizer, tmp_path):
    ds = history_dataset(num_users=8)
    model, ex = make_setup(tiny_llama, word_tokenizer, ds)
    full = ProfileTrainer(model, ex, _config(num_epochs=4)).train()
    per_epoch = len(full.loss_history) // 4
    means = [float(np.mean(full.loss_history[e * per_epoch : (e + 1) * per_epoch])) for e in range(4)]
    gain = (means[0] - means[1]) / means[0]  # epoch 2's relative improvement, computed independently
    assert gain > 0

    # A threshold just above epoch 2's improvement stops after epoch 2; just below, epoch 3 runs.
    model_a, ex_a = make_setup(tiny_llama, word_tokenizer, ds)
    trainer = ProfileTrainer(model_a, ex_a, _config(num_epochs=4, min_epoch_improvement=gain * 1.01))
    stopped = trainer.train()
    assert stopped.steps == 2 * per_epoch and trainer.state.stopped_early
    assert stopped.loss_history == full.loss_history[: 2 * per_epoch]  # same run up to the stop
    model_b, ex_b = make_setup(tiny_llama, word_tokenizer, ds)
    go_on = ProfileTrainer(model_b, ex_b, _config(num_epochs=4, min_epoch_improvement=gain * 0.99)).train()
    assert go_on.steps > 2 * per_epoch

    # A resumed run that had stopped stays stopped.
    model_c, ex_c = make_setup(tiny_llama, word_tokenizer, ds)
    cfg = _config(num_epochs=4, min_epoch_improvement=gain * 1.01, checkpoint_every=1)
    ProfileTrainer(model_c, ex_c, cfg, checkpoint_dir=tmp_path).train()
    model_d, ex_d = make_setup(tiny_llama, word_tokenizer, ds)
    resumed = ProfileTrainer(model_d, ex_d, cfg, checkpoint_dir=tmp_path).train(resume=True)
    assert resumed.steps == 2 * per_epoch and resumed.tokens == 0  # no step taken after the resume
    with pytest.raises(ConfigError, match="min_epoch_improvement"):
        _config(min_epoch_improvement=1.5)
