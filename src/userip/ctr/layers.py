"""Shared CTR building blocks, composed by role: embedding -> interaction -> head.

Notation in shape comments: B batch, F fields, D embedding dim, P = F * (F - 1) / 2 field pairs (i < j, in
``torch.triu_indices`` order), H attention heads. Every layer is vectorised over the batch; the only Python
loops run over a handful of stacked layers.

Embedding tables (``FieldEmbedding``, ``FieldAwareEmbedding``, ``LinearTerm``, all ``OffsetEmbedding``s) are
single ``nn.Embedding``s over the concatenated vocabularies with per-field offsets: one lookup per batch
instead of one per field. Models list them in ``embedding_parameters()`` (e.g. for L2 regularisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import nn

# Small random init (DeepCTR uses 1e-4): product interactions start near zero but not exactly symmetric.
EMBEDDING_INIT_STD = 1e-2


# ----------------------------------------------------------------------------------------------------------
# argument validation (shared by layers and models: every constructor fails early with a named argument)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_units(name: str, units: object) -> tuple[int, ...]:
    """Hidden-layer sizes: a (possibly empty) sequence of positive ints; YAML lists are accepted."""
    if isinstance(units, str | bytes) or not isinstance(units, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {units!r}")
    return tuple(check_int(f"{name}[{i}]", u) for i, u in enumerate(units))


def check_dropout(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    return float(p)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def pair_indices(num_fields: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices (P,) of all field pairs i < j."""
    rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
    return rows, cols


def xavier_normal_stack_(param: torch.Tensor) -> torch.Tensor:
    """Xavier-normal init of a stack of (..., fan_out, fan_in) matrices, each initialised on its own."""
    std = (2.0 / (param.shape[-1] + param.shape[-2])) ** 0.5
    with torch.no_grad():
        return param.normal_(0.0, std)


def _offsets(vocab_sizes: Sequence[int]) -> torch.Tensor:
    # Start of each field's block in the concatenated table: (F,)
    sizes = torch.tensor([check_int("vocab_size", v, 2) for v in vocab_sizes], dtype=torch.long)
    return torch.cumsum(sizes, 0) - sizes


# ----------------------------------------------------------------------------------------------------------
# embeddings


