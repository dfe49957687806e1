"""Dead-code revival splits the biggest group; balanced final assignment (code_bias, fit_balance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from userip.codebook import (
    CodebookError,
    MultiProfileQuantizer,
    ProfileQuantizer,
    QuantizationConfig,
    quantizer,
)
from userip.codebook.quantizer import column_logsumexp, floor_sinkhorn_offsets, kth_smallest, local_rows
from userip.utils.config import ConfigError


def _big_small_outlier(dim: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch: 60 points around 0 (spread 0.1), 15 around 5 e_1, and one outlier at 10 e_2 whose nearest
    code is the big cluster's (the hard case: the old farthest-point rule revived the dead code onto it)."""
    gen = torch.Generator().manual_seed(0)
    big = 0.1 * torch.randn(60, dim, generator=gen)
    small = 5.0 * torch.eye(dim)[1] + 0.1 * torch.randn(15, dim, generator=gen)
    outlier = 10.0 * torch.eye(dim)[2:3]
    return torch.cat([big, small, outlier]), big, small, outlier


def test_revival_splits_the_biggest_group_not_an_outlier():
    batch, big, small, outlier = _big_small_outlier()
    q = ProfileQuantizer(6, 3, init="random", dead_code_threshold=1).train()
    with torch.no_grad():  # code 0 on the big cluster, code 1 on the small one, code 2 far away (dead)
        q.codebook.copy_(torch.stack([big.mean(0), small.mean(0), torch.full((6,), -50.0)]))
    assert q.nearest(outlier).tolist() == [0]  # the outlier belongs to the big group
    q(batch)  # code 2 wins nothing for 1 step: revived
    revived = q.codebook.detach()[2]
    radius = float((big - big.mean(0)).norm(dim=1).max())
    assert float((revived - big.mean(0)).norm()) < radius  # inside the big cluster ...
    assert float((revived - outlier[0]).norm()) > 5.0  # ... nowhere near the outlier
    codes = q.nearest(batch)
    on_revived = int((codes[:60] == 2).sum())
    assert 6 <= on_revived <= 54  # it takes a real part of the big cluster (a split)
    assert (codes[60:75] == 1).all()  # the small cluster keeps its code


