"""Shared CTR layers against independent (loop-based) computations of their formulas."""

from __future__ import annotations

import itertools

import pytest
import torch

from userip.ctr import layers as L

pytestmark = pytest.mark.usefixtures("single_thread")

B, F, D = 5, 4, 3


@pytest.fixture
def emb() -> torch.Tensor:
    return torch.randn(B, F, D, generator=torch.Generator().manual_seed(0))


def pairs(num_fields: int = F) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(num_fields), 2))


def test_pair_indices_order_matches_combinations():
    rows, cols = L.pair_indices(F)
    assert list(zip(rows.tolist(), cols.tolist())) == pairs()


def test_field_embedding_uses_per_field_offsets():
    layer = L.FieldEmbedding([3, 5, 2], dim=D)
    x = torch.tensor([[0, 4, 1], [2, 0, 0]])
    out = layer(x)
    assert out.shape == (2, 3, D)
    w = layer.weight
    assert torch.equal(out[0, 1], w[3 + 4])
    assert torch.equal(out[1, 2], w[3 + 5 + 0])
    # The same index in two fields is two different values.
    assert not torch.equal(out[1, 1], out[1, 2])


def test_field_aware_embedding_slots():
    layer = L.FieldAwareEmbedding([3, 5, 2], dim=D)
    x = torch.tensor([[1, 4, 1]])
    out = layer(x)  # (1, 3, 3, D)
    assert out.shape == (1, 3, 3, D)
    row = layer.weight[3 + 4]  # field 1's value 4: F * D numbers
    for j in range(3):
        assert torch.equal(out[0, 1, j], row[j * D : (j + 1) * D])


def test_linear_term_is_bias_plus_weights():
    layer = L.LinearTerm([3, 5])
    with torch.no_grad():
        layer.weight.copy_(torch.arange(8.0).unsqueeze(-1))
        layer.bias.fill_(0.5)
    x = torch.tensor([[2, 1], [0, 4]])
    assert torch.allclose(layer(x), torch.tensor([0.5 + 2 + 4, 0.5 + 0 + 7]))
    assert torch.allclose(layer.field_weights(x), torch.tensor([[2.0, 4.0], [0.0, 7.0]]))


def test_fm_sum_square_trick_matches_pairwise_sum(emb):
    expected = sum((emb[:, i] * emb[:, j]).sum(-1) for i, j in pairs())
    assert torch.allclose(L.FMInteraction()(emb), expected, atol=1e-5)
    assert torch.allclose(L.FMInteraction(reduce_sum=False)(emb).sum(-1), expected, atol=1e-5)


def test_inner_product(emb):
    expected = torch.stack([(emb[:, i] * emb[:, j]).sum(-1) for i, j in pairs()], dim=1)
    assert torch.allclose(L.InnerProduct(F)(emb), expected, atol=1e-6)


def test_outer_product_superposition(emb):
    expected = sum(torch.einsum("bi,bj->bij", emb[:, i], emb[:, j]) for i in range(F) for j in range(F))
    assert torch.allclose(L.OuterProduct()(emb), expected.flatten(1), atol=1e-5)


def test_field_aware_interaction():
    ffm = torch.randn(B, F, F, D)
    expected = torch.stack([(ffm[:, i, j] * ffm[:, j, i]).sum(-1) for i, j in pairs()], dim=1)
    assert torch.allclose(L.FieldAwareInteraction(F)(ffm), expected, atol=1e-6)


def test_cross_net_layer_formula():
    x0 = torch.randn(B, 6)
    net = L.CrossNet(6, num_layers=2)
    with torch.no_grad():
        net.biases.normal_()
    x1 = x0 * (x0 @ net.weights[0]).unsqueeze(-1) + net.biases[0] + x0
    x2 = x0 * (x1 @ net.weights[1]).unsqueeze(-1) + net.biases[1] + x1
    assert torch.allclose(net(x0), x2, atol=1e-5)


def test_cross_net_v2_full_rank_formula():
    x0 = torch.randn(B, 6)
    net = L.CrossNetV2(6, num_layers=1)
    with torch.no_grad():
        net.biases.normal_()
    W, b = net.kernels[0], net.biases[0]
    expected = x0 * (torch.stack([W @ row for row in x0]) + b) + x0
    assert torch.allclose(net(x0), expected, atol=1e-5)