class OffsetEmbedding(nn.Module):
    """One table over all fields' vocabularies, concatenated: row ``offsets[f] + x_ids[:, f]`` is field f.

    Base of the embedding layers below; ``lookup`` gives (B, F, width).
    """

    def __init__(self, vocab_sizes: Sequence[int], width: int, init_std: float) -> None:
        super().__init__()
        offsets = _offsets(vocab_sizes)
        self.num_fields = len(offsets)
        self.weight_table = nn.Embedding(int(sum(vocab_sizes)), width)
        if init_std > 0:
            nn.init.normal_(self.weight_table.weight, std=init_std)
        else:
            nn.init.zeros_(self.weight_table.weight)
        # Derived from the feature map, so not part of the state dict.
        self.register_buffer("offsets", offsets, persistent=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.weight_table.weight

    def lookup(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_table(x_ids + self.offsets)  # (B, F, width)


class FieldEmbedding(OffsetEmbedding):
    """One D-dim vector per categorical value: x_ids (B, F) -> (B, F, D)."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        super().__init__(vocab_sizes, check_int("embedding_dim", dim), EMBEDDING_INIT_STD)
        self.dim = dim

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(x_ids)  # (B, F, D)


class FieldAwareEmbedding(OffsetEmbedding):
    """FFM-style: every value has one D-dim vector per field: x_ids (B, F) -> (B, F, F, D).

    ``out[:, i, j]`` is field i's vector used when meeting field j. The diagonal ``out[:, i, i]`` is unused by
    FFM; ONN uses it as the value's own ("copy") embedding.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        # One row of F * D per value keeps the single lookup per batch.
        super().__init__(vocab_sizes, len(vocab_sizes) * check_int("embedding_dim", dim), EMBEDDING_INIT_STD)
        self.dim = dim

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        e = self.lookup(x_ids)  # (B, F, F * D)
        return e.view(*x_ids.shape, self.num_fields, self.dim)  # (B, F, F, D)


class LinearTerm(OffsetEmbedding):
    """First-order term w0 + sum_i w[x_i]: x_ids (B, F) -> (B,)."""

    def __init__(self, vocab_sizes: Sequence[int]) -> None:
        super().__init__(vocab_sizes, 1, init_std=0.0)  # zeros: a linear model has no symmetry to break
        self.bias = nn.Parameter(torch.zeros(()))

    def field_weights(self, x_ids: torch.Tensor) -> torch.Tensor:
        """Per-field first-order weights w[x_i]: (B, F) (DIFM reweights them before summing)."""
        return self.lookup(x_ids).squeeze(-1)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.field_weights(x_ids).sum(dim=1) + self.bias  # (B,)


# ----------------------------------------------------------------------------------------------------------
# heads


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> dropout per hidden layer, then an optional linear output layer.

    (B, in_dim) -> (B, output_dim or hidden_units[-1] or in_dim). ``.output_dim`` gives the output width.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        dropout: float = 0.0,
        batch_norm: bool = False,
        activation: str = "relu",
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        units = check_units("hidden_units", hidden_units)
        dropout = check_dropout("dropout", dropout)
        act = _ACTIVATIONS[check_choice("activation", activation, list(_ACTIVATIONS))]
        layers: list[nn.Module] = []
        width = in_dim
        for u in units:
            layers.append(nn.Linear(width, u))
            if batch_norm:
                layers.append(nn.BatchNorm1d(u))
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = u
        if output_dim is not None:
            layers.append(nn.Linear(width, check_int("output_dim", output_dim)))
            width = output_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------
# explicit feature crossing (DCN, DCNv2)


class CrossNet(nn.Module):
    """DCN cross network: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l, (B, d) -> (B, d).

    Each layer adds one degree of polynomial interaction with only 2d parameters (Wang et al., 2017, eq. 3).
    """

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        check_int("num_layers", num_layers)
        self.weights = nn.Parameter(torch.empty(num_layers, in_dim))
        self.biases = nn.Parameter(torch.zeros(num_layers, in_dim))
        xavier_normal_stack_(self.weights.unsqueeze(-1))  # each w_l like a (d, 1) kernel

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w).unsqueeze(-1) + b + x  # (B, d)
        return x


class CrossNetV2(nn.Module):
    """DCNv2 cross network with matrix weights, (B, d) -> (B, d).

    ``low_rank=None``: full-rank layer x_{l+1} = x0 * (W_l x_l + b_l) + x_l (Wang et al., 2021, eq. 1).
    ``low_rank=r``: DCN-Mix (eq. 4): a softmax-gated mixture of ``num_experts`` low-rank experts
    E_i(x_l) = x0 * (U_i tanh(C_i tanh(V_i^T x_l)) + b_l), x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l.
    """

    def __init__(
        self, in_dim: int, num_layers: int, low_rank: int | None = None, num_experts: int = 1
    ) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        check_int("num_layers", num_layers)
        check_int("num_experts", num_experts)
        if low_rank is not None:
            check_int("low_rank", low_rank)
        elif num_experts != 1:
            raise ValueError(f"num_experts={num_experts} needs low_rank (experts are low-rank); set low_rank")
        self.low_rank = low_rank
        self.biases = nn.Parameter(torch.zeros(num_layers, in_dim))
        if low_rank is None:
            self.kernels = nn.Parameter(torch.empty(num_layers, in_dim, in_dim))
            xavier_normal_stack_(self.kernels)
        else:
            L, E, r = num_layers, num_experts, low_rank
            self.U = nn.Parameter(torch.empty(L, E, in_dim, r))
            self.V = nn.Parameter(torch.empty(L, E, in_dim, r))
            self.C = nn.Parameter(torch.empty(L, E, r, r))
            for p in (self.U, self.V, self.C):
                xavier_normal_stack_(p)
            self.gates = nn.ModuleList(nn.Linear(in_dim, E, bias=False) for _ in range(L))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        if self.low_rank is None:
            for W, b in zip(self.kernels, self.biases):
                x = x0 * (x @ W.T + b) + x  # (B, d)
            return x
        for U, V, C, b, gate in zip(self.U, self.V, self.C, self.biases, self.gates):
            v = torch.tanh(torch.einsum("bd,edr->ber", x, V))  # (B, E, r): project to the low-rank space
            v = torch.tanh(torch.einsum("ber,esr->bes", v, C))  # (B, E, r)
            experts = x0.unsqueeze(1) * (torch.einsum("bes,eds->bed", v, U) + b)  # (B, E, d)
            g = torch.softmax(gate(x), dim=-1)  # (B, E)
            x = torch.einsum("be,bed->bd", g, experts) + x
        return x


# ----------------------------------------------------------------------------------------------------------
# pairwise interactions on embeddings (B, F, D)


class FMInteraction(nn.Module):
    """FM second-order term sum_{i<j} <v_i, v_j> via 0.5 * ((sum v)^2 - sum v^2) in O(F D).

    (B, F, D) -> (B,) when ``reduce_sum`` else the per-dimension terms (B, D) (DeepFM/NFM-style).
    """

    def __init__(self, reduce_sum: bool = True) -> None:
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)  # (B, D)
        sum_of_square = emb.pow(2).sum(dim=1)  # (B, D)
        out = 0.5 * (square_of_sum - sum_of_square)  # (B, D)
        return out.sum(dim=1) if self.reduce_sum else out