def _skewed(n: int = 1000, dim: int = 8) -> torch.Tensor:
    """95% of the points in one blob at 0, 5% in a blob at 3 (every coordinate)."""
    gen = torch.Generator().manual_seed(1)
    return torch.cat(
        [
            0.3 * torch.randn(n * 95 // 100, dim, generator=gen),
            3.0 + 0.3 * torch.randn(n // 20, dim, generator=gen),
        ]
    )


def _skewed_quantizer(points: torch.Tensor) -> ProfileQuantizer:
    """Code 0 on the big blob, 1 on the small one, 2 and 3 off to the sides: plain counts [950, 50, 0, 0]."""
    dim = points.shape[1]
    q = ProfileQuantizer(dim, 4, init="random").eval()
    side = torch.zeros(dim)
    side[0] = 4.0
    with torch.no_grad():
        q.codebook.copy_(torch.stack([points[:950].mean(0), points[950:].mean(0), side, -side]))
    return q


def _numpy_counts(q: ProfileQuantizer, points: torch.Tensor) -> np.ndarray:
    """Independent check: plain numpy argmin of squared distance minus the offsets, in float64."""
    x = points.numpy().astype(np.float64)
    e = q.codebook.detach().numpy().astype(np.float64)
    score = ((x[:, None, :] - e[None]) ** 2).sum(-1) - q.code_bias.numpy().astype(np.float64)
    return np.bincount(score.argmin(1), minlength=len(e))


def test_fit_balance_gives_every_code_its_floor():
    points = _skewed()
    q = _skewed_quantizer(points)
    assert torch.bincount(q.nearest(points), minlength=4).tolist() == [950, 50, 0, 0]
    counts = q.fit_balance(points, 0.05)
    assert counts.tolist() == torch.bincount(q.nearest(points), minlength=4).tolist()
    assert int(counts.min()) >= 50 and int(counts.sum()) == 1000
    assert (_numpy_counts(q, points) >= 50).all()
    assert (q.code_bias >= 0).all() and float(q.code_bias[0]) == 0.0  # the over-full code is never pushed
    # the contract holds with offsets: ids_to_vectors(forward(z)[1]) == forward(z)[0]
    quantized, code_ids, _ = q(points)
    assert torch.equal(q.ids_to_vectors(code_ids), quantized)
    # deterministic: a second fit from scratch gives the same offsets bit for bit
    bias = q.code_bias.clone()
    q.fit_balance(points, 0.05)
    assert torch.equal(q.code_bias, bias)


def test_fit_balance_leaves_a_balanced_codebook_alone_and_zero_disables_it():
    points = _skewed()
    q = _skewed_quantizer(points)
    plain = q.nearest(points).clone()
    dist = ((points[:, None, :] - q.codebook.detach()[None]) ** 2).sum(-1)
    assert torch.equal(plain, dist.argmin(-1))
    q.fit_balance(points, 0.2)
    assert not torch.equal(q.nearest(points), plain)
    q.fit_balance(points, 0.0)  # 0: offsets back to zero, plain nearest code
    assert not q.code_bias.any() and torch.equal(q.nearest(points), plain)
    q2 = ProfileQuantizer(8, 2, init="random").eval()
    q2.init_from(points)  # k-means halves: both codes far above 5%
    q2.fit_balance(points, 0.05)
    assert not q2.code_bias.any()


def test_code_bias_survives_state_dict_and_old_state_dicts_load_as_zero():
    points = _skewed()
    q = _skewed_quantizer(points)
    q.fit_balance(points, 0.05)
    assert q.code_bias.any()
    state = q.state_dict()
    assert "code_bias" in state
    fresh = ProfileQuantizer(8, 4, init="random").eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.code_bias, q.code_bias) and torch.equal(fresh.nearest(points), q.nearest(points))
    old = {k: v for k, v in state.items() if k != "code_bias"}  # saved before code_bias existed
    fresh.load_state_dict(old)
    assert not fresh.code_bias.any()


def test_multi_profile_fit_balance():
    points = _skewed()
    mq = MultiProfileQuantizer(["hobby", "background"], [4, 3], dim=8, init="random").eval()
    embeds = torch.stack([points, points.flip(0)], dim=1)  # (N, 2, 8)
    with torch.no_grad():
        mq.quantizers[0].codebook.copy_(_skewed_quantizer(points).codebook)
        mq.quantizers[1].codebook.copy_(_skewed_quantizer(points).codebook[:3])
    counts = mq.fit_balance(embeds, 0.05)
    assert [int(c.min()) >= 50 for c in counts] == [True, True]
    codes = mq.nearest(embeds)
    assert all(int(torch.bincount(codes[:, p], minlength=k).min()) >= 50 for p, k in enumerate([4, 3]))
    assert torch.equal(mq.ids_to_vectors(codes), mq(embeds)[0])


@pytest.mark.parametrize("share", [-0.01, 0.5, 1.0, float("nan"), "0.1", True])
def test_bad_balance_min_share_is_a_config_error(share):
    with pytest.raises(ConfigError, match="balance_min_share"):
        QuantizationConfig(balance_min_share=share)


def test_balance_min_share_is_checked_against_the_codebook_size():
    QuantizationConfig(balance_min_share=0.24).check_codebook_sizes([4, 3])
    with pytest.raises(ConfigError, match=r"balance_min_share.*1/4"):
        QuantizationConfig(balance_min_share=0.25).check_codebook_sizes([4, 3])
    with pytest.raises(CodebookError, match="min_share"):
        ProfileQuantizer(8, 4).fit_balance(_skewed(), 0.25)


def test_a_sweep_keeps_a_feasible_floor_and_scales_an_infeasible_one():
    config = QuantizationConfig(balance_min_share=0.05)
    assert config.for_codebook_sizes([4, 3], [16, 9]) is config  # 0.05 < 1/16: results made with it stand
    wide = config.for_codebook_sizes([4, 3], [81, 3])
    assert wide.balance_min_share == pytest.approx(0.05 * 4 / 81)  # the main hobby's 20% of uniform
    wide.check_codebook_sizes([81, 3])
    both = config.for_codebook_sizes([4, 3], [27, 27])
    assert both.balance_min_share == pytest.approx(0.05 * 3 / 27)  # the tighter profile decides
    assert (
        QuantizationConfig(balance_min_share=0.0).for_codebook_sizes([4, 3], [81, 81]).balance_min_share == 0
    )


def test_kth_smallest_bisects_to_the_sorted_value():
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.rand(500, generator=gen) * 40.0, torch.zeros(7), torch.full((5,), 2.5)])
    values = values[torch.randperm(len(values), generator=gen)]
    expected = torch.sort(values).values
    for k in (1, 7, 8, 100, 255, len(values)):
        assert kth_smallest(values, k, local_rows) == float(expected[k - 1])
    assert kth_smallest(torch.tensor([-0.0, 3.0]), 1, local_rows) == 0.0


def _reference_sinkhorn(cost: torch.Tensor, floor: int, iters_per_eps: int = 60) -> torch.Tensor:
    """The offsets' iterations written plainly with torch.logsumexp over whole rows and columns."""
    c = cost - cost.min(-1, keepdim=True).values
    scale = float(c.mean())
    c = c / scale
    g = torch.zeros(cost.shape[1], dtype=cost.dtype)
    for eps in (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001):
        for _ in range(iters_per_eps):
            f = -eps * torch.logsumexp((g - c) / eps, dim=1)
            column = torch.logsumexp((f[:, None] - c) / eps, dim=0)
            g_new = (eps * math.log(floor) - eps * column).clamp(min=0)
            done = bool((g_new - g).abs().max() < 1e-9)
            g = g_new
            if done:
                break
    return g * scale


def test_floor_sinkhorn_offsets_equal_the_plain_iterations(monkeypatch):
    points = _skewed()
    q = _skewed_quantizer(points)
    cost = q._scores(points).double()
    got = floor_sinkhorn_offsets(cost, 50)
    assert got.any()
    torch.testing.assert_close(got, _reference_sinkhorn(cost, 50), rtol=1e-9, atol=1e-12)
    x = torch.randn(30, 4, dtype=torch.float64)
    streamed = column_logsumexp([x[:7], x[7:7], 3.0 + x[7:20], x[20:]], x[0], local_rows)
    torch.testing.assert_close(streamed, torch.logsumexp(torch.cat([x[:7], 3.0 + x[7:20], x[20:]]), 0))
    # rows in several blocks (one short): the same offsets as in one block
    monkeypatch.setattr(quantizer, "SINKHORN_BLOCK", 300)
    torch.testing.assert_close(floor_sinkhorn_offsets(cost, 50), got, rtol=1e-9, atol=1e-12)
