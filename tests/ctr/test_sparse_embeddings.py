"""``CTRTrainerConfig.sparse_embeddings``: embedding tables with sparse gradients stepped by SparseAdam."""

from __future__ import annotations

import pytest
import torch
from tests.ctr.test_trainer import SMALL_DCN, feature_map, planted_split

from userip.ctr.data import SplitTensors
from userip.ctr.features import FeatureMap, Field
from userip.ctr.models import MODELS, build_model
from userip.ctr.trainer import CTRTrainerConfig, Optimizers, Trainer
from userip.utils.config import ConfigError


def _one_step(sparse: bool, x: torch.Tensor, y: torch.Tensor) -> tuple[Trainer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    trainer = Trainer(
        model, CTRTrainerConfig(lr=0.05, batch_size=len(y), max_epochs=1, sparse_embeddings=sparse)
    )
    trainer.train_epoch(SplitTensors(x, y), torch.Generator().manual_seed(0))
    return trainer, {k: v.clone() for k, v in model.state_dict().items()}


def test_first_step_is_adams_on_the_rows_in_the_batch_and_dense_adam_elsewhere():
    """One step from the same start, checked against a gradient computed independently (a dense backward):
    table rows in the batch take Adam's first step (SparseAdam puts eps under the bias-corrected root:
    lr * g / (|g| + eps / sqrt(1 - beta2))), rows outside it stay, every dense layer equals dense Adam's."""
    split = planted_split(64, 0)
    x, y = split.x_ids, split.labels
    torch.manual_seed(0)
    reference = build_model("dcn", feature_map(), **SMALL_DCN)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.nn.functional.binary_cross_entropy_with_logits(reference(x), y).backward()
    table_name = "embedding.weight_table.weight"
    grad = dict(reference.named_parameters())[table_name].grad
    _, dense = _one_step(False, x, y)
    sparse_trainer, sparse = _one_step(True, x, y)
    assert isinstance(sparse_trainer.optimizer, Optimizers)
    assert isinstance(sparse_trainer.optimizer.optimizers[0], torch.optim.SparseAdam)

    lr, beta2, eps = 0.05, 0.999, 1e-8
    in_batch = grad.abs().sum(dim=1) > 0
    expected = start[table_name].clone()
    expected[in_batch] -= lr * grad[in_batch] / (grad[in_batch].abs() + eps / (1 - beta2) ** 0.5)
    torch.testing.assert_close(sparse[table_name], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse[table_name][~in_batch], start[table_name][~in_batch])
    for name in dense:
        if name != table_name:
            torch.testing.assert_close(sparse[name], dense[name], rtol=1e-6, atol=1e-7, msg=name)
    # ... and the tables really have sparse gradients on that path
    sparse_trainer.model.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(sparse_trainer.model(x), y).backward()
    assert all(t.grad.is_sparse for t in sparse_trainer.model.embedding_parameters())


def test_later_steps_leave_rows_outside_the_batch_untouched():
    split = planted_split(256, 0)
    torch.manual_seed(0)
    model = build_model("dcn", feature_map(), **SMALL_DCN)
    trainer = Trainer(model, CTRTrainerConfig(lr=0.05, batch_size=32, max_epochs=1, sparse_embeddings=True))
    trainer.train_epoch(split, torch.Generator().manual_seed(0))  # moments exist now for the rows seen
    table = model.embedding_parameters()[0]
    before = table.detach().clone()
    batch = split.x_ids[:32]
    trainer.optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(batch), split.labels[:32]).backward()
    touched = table.grad.coalesce().indices()[0]
    trainer.optimizer.step()
    moved = (table.detach() != before).any(dim=1).nonzero().flatten()
    assert set(moved.tolist()) <= set(touched.tolist())  # lazy: rows without gradient keep their values
    assert len(moved) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_trains_with_sparse_embeddings(name: str):
    fm = FeatureMap((Field("user", 50), Field("item", 30), Field("ctx", 5)))
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(1, n, (128,), generator=gen) for n in (50, 30, 5)], 1)
    y = (torch.rand(128, generator=gen) < 0.4).float()
    torch.manual_seed(0)
    result = Trainer(
        build_model(name, fm), CTRTrainerConfig(batch_size=64, max_epochs=1, sparse_embeddings=True)
    ).fit(SplitTensors(x, y), SplitTensors(x, y))
    assert len(result.history) >= 1 and all(r.train_loss is None or r.train_loss > 0 for r in result.history)


def test_sparse_embeddings_refuse_embedding_weight_decay():
    with pytest.raises(ConfigError, match="embedding_weight_decay"):
        CTRTrainerConfig(sparse_embeddings=True, embedding_weight_decay=1e-3)