class _Pairwise(nn.Module):
    """Holds the (P,) pair index buffers shared by every pairwise layer."""

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        if check_int("num_fields", num_fields) < 2:
            raise ValueError(f"pairwise interactions need at least 2 fields, got {num_fields}")
        rows, cols = pair_indices(num_fields)
        self.num_fields = num_fields
        self.num_pairs = len(rows)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)


class InnerProduct(_Pairwise):
    """All pairwise inner products <v_i, v_j>: (B, F, D) -> (B, P). IPNN's product signals."""

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb[:, self.rows] * emb[:, self.cols]).sum(dim=-1)


class OuterProduct(nn.Module):
    """OPNN product signals with the superposition trick of Qu et al. (2016): p = f_S f_S^T, f_S = sum_i v_i.

    (B, F, D) -> (B, D * D). Summing outer products over all pairs first costs O(D^2) instead of O(F^2 D^2).
    """

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        f_sum = emb.sum(dim=1)  # (B, D)
        return torch.einsum("bi,bj->bij", f_sum, f_sum).flatten(1)  # (B, D * D)


class FieldAwareInteraction(_Pairwise):
    """FFM pair terms <v_{i, f_j}, v_{j, f_i}>: field-aware embeddings (B, F, F, D) -> (B, P)."""

    def forward(self, ffm_emb: torch.Tensor) -> torch.Tensor:
        left = ffm_emb[:, self.rows, self.cols]  # (B, P, D): field i's vector for field j
        right = ffm_emb[:, self.cols, self.rows]  # (B, P, D): field j's vector for field i
        return (left * right).sum(dim=-1)