def test_cross_net_v2_mixture_of_experts_formula():
    x0 = torch.randn(B, 6)
    net = L.CrossNetV2(6, num_layers=1, low_rank=2, num_experts=3)
    U, V, C, b = net.U[0], net.V[0], net.C[0], net.biases[0]
    gates = torch.softmax(net.gates[0](x0), dim=-1)  # (B, E)
    expected = x0.clone()
    for e in range(3):
        low = torch.tanh(torch.tanh(x0 @ V[e]) @ C[e].T)  # (B, r)
        expert = x0 * (low @ U[e].T + b)
        expected = expected + gates[:, e : e + 1] * expert
    assert torch.allclose(net(x0), expected, atol=1e-5)


def test_attentional_pooling_formula(emb):
    layer = L.AttentionalPooling(F, D, attention_dim=4)
    inter = torch.stack([emb[:, i] * emb[:, j] for i, j in pairs()], dim=1)  # (B, P, D)
    scores = layer.attention(inter).squeeze(-1)  # h^T ReLU(W v + b)
    a = torch.softmax(scores, dim=1)
    expected = layer.projection((a.unsqueeze(-1) * inter).sum(1)).squeeze(-1)
    assert torch.allclose(layer(emb), expected, atol=1e-6)
    assert torch.allclose(layer.attention_weights(emb).sum(1), torch.ones(B))


@pytest.mark.parametrize("bilinear_type", L.BILINEAR_TYPES)
def test_bilinear_interaction(emb, bilinear_type):
    layer = L.BilinearInteraction(F, D, bilinear_type)
    K = layer.kernels
    expected = []
    for p, (i, j) in enumerate(pairs()):
        W = K[{"all": 0, "each": i, "interaction": p}[bilinear_type]]
        expected.append((emb[:, i] @ W) * emb[:, j])
    assert torch.allclose(layer(emb), torch.stack(expected, dim=1), atol=1e-6)


def test_senet_reweights_fields(emb):
    layer = L.SENETLayer(F, reduction_ratio=2)
    w1, w2 = layer.excitation[0].weight, layer.excitation[2].weight
    a = torch.relu(torch.relu(emb.mean(-1) @ w1.T) @ w2.T)  # (B, F)
    assert torch.allclose(layer(emb), emb * a.unsqueeze(-1), atol=1e-6)


def test_interacting_layer_per_head(emb):
    layer = L.InteractingLayer(D, head_dim=2, num_heads=2, residual=True)
    q, k, v = layer.query(emb), layer.key(emb), layer.value(emb)  # (B, F, 4)
    heads = []
    for h in range(2):
        s = slice(2 * h, 2 * h + 2)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2), dim=-1)  # (B, F, F)
        heads.append(att @ v[..., s])
    expected = torch.relu(torch.cat(heads, dim=-1) + layer.residual(emb))
    assert layer(emb).shape == (B, F, 4)
    assert torch.allclose(layer(emb), expected, atol=1e-6)


def test_log_transform_layer_is_product_of_powers(emb):
    layer = L.LogTransformLayer(F, D, num_neurons=5).eval()  # fresh BN in eval mode: x / sqrt(1 + eps)
    s = (1 + layer.bn_log.eps) ** -0.5
    log_emb = emb.abs().log() * s  # (B, F, D)
    crosses = torch.exp(torch.einsum("bfd,fl->bdl", log_emb, layer.weight) + layer.bias) * s  # (B, D, L)
    assert torch.allclose(layer(emb), crosses.flatten(1), rtol=1e-4)


def test_mlp_shapes_and_output_dim():
    mlp = L.MLP(6, [4, 3], dropout=0.1, batch_norm=True)
    assert mlp(torch.randn(B, 6)).shape == (B, 3) and mlp.output_dim == 3
    head = L.MLP(6, [], output_dim=1)
    assert head(torch.randn(B, 6)).shape == (B, 1) and head.output_dim == 1


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: L.MLP(6, "16"), "hidden_units"),
        (lambda: L.MLP(6, [4, 0]), r"hidden_units\[1\]"),
        (lambda: L.MLP(6, [4], dropout=1.0), "dropout"),
        (lambda: L.MLP(6, [4], activation="gelu"), "activation"),
        (lambda: L.CrossNetV2(6, 2, num_experts=3), "low_rank"),
        (lambda: L.BilinearInteraction(F, D, "pair"), "bilinear_type"),
        (lambda: L.InnerProduct(1), "at least 2 fields"),
        (lambda: L.FieldEmbedding([3, 1], 4), "vocab_size"),
        (lambda: L.FieldEmbedding([3, 3], 0), "embedding_dim"),
    ],
)
def test_invalid_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
