"""ProfileQuantizer / MultiProfileQuantizer: round trip, straight-through gradient, eq. 5, no collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from tests.codebook.conftest import planted_clusters

from userip.codebook import CodebookError, MultiProfileQuantizer, ProfileQuantizer
from userip.codebook.kmeans import kmeans


def test_round_trip_in_eval_mode():
    q = ProfileQuantizer(5, 4, init="random").eval()
    z = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    quantized, code_ids, _ = q(z)
    assert code_ids.shape == (16,) and code_ids.dtype == torch.int64
    assert torch.equal(q.ids_to_vectors(code_ids), quantized)
    # ids are the nearest codes (eq. 6), computed independently
    dist = ((z[:, None, :] - q.codebook.detach()[None]) ** 2).sum(-1)
    assert torch.equal(code_ids, dist.argmin(-1))


def test_straight_through_gradient_equals_gradient_at_quantized_vector():
    q = ProfileQuantizer(4, 3, init="random").train()
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))

    def f(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x) * weights).sum() + (x**2).sum()

    quantized, code_ids, _ = q(z)
    f(quantized).backward()
    at_code = q.codebook.detach()[code_ids].clone().requires_grad_(True)
    f(at_code).backward()
    assert torch.allclose(z.grad, at_code.grad)
    assert q.codebook.grad is None  # the straight-through path gives the codebook nothing


def test_losses_and_their_gradients_match_eq5_by_hand():
    beta = 0.25
    q = ProfileQuantizer(3, 2, beta=beta, init="random", dead_code_threshold=0)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    z_np = np.array([[0.1, -0.2, 0.3], [0.9, 1.2, 0.8], [0.4, 0.4, 0.4], [2.0, 0.0, 1.0]], dtype=np.float32)
    z = torch.tensor(z_np, requires_grad=True)
    _, code_ids, loss = q(z)
    e = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    nearest = ((z_np[:, None] - e[None]) ** 2).sum(-1).argmin(-1)
    chosen = e[nearest]
    sq = ((z_np - chosen) ** 2).sum(-1)  # (B,) squared distances
    assert code_ids.tolist() == nearest.tolist()
    assert loss.item() == pytest.approx((1 + beta) * sq.mean(), rel=1e-6)
    loss.backward()
    # d/dz of beta * mean ||z - sg[e]||^2 and d/de of mean ||sg[z] - e||^2
    assert np.allclose(z.grad.numpy(), 2 * beta * (z_np - chosen) / len(z_np), atol=1e-6)
    expected_cb_grad = np.zeros_like(e)
    for b, k in enumerate(nearest):
        expected_cb_grad[k] += 2 * (e[k] - z_np[b]) / len(z_np)
    assert np.allclose(q.codebook.grad.numpy(), expected_cb_grad, atol=1e-6)


def _train(q: ProfileQuantizer, points: torch.Tensor, steps: int, batch: int = 30) -> None:
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(points), generator=gen)[:batch]
        _, _, loss = q(points[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _collapsed_start(q: ProfileQuantizer) -> None:
    # Code 0 sits at the data's mean; codes 1 and 2 far away: plain VQ never uses them.
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0] * 3 + [0.0] * 3, [-50.0] * 6, [60.0] * 6]))


def test_without_revival_a_bad_start_collapses_and_revival_fixes_it():
    points, labels = planted_clusters()
    plain = ProfileQuantizer(6, 3, init="random", dead_code_threshold=0).train()
    _collapsed_start(plain)
    _train(plain, points, steps=30)
    assert plain.nearest(points).unique().numel() == 1  # the failure mode revival exists for

    revived = ProfileQuantizer(6, 3, init="random", dead_code_threshold=3).train()
    _collapsed_start(revived)
    _train(revived, points, steps=30)
    codes = revived.eval().nearest(points)
    assert codes.unique().numel() == 3
    assert normalized_mutual_info_score(labels.numpy(), codes.numpy()) == pytest.approx(1.0)


def test_lazy_kmeans_init_uses_all_three_codes():
    points, labels = planted_clusters()
    q = ProfileQuantizer(6, 3, init="kmeans", kmeans_init_samples=40).train()
    z = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))]
    quantized, _, loss = q(z[:20])  # buffer holds 20 < 40: identity, no loss
    assert not bool(q.initialized) and torch.equal(quantized, z[:20]) and loss.item() == 0.0
    q(z[20:60])  # 60 >= 40: initialised from the buffer
    assert bool(q.initialized)
    codes = q.eval().nearest(points)
    assert normalized_mutual_info_score(labels.numpy(), codes.numpy()) == pytest.approx(1.0)


def test_eval_mode_never_changes_state():
    points, _ = planted_clusters()
    q = ProfileQuantizer(6, 3, init="kmeans", kmeans_init_samples=10).eval()
    before = q.codebook.detach().clone()
    q(points)
    assert not bool(q.initialized) and torch.equal(before, q.codebook.detach())


def test_kmeans_matches_sklearn_partition():
    points, labels = planted_clusters(k=3, seed=4)
    _, assign = kmeans(points, 3, generator=torch.Generator().manual_seed(0))
    assert normalized_mutual_info_score(labels.numpy(), assign.numpy()) == pytest.approx(1.0)


@pytest.mark.parametrize("size", [0, 1, True, 2.5])
def test_codebook_size_below_two_is_refused(size):
    with pytest.raises(CodebookError, match="at least 2 codes"):
        ProfileQuantizer(4, size)
    with pytest.raises(CodebookError, match="at least 2 codes"):
        MultiProfileQuantizer(["hobby"], [size], 4)


def test_multi_profile_shapes_and_inverse():
    mq = MultiProfileQuantizer(["hobby", "background"], [4, 3], dim=5, init="random").eval()
    embeds = torch.randn(7, 2, 5, generator=torch.Generator().manual_seed(0))
    quantized, code_ids, loss = mq(embeds)
    assert quantized.shape == (7, 2, 5) and code_ids.shape == (7, 2) and loss.dim() == 0
    assert int(code_ids[:, 1].max()) < 3
    assert torch.equal(mq.ids_to_vectors(code_ids), quantized)
    assert torch.equal(mq.nearest(embeds), code_ids)
    assert mq.codebook("background").shape == (3, 5)
    with pytest.raises(CodebookError, match="expected profile_embeds"):
        mq(torch.randn(7, 3, 5))
    with pytest.raises(CodebookError, match=r"\[0, 3\)"):
        mq.quantizers[1].ids_to_vectors(torch.tensor([3]))


def test_revival_reads_the_counts_only_when_a_code_can_be_dead_and_revives_as_a_per_step_check():
    """The dead-code counts are read back only at steps where some code can have reached the threshold;
    the codebook stays bit-identical to checking every step (the former rule), revivals included."""
    from tests.profile.test_step_device import record_host_syncs

    points, _ = planted_clusters()
    lazy, eager = (ProfileQuantizer(6, 3, init="random", dead_code_threshold=3).train() for _ in range(2))
    for q in (lazy, eager):
        _collapsed_start(q)
    opts = [torch.optim.Adam(q.parameters(), lr=0.05) for q in (lazy, eager)]
    gen = torch.Generator().manual_seed(0)
    reads, revived = [], 0
    for _ in range(30):
        idx = torch.randperm(len(points), generator=gen)[:30]
        eager.steps_to_revival_check = 1  # the former rule: check at every step
        before = eager.codebook.detach().clone()
        for q, opt in zip((lazy, eager), opts):
            if q is lazy:
                with record_host_syncs() as rec:
                    _, _, loss = q(points[idx])
                reads.append(rec.events.count("Tensor.tolist"))
            else:
                _, _, loss = q(points[idx])
                revived += int(not torch.equal(before, q.codebook.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.equal(lazy.codebook, eager.codebook) and torch.equal(
            lazy.steps_unused, eager.steps_unused
        )
    assert revived >= 1  # codes 1 and 2 start dead (both revived at step 3): revival did happen
    assert lazy.eval().nearest(points).unique().numel() == 3
    # Once every code is in use, one read per threshold (3) steps instead of one per step.
    assert reads[-12:] in ([0, 0, 1] * 4, [0, 1, 0] * 4, [1, 0, 0] * 4), reads
    assert sum(reads) < 30, reads


def test_loaded_state_sets_the_host_side_initialised_flag():
    initialised = ProfileQuantizer(4, 2, init="kmeans", kmeans_init_samples=4).train()
    initialised(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    assert initialised.is_initialized and bool(initialised.initialized)
    fresh = ProfileQuantizer(4, 2, init="kmeans", kmeans_init_samples=4).train()
    assert not fresh.is_initialized
    fresh.load_state_dict(initialised.state_dict())
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    quantized, code_ids, _ = fresh(z)  # quantizes at once: no new k-means collection
    assert fresh.is_initialized and torch.equal(quantized, initialised.codebook.detach()[code_ids])
    assert fresh.init_samples.shape == (0, 4)
    fresh.load_state_dict(ProfileQuantizer(4, 2, init="kmeans", kmeans_init_samples=4).state_dict())
    assert not fresh.is_initialized