class AttentionalPooling(_Pairwise):
    """AFM interaction: p^T sum_{i<j} a_ij (v_i * v_j), a = softmax_ij(h^T ReLU(W (v_i * v_j) + b)).

    (B, F, D) -> (B,). Dropout acts on the pooled interaction vector (as in the AFM paper's
    pair-wise interaction layer).
    """

    def __init__(self, num_fields: int, dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__(num_fields)
        self.attention = nn.Sequential(
            nn.Linear(check_int("embedding_dim", dim), check_int("attention_dim", attention_dim)),
            nn.ReLU(),
            nn.Linear(attention_dim, 1, bias=False),
        )
        self.projection = nn.Linear(dim, 1, bias=False)  # p
        self.dropout = nn.Dropout(check_dropout("dropout", dropout))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        pairs = emb[:, self.rows] * emb[:, self.cols]  # (B, P, D)
        scores = torch.softmax(self.attention(pairs), dim=1)  # (B, P, 1)
        pooled = self.dropout((scores * pairs).sum(dim=1))  # (B, D)
        return self.projection(pooled).squeeze(-1)  # (B,)

    def attention_weights(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, P) attention over field pairs, for inspection."""
        return torch.softmax(self.attention(emb[:, self.rows] * emb[:, self.cols]), dim=1).squeeze(-1)


BILINEAR_TYPES = ("all", "each", "interaction")


class BilinearInteraction(_Pairwise):
    """FiBiNet bilinear interaction p_ij = (v_i W) * v_j: (B, F, D) -> (B, P, D).

    ``bilinear_type``: "all" shares one W (D, D) across fields, "each" has one W_i per field,
    "interaction" one W_ij per field pair (Huang et al., 2019, Sec. 3.4).
    """

    def __init__(self, num_fields: int, dim: int, bilinear_type: str = "interaction") -> None:
        super().__init__(num_fields)
        self.bilinear_type = check_choice("bilinear_type", bilinear_type, BILINEAR_TYPES)
        n = {"all": 1, "each": num_fields, "interaction": self.num_pairs}[bilinear_type]
        self.kernels = nn.Parameter(torch.empty(n, check_int("embedding_dim", dim), dim))
        xavier_normal_stack_(self.kernels)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if self.bilinear_type == "all":
            left = (emb @ self.kernels[0])[:, self.rows]  # (B, P, D)
        elif self.bilinear_type == "each":
            left = torch.einsum("bfd,fde->bfe", emb, self.kernels)[:, self.rows]  # (B, P, D)
        else:
            left = torch.einsum("bpd,pde->bpe", emb[:, self.rows], self.kernels)  # (B, P, D)
        return left * emb[:, self.cols]


class SENETLayer(nn.Module):
    """FiBiNet squeeze-excitation: (B, F, D) -> (B, F, D), each field rescaled by a learned weight.

    Squeeze: mean over D -> (B, F); excitation: ReLU(W2 ReLU(W1 z)) with a bottleneck of F // reduction_ratio.
    """

    def __init__(self, num_fields: int, reduction_ratio: int = 3) -> None:
        super().__init__()
        hidden = max(1, check_int("num_fields", num_fields) // check_int("reduction_ratio", reduction_ratio))
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, num_fields, bias=False),
            nn.ReLU(),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        weights = self.excitation(emb.mean(dim=-1))  # (B, F)
        return emb * weights.unsqueeze(-1)


class InteractingLayer(nn.Module):
    """AutoInt multi-head self-attention over fields: (B, F, in_dim) -> (B, F, num_heads * head_dim).

    Follows Song et al. (2019), eq. 5-8: per-head attention over fields with un-scaled dot products, heads
    concatenated, plus a projected residual, then ReLU.
    """

    def __init__(self, in_dim: int, head_dim: int, num_heads: int, residual: bool = True) -> None:
        super().__init__()
        self.head_dim = check_int("attention_dim", head_dim)
        self.num_heads = check_int("num_heads", num_heads)
        out_dim = head_dim * num_heads
        self.query = nn.Linear(check_int("in_dim", in_dim), out_dim, bias=False)
        self.key = nn.Linear(in_dim, out_dim, bias=False)
        self.value = nn.Linear(in_dim, out_dim, bias=False)
        self.residual = nn.Linear(in_dim, out_dim, bias=False) if residual else None
        self.output_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, F, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, F, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, F, hd)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, H, F, F)
        out = (att @ v).transpose(1, 2).reshape(B, F, -1)  # (B, F, H * hd)
        if self.residual is not None:
            out = out + self.residual(x)
        return nnf.relu(out)


class LogTransformLayer(nn.Module):
    """AFN logarithmic transformation layer: (B, F, D) -> (B, num_neurons * D).

    Neuron l computes exp(sum_i w_li ln|v_i|) = prod_i |v_i|^{w_li} element-wise, i.e. a cross feature whose
    field orders w_li are learned (Cheng et al., 2020, eq. 4). Batch norm after the log and after the exp
    keeps the exponent well scaled, as in the paper.
    """

    def __init__(self, num_fields: int, dim: int, num_neurons: int, eps: float = 1e-7) -> None:
        super().__init__()
        check_int("num_fields", num_fields)
        check_int("embedding_dim", dim)
        check_int("ltl_hidden_size", num_neurons)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_fields, num_neurons))
        self.bias = nn.Parameter(torch.zeros(num_neurons))
        nn.init.normal_(self.weight, std=0.1)  # small orders: neurons start close to low-order products
        self.bn_log = nn.BatchNorm1d(dim)
        self.bn_exp = nn.BatchNorm1d(dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        # log needs positive inputs; |v| clamped away from 0 (the paper's sign-free formulation).
        log_emb = emb.abs().clamp_min(self.eps).log().transpose(1, 2)  # (B, D, F)
        log_emb = self.bn_log(log_emb)
        crosses = torch.exp(log_emb @ self.weight + self.bias)  # (B, D, L)
        return self.bn_exp(crosses).flatten(1)  # (B, D * L)
