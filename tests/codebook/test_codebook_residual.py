"""Residual (multi-level) quantization: ``userip.codebook.residual.ResidualQuantizer`` and
``MultiProfileQuantizer(num_levels=...)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from userip.codebook import MultiProfileQuantizer, ProfileQuantizer, QuantizationConfig
from userip.codebook.quantizer import CodebookError
from userip.codebook.residual import LEVEL_SEED_STRIDE, ResidualQuantizer, residual_level_sizes
from userip.utils.config import ConfigError

from .conftest import planted_clusters


def _points(n: int = 60, dim: int = 6, seed: int = 3) -> torch.Tensor:
    """Gaussian points: no cluster structure, so a second level has plenty left to explain."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _residual(sizes, seed: int = 0, dim: int = 6, **options) -> ResidualQuantizer:
    """Levels of these sizes, seeded as ``MultiProfileQuantizer`` seeds them."""
    return ResidualQuantizer(
        [ProfileQuantizer(dim, k, seed=seed + LEVEL_SEED_STRIDE * i, **options) for i, k in enumerate(sizes)]
    )


def _initialised(sizes=(3, 3), dim: int = 6, **options) -> ResidualQuantizer:
    rq = _residual(sizes, seed=1, dim=dim, **options)
    rq.init_from(_points(dim=dim))
    return rq


def test_inverse_contract_holds_bit_for_bit_in_training_and_eval():
    rq = _initialised((3, 4, 2))
    z = _points(17, seed=9)
    for training in (True, False):
        rq.train(training)
        quantized, code_ids, loss = rq(z)
        assert code_ids.shape == (17, 3) and code_ids.dtype == torch.int64
        assert torch.equal(rq.ids_to_vectors(code_ids), quantized)
        assert torch.equal(rq.nearest(z), code_ids)
        assert loss.dim() == 0 and float(loss.detach()) > 0
    with pytest.raises(CodebookError, match=r"\(\.\.\., 3\)"):
        rq.ids_to_vectors(code_ids[:, :2])


def test_one_level_is_a_profile_quantizer_exactly():
    """Same seed, same k-means init from the training batches, same optimizer steps: every number equal."""
    options = {"kmeans_init_samples": 20, "dead_code_threshold": 2, "beta": 0.25}
    single = ProfileQuantizer(6, 3, seed=4, **options)
    residual = _residual([3], seed=4, **options)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
    opt_residual = torch.optim.SGD(residual.parameters(), lr=0.1)
    points, _ = planted_clusters(n_per=10, k=3)
    for step in range(6):  # step 0 and 1 collect the k-means samples; revival may fire later
        batch = points[torch.randperm(30, generator=torch.Generator().manual_seed(step))[:12]]
        outs = []
        for q, opt in ((single, opt_single), (residual, opt_residual)):
            z = (batch * 1.0).requires_grad_(True)
            quantized, code_ids, loss = q(z)
            opt.zero_grad()
            (loss + quantized.square().sum()).backward()
            opt.step()
            outs.append((quantized.detach(), code_ids.reshape(-1), loss.detach(), z.grad))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        assert torch.equal(single.codebook, residual.levels[0].codebook)
    assert single.is_initialized and residual.is_initialized


def test_two_levels_reconstruct_better_and_match_numpy():
    """An independent numpy residual nearest-code quantization gives the same ids and reconstruction."""
    rq = _initialised((4, 4))
    z = _points(40, seed=11)
    rq.eval()
    quantized, code_ids, _ = rq(z)
    x = z.numpy().astype(np.float64)
    residual, recon, ids = x.copy(), np.zeros_like(x), []
    for level in rq.levels:
        book = level.codebook.detach().numpy().astype(np.float64)
        chosen = ((residual[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
        ids.append(chosen)
        recon += book[chosen]
        residual -= book[chosen]
    assert np.array_equal(np.stack(ids, 1), code_ids.numpy())
    np.testing.assert_allclose(quantized.numpy(), recon, rtol=1e-6, atol=1e-6)
    two_level_error = ((x - recon) ** 2).sum(-1).mean()
    one_level = x - rq.levels[0].codebook.detach().numpy().astype(np.float64)[ids[0]]
    one_level_error = (one_level**2).sum(-1).mean()
    assert two_level_error < one_level_error
    assert float(((z - quantized) ** 2).sum(-1).mean()) == pytest.approx(two_level_error, rel=1e-5)


def test_loss_is_eq5_per_level_and_one_straight_through_on_the_sum():
    rq = _initialised((3, 3), beta=0.5)
    rq.eval()  # no revival: the codebooks stay as they are
    z = _points(10, seed=2).requires_grad_(True)
    quantized, code_ids, loss = rq(z)
    books = [level.codebook.detach() for level in rq.levels]
    r0 = z.detach()
    e0 = books[0][code_ids[:, 0]]
    r1 = r0 - e0
    e1 = books[1][code_ids[:, 1]]
    expected = sum(
        ((e - r) ** 2).sum(-1).mean() * (1 + 0.5) for r, e in ((r0, e0), (r1, e1))
    )  # codebook + beta * commitment, equal in value
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity, not one pass-through per level


def test_kmeans_init_per_level_on_the_residuals():
    """The first batches' profiles are held; then level 0 is set to their k-means centroids and level 1 to
    those of what level 0 leaves of the same profiles. Until then the profile passes through unchanged."""
    rq = _residual([3, 3], seed=2, kmeans_init_samples=30, dead_code_threshold=0)
    rq.train()
    first, second = _points(20, seed=5), _points(20, seed=6)
    out, _, loss = rq(first)
    assert not rq.levels[0].is_initialized and torch.equal(out, first) and float(loss) == 0.0
    assert rq.levels[0].init_samples.shape == (20, 6)  # state: a checkpoint carries the pending samples
    out, ids, _ = rq(second)
    assert rq.is_initialized and torch.equal(out, rq.ids_to_vectors(ids))  # quantizing from this batch on
    held = torch.cat([first, second])
    level0 = ProfileQuantizer(6, 3, seed=2)
    level0.init_from(held)
    level1 = ProfileQuantizer(6, 3, seed=2 + LEVEL_SEED_STRIDE)  # level 1's seed
    level1.init_from(held - level0.codebook.detach()[level0.nearest(held)])
    assert torch.equal(rq.levels[0].codebook, level0.codebook)
    assert torch.equal(rq.levels[1].codebook, level1.codebook)


def test_balance_offsets_per_level_on_the_residuals():
    rq = _initialised((3, 3))
    points = torch.cat([_points(57, seed=8), torch.full((3, 6), 4.0)])
    plain = rq.nearest(points)[:, 1]
    assert np.bincount(plain.numpy(), minlength=3).min() < 18  # level 1 needs offsets for the floor
    counts = rq.fit_balance(points, 0.3)
    assert bool(rq.levels[1].code_bias.abs().sum() > 0)
    floor = int(np.ceil(0.3 * len(points)))
    assert [int(c.min()) >= floor for c in counts] == [True, True]
    ids = rq.nearest(points)
    for level in range(2):
        assert np.bincount(ids[:, level].numpy(), minlength=3).min() >= floor
    assert torch.equal(rq.ids_to_vectors(ids), rq(points)[0])


def test_multi_profile_fields_are_profile_major_with_the_level_sizes():
    mq = MultiProfileQuantizer(
        ["hobby", "background"], [4, 3], 6, num_levels=3, residual_sizes=(2, 5), kmeans_init_samples=5
    )
    assert mq.field_names == [
        "hobby", "hobby_r1", "hobby_r2", "background", "background_r1", "background_r2"
    ]  # fmt: skip
    assert mq.field_sizes == [4, 2, 5, 3, 2, 5]
    assert [tuple(cb.shape) for cb in mq.field_codebooks()] == [(k, 6) for k in mq.field_sizes]
    table = torch.randn(30, 2, 6, generator=torch.Generator().manual_seed(0))
    mq.init_from(table)
    quantized, code_ids, _ = mq.eval()(table)
    assert code_ids.shape == (30, 6) and torch.equal(mq.nearest(table), code_ids)
    assert torch.equal(mq.ids_to_vectors(code_ids), quantized)
    assert torch.equal(code_ids[:, 3:], mq.quantizers[1].nearest(table[:, 1]))  # background's levels
    assert mq.codebook("background") is mq.field_codebooks()[3]  # a profile's codebook: its level 0
    one = MultiProfileQuantizer(["hobby", "background"], [4, 3], 6)
    assert one.field_names == one.profile_names and one.field_sizes == [4, 3]


def test_level_settings_are_checked():
    assert residual_level_sizes(4, 3) == [4, 4, 4] and residual_level_sizes(4, 2, (8,)) == [4, 8]
    with pytest.raises(CodebookError, match="one size per level after the first"):
        residual_level_sizes(4, 3, (8,))
    with pytest.raises(CodebookError, match="single level"):
        MultiProfileQuantizer(["hobby"], [4], 6, residual_sizes=(3,))
    with pytest.raises(CodebookError, match="at least 2 codes"):
        MultiProfileQuantizer(["hobby"], [4], 6, num_levels=2, residual_sizes=(1,))
    with pytest.raises(CodebookError, match="same width"):
        ResidualQuantizer([ProfileQuantizer(6, 3), ProfileQuantizer(5, 3)])
    with pytest.raises(ConfigError, match="num_levels"):
        QuantizationConfig(num_levels=0)
    with pytest.raises(ConfigError, match="residual_sizes"):
        QuantizationConfig(num_levels=3, residual_sizes=(4,))
    with pytest.raises(ConfigError, match="without_vq"):
        QuantizationConfig(num_levels=2, without_vq=True)
    with pytest.raises(ConfigError, match="single-process only"):
        QuantizationConfig(num_levels=2).check_distributed()
    QuantizationConfig().check_distributed()  # one level: nothing to refuse
