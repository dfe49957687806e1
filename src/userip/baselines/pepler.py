"""PEPLER (Li et al., "Personalized Prompt Learning for Explainable Recommendation") as a CTR baseline: the
"recommendation as regularization" variant (PEPLER's ``reg.py``, ``module.py`` ``RecReg`` with the MLP head)
ported to the project's causal LM (SmolLM2 by default).

What it does (design note ``/work/shared/design/llm-baselines.md`` section 2, "minimal faithful version"):

* **Continuous prompt.** One user and one item embedding table, both as wide as the LM's hidden size and
  initialised U(-``init_range``, ``init_range``). A training row (u, i) feeds the LM the input embeddings
  ``[user_emb(u), item_emb(i), wte(text tokens)]`` and is trained with the LM loss on the **text tokens
  only** (labels -100 on the two prompt positions and on padding).
* **Rating head.** PEPLER's MLP on ``concat(user_emb(u), item_emb(i))``: 2H -> ``mlp_hidden_dim`` (400),
  ``mlp_layers`` (3) hidden layers with sigmoid activations, -> 1, weights U(-0.1, 0.1) and zero biases. Its
  output is a logit: CTR score = sigmoid(logit). The head never passes through the LM, so scoring (valid,
  test, serving) is a table lookup and a small MLP, without the LM.
* **Loss** = ``text_reg`` * LM loss + ``rating_reg`` * BCE-with-logits on the click label (PEPLER: MSE on
  the star rating, weight 0.01 by default and 1 in its README's MLP run; BCE gives a probability directly).
* ``train_lm`` False (default) freezes the LM, as PEPLER's stage 1 "tuning prompt only": its parameters get
  no gradient, but the text loss still trains the user/item vectors *through* the frozen LM. True fine-tunes
  everything (PEPLER's ``reg.py`` freezes nothing) on a private copy of the LM, so the caller's ``TextLM`` is
  never modified.

**Text target.** PEPLER's text is a review's template sentence, cut to ``--words`` 20 tokens. The project's
schema has one optional text column, ``interactions.review`` (``Dataset.has_reviews``). With
``text_source`` "auto", a dataset whose training rows hold reviews uses each training row's review (its first
``text_max_tokens`` tokens); a training row with an empty review, and every row of a dataset without reviews
(MovieLens-100K has none), gets its item's description ``"title: genre, genre"`` (the items table's
``title`` and ``categories``): no rating, no label, nothing about the user. PEPLER then reduces to an MLP
recommender with an item-text regulariser on its item vectors. Texts are built from the **train split only**
(never a valid or test row) and are a training target only, never an input. A sampled negative of implicit
data records nothing the user did, so it gets no text (its row trains the rating head only). Each text is
followed by the tokenizer's eos (PEPLER frames texts as ``<bos> text <eos>`` with three added tokens; adding
tokens would resize SmolLM2's *tied* embeddings, i.e. its output head, so existing tokens are reused and the
item prompt vector itself plays the role of ``<bos>``). Padding uses eos too, masked everywhere.

**Selection.** Early stopping and model selection on **validation AUC** of the rating head (PEPLER: the
validation text + rating loss, with an ``endure_count`` that never resets, so it stops after 5 bad epochs in
total; here ``patience`` counts consecutive bad epochs). The best epoch's trainable weights are kept in
memory; the test split is scored once, at the end.

**Speed.** Texts are tokenized once (per item, or per reviewed training row) into an eos-padded id table;
a batch indexes that table and is cut to its own longest text (the cut is computed for the whole epoch
on the host beforehand, so no step waits on the device); losses are summed on the device and read once per
epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from userip.baselines.llm_text import OfflineCost, TextLM, TextLMError, check_lm_placement, load_text_lm
from userip.ctr.data import CTRData, SplitTensors
from userip.ctr.encoding import FeatureEncoder, Vocabulary
from userip.ctr.features import ITEM_FIELD, USER_FIELD, FeatureMap, Field, FieldSource
from userip.ctr.recipe import CTRResult, score_test
from userip.ctr.trainer import DEFAULT_EVAL_BATCH, EpochRecord, FitResult, predict_probs, validate_model
from userip.data.schema import SPLITS, Dataset
from userip.evaluation.metrics import ctr_metrics
from userip.utils.artifacts import save_tensors
from userip.utils.config import ConfigError, check_fields, to_dict
from userip.utils.io import atomic_dir, atomic_write_json
from userip.utils.logging import get_logger
from userip.utils.seed import seed_everything

log = get_logger(__name__)

MODEL_NAME = "pepler"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
IGNORE_INDEX = -100  # label of a position without a text token (prompt vectors, padding)
PROMPT_LENGTH = 2  # [user vector, item vector]
ADAMW_EPS = 1e-6  # transformers.AdamW's default, which PEPLER's reg.py uses
TEXT_SOURCES = ("auto", "item", "review")


@dataclasses.dataclass
class PEPLERConfig:
    """PEPLER's settings (keys equal constructor arguments).

    Text: ``text_max_tokens`` tokens at most per text (PEPLER's ``--words`` 20), then eos; ``text_source``
    "auto" (reviews where the dataset's training rows have them, else item descriptions), "item" or
    "review" (fails on a dataset without reviews). Rating head: ``mlp_layers`` hidden layers of
    ``mlp_hidden_dim`` with sigmoid activations (PEPLER: 3 x 400). Loss: ``text_reg`` * LM loss +
    ``rating_reg`` * BCE. ``train_lm``: fine-tune the LM too (False: PEPLER's stage 1, LM frozen).
    Optimiser: AdamW (eps 1e-6) at ``lr`` with ``weight_decay`` (PEPLER: transformers' AdamW, 1e-3, 0.0),
    ``batch_size`` rows per step (PEPLER: 128). ``eval_batch_size`` rows per scoring batch (rating head only).
    Stop after ``patience`` consecutive epochs without a validation-AUC gain, or at ``max_epochs``.
    ``init_range``: U(-r, r) init of the prompt tables and the MLP's weights (PEPLER: 0.1). ``lm_dtype``/
    ``lm_device`` apply when ``train_pepler`` loads the LM from a spec string. ``prompt_version`` names the
    text-target wording (recorded in ``config.json``; change it when the wording changes).
    """

    text_max_tokens: int = 20
    text_source: str = "auto"
    mlp_hidden_dim: int = 400
    mlp_layers: int = 3
    text_reg: float = 1.0
    rating_reg: float = 1.0
    train_lm: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    max_epochs: int = 30
    patience: int = 5
    init_range: float = 0.1
    lm_dtype: str = "fp32"
    lm_device: str = "cpu"
    prompt_version: str = "pepler-v1"

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive_ints=(
                "text_max_tokens",
                "mlp_hidden_dim",
                "mlp_layers",
                "batch_size",
                "eval_batch_size",
                "max_epochs",
                "patience",
            ),
            positive_numbers=("rating_reg", "lr", "init_range"),
            nonnegative_numbers=("text_reg", "weight_decay"),
            flags=("train_lm",),
            words=("prompt_version",),
            choices={"text_source": TEXT_SOURCES},
        )
        check_lm_placement(self)


# ---------------------------------------------------------------------------------------------- text targets
def item_description(title: Any, categories: Any) -> str:
    """``"title: genre, genre"``; either part may be missing (``"title"``, ``"genre"``, ``""``)."""
    title = "" if title is None or (isinstance(title, float) and math.isnan(title)) else str(title).strip()
    if categories is None or (isinstance(categories, float) and math.isnan(categories)):
        genres: list[str] = []
    elif isinstance(categories, str):
        genres = [categories]
    else:
        genres = [str(c).strip() for c in list(categories)]
    genre_text = ", ".join(g for g in genres if g)
    if title and genre_text:
        return f"{title}: {genre_text}"
    return title or genre_text


def resolve_text_source(dataset: Dataset, text_source: str) -> str:
    """ "item" or "review": "auto" picks "review" when the training rows hold at least one review."""
    train = dataset.split("train")
    has_reviews = dataset.has_reviews and bool(
        train["review"].fillna("").astype(str).str.strip().ne("").any()
    )
    if text_source == "review" and not has_reviews:
        raise ConfigError(
            "PEPLERConfig.text_source is 'review' but the dataset's training rows have no review text "
            "(interactions.review); use 'item' or 'auto'"
        )
    if text_source == "auto":
        return "review" if has_reviews else "item"
    return text_source


@dataclasses.dataclass
class TextTargets:
    """PEPLER's text targets, tokenized once.

    ``texts[k]`` is text k; ``ids`` (K + 1, T) int64 holds its tokens (at most ``text_max_tokens``) then eos,
    padded with eos; ``lengths`` (K + 1,) int64 counts its tokens with the closing eos (0: no text). Row K is
    the empty text (sampled negatives). ``row_keys`` (N_train,) int64 gives each training row's text, rows in
    the order of ``dataset.split("train")``. Item mode: text k = item k's description. Review mode: the item
    descriptions, then one text per training row that has a review."""

    source: str
    texts: list[str]
    ids: torch.Tensor
    lengths: torch.Tensor
    row_keys: np.ndarray
    eos_token_id: int

    @property
    def empty_key(self) -> int:
        return len(self.texts)

    def batch(self, keys: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ids (B, width) and their mask (B, width) bool for text keys (B,), on the table's device.
        ``width`` defaults to the longest of these texts (a host sync; the training loop passes it)."""
        lengths = self.lengths.index_select(0, keys)
        if width is None:
            width = max(int(lengths.max()), 1) if keys.numel() else 1
        text = self.ids.index_select(0, keys)[:, :width]
        positions = torch.arange(width, device=text.device)
        return text, positions.unsqueeze(0) < lengths.unsqueeze(1)

    def to(self, device: torch.device | str) -> TextTargets:
        return dataclasses.replace(self, ids=self.ids.to(device), lengths=self.lengths.to(device))


def build_text_targets(dataset: Dataset, tokenizer: Any, config: PEPLERConfig) -> TextTargets:
    """The text target of every training row (see the module docstring); valid and test rows are never
    read. Tokens: raw text without special tokens, cut to ``config.text_max_tokens``, then eos."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TextLMError("PEPLER needs a tokenizer with an eos token (it ends and pads the text targets)")
    source = resolve_text_source(dataset, config.text_source)
    train = dataset.split("train")
    items = dataset.items
    texts = [
        item_description(t, c)
        for t, c in zip(items["title"].tolist(), items["categories"].tolist(), strict=True)
    ]
    row_keys = train["item_id"].to_numpy(dtype=np.int64).copy()
    if source == "review":
        reviews = train["review"].fillna("").astype(str).str.strip().to_numpy()
        reviewed = np.flatnonzero(reviews != "")
        row_keys[reviewed] = len(texts) + np.arange(len(reviewed))
        texts += reviews[reviewed].tolist()
    empty_key = len(texts)
    if "sampled" in train.columns:  # implicit data: a sampled negative has no text
        row_keys[train["sampled"].to_numpy() != 0] = empty_key
    encoded = (
        tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=config.text_max_tokens
        ).input_ids
        if texts
        else []
    )
    width = config.text_max_tokens + 1
    ids = np.full((len(texts) + 1, width), eos, dtype=np.int64)
    lengths = np.zeros(len(texts) + 1, dtype=np.int64)
    for k, tokens in enumerate(encoded):
        tokens = list(tokens)[: config.text_max_tokens]
        if tokens:  # an empty text stays empty (no lone eos to learn)
            ids[k, : len(tokens)] = tokens
            lengths[k] = len(tokens) + 1  # the eos after the text
    return TextTargets(source, texts, torch.from_numpy(ids), torch.from_numpy(lengths), row_keys, int(eos))


# ---------------------------------------------------------------------------------------------- data
def build_pepler_data(dataset: Dataset) -> CTRData:
    """CTR tensors whose ``x_ids`` are (``user_id + 1``, ``item_id + 1``) for every split: the vocabularies
    hold every user and item of the dataset (index 0, unknown, is never used), because PEPLER's tables have a
    row per user and item. A user or item absent from the train split keeps its random initial row (as in
    PEPLER); nothing about valid/test rows enters the tables."""
    users = Vocabulary(tuple(range(dataset.num_users)))
    items = Vocabulary(tuple(range(dataset.num_items)))
    encoder = FeatureEncoder({USER_FIELD: users, ITEM_FIELD: items})
    feature_map = FeatureMap(
        (
            Field(USER_FIELD, users.size, FieldSource.USER),
            Field(ITEM_FIELD, items.size, FieldSource.ITEM),
        )
    )
    inter = dataset.interactions
    splits: dict[str, SplitTensors] = {}
    for name in SPLITS:
        rows = inter[inter["split"] == name]
        if len(rows) == 0:
            continue
        x_ids = np.stack(
            [
                encoder.encode(USER_FIELD, rows["user_id"].to_numpy(np.int64)),
                encoder.encode(ITEM_FIELD, rows["item_id"].to_numpy(np.int64)),
            ],
            axis=1,
        )
        labels = rows["label"].to_numpy(dtype=np.float32)
        splits[name] = SplitTensors(torch.from_numpy(np.ascontiguousarray(x_ids)), torch.from_numpy(labels))
    return CTRData(feature_map, encoder, splits)


# ---------------------------------------------------------------------------------------------- model
class RatingMLP(nn.Module):
    """PEPLER's ``MLP``: concat(user, item) (B, 2H) -> [Linear, sigmoid] x ``num_layers`` (the first 2H ->
    hidden, then hidden -> hidden) -> Linear(hidden, 1) -> (B,) logits. Weights U(-r, r), biases 0."""

    def __init__(self, dim: int, hidden_dim: int = 400, num_layers: int = 3, init_range: float = 0.1) -> None:
        super().__init__()
        widths = [2 * dim] + [hidden_dim] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.last_layer = nn.Linear(hidden_dim, 1)
        for layer in [*self.layers, self.last_layer]:
            nn.init.uniform_(layer.weight, -init_range, init_range)
            nn.init.zeros_(layer.bias)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([user, item], dim=1)
        for layer in self.layers:
            hidden = torch.sigmoid(layer(hidden))
        return self.last_layer(hidden).squeeze(-1)


class PEPLERModel(nn.Module):
    """User/item prompt vectors of the LM's width, the rating MLP on them, and the LM (a submodule, so
    ``state_dict`` holds its weights; ``trainable_state_dict`` is the part PEPLER trains here).

    ``forward(x_ids)`` is the CTR model (``x_ids`` (B, 2) = ``user_id + 1``, ``item_id + 1``, as
    ``build_pepler_data`` makes them) -> (B,) logits, through the rating head only. ``text_loss`` is the LM
    loss on the text tokens given the two prompt vectors. The tables and the MLP are float32; the prompt
    vectors are cast to the LM's dtype (bf16 on a GPU) where they enter it, and the loss is taken in float32.
    With ``train_lm`` False the LM stays frozen and in eval mode whatever ``train()`` is called with."""

    def __init__(
        self,
        lm: nn.Module,
        num_users: int,
        num_items: int,
        mlp_hidden_dim: int = 400,
        mlp_layers: int = 3,
        init_range: float = 0.1,
        train_lm: bool = False,
    ) -> None:
        super().__init__()
        embedding = lm.get_input_embeddings()
        dim = int(embedding.weight.shape[1])
        device = embedding.weight.device
        self.train_lm = train_lm
        self.hidden_size = dim
        # Built on the CPU (the same initial values on any device for a given seed), then moved.
        user = nn.Embedding(num_users, dim)
        item = nn.Embedding(num_items, dim)
        nn.init.uniform_(user.weight, -init_range, init_range)
        nn.init.uniform_(item.weight, -init_range, init_range)
        rec = RatingMLP(dim, mlp_hidden_dim, mlp_layers, init_range)
        self.user_embeddings = user.to(device)
        self.item_embeddings = item.to(device)
        self.rec = rec.to(device)
        self.lm = lm
        self.lm.requires_grad_(train_lm)
        self.train(False)

    def train(self, mode: bool = True) -> PEPLERModel:
        super().train(mode)
        if not self.train_lm:
            self.lm.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The prompt tables and the rating MLP (what ``model.safetensors`` holds; never the LM)."""
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if name.startswith(("user_embeddings.", "item_embeddings.", "rec."))
        }

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) user_id, (B,) item_id -> (B,) logits of the rating head (no LM)."""
        return self.rec(self.user_embeddings(users), self.item_embeddings(items))

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.score(x_ids[:, 0] - 1, x_ids[:, 1] - 1)

    @staticmethod
    def lm_labels(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 2 + T) labels of the LM input ``[user, item, text]``: the text token where ``mask``, else
        -100 (both prompt positions and the padding)."""
        prompt = torch.full(
            (text.shape[0], PROMPT_LENGTH), IGNORE_INDEX, dtype=text.dtype, device=text.device
        )
        return torch.cat([prompt, text.masked_fill(~mask, IGNORE_INDEX)], dim=1)

    def text_loss(
        self, users: torch.Tensor, items: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the text tokens of the batch (0 if there are none), for
        ``text`` (B, T) ids and ``mask`` (B, T) bool, given each row's user and item prompt vectors."""
        words = self.lm.get_input_embeddings()(text)  # (B, T, H), the LM's dtype
        prompt = torch.stack([self.user_embeddings(users), self.item_embeddings(items)], dim=1)
        inputs = torch.cat([prompt.to(words.dtype), words], dim=1)  # (B, 2 + T, H)
        attention = torch.cat([mask.new_ones(mask.shape[0], PROMPT_LENGTH), mask], dim=1).long()
        logits = self.lm(inputs_embeds=inputs, attention_mask=attention, use_cache=False).logits
        labels = self.lm_labels(text, mask)  # (B, 2 + T)
        # Position p predicts label p + 1. Label 1 (the item slot) is -100, so positions 1 .. L-2 suffice.
        logits = logits[:, 1:-1].float()
        target = labels[:, 2:]
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class PEPLERResult(CTRResult):
    """A ``CTRResult`` (model name ``pepler``) plus what the LM passes of training cost, the text source used
    ("item" or "review") and each epoch's mean text and rating losses."""

    offline_cost: OfflineCost = dataclasses.field(default_factory=OfflineCost)
    text_source: str = "item"
    epoch_losses: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "offline_cost": self.offline_cost.to_dict(),
            "text_source": self.text_source,
            "epoch_losses": self.epoch_losses,
        }


def _train_rows(dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    train = dataset.split("train")
    users = torch.from_numpy(train["user_id"].to_numpy(dtype=np.int64, copy=True)).to(device)
    items = torch.from_numpy(train["item_id"].to_numpy(dtype=np.int64, copy=True)).to(device)
    labels = torch.from_numpy(train["label"].to_numpy(dtype=np.float32, copy=True)).to(device)
    return users, items, labels


def _batch_widths(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Per batch of ``lengths`` (in epoch order), its longest text (at least 1 position)."""
    starts = np.arange(0, len(lengths), batch_size)
    return np.maximum(np.maximum.reduceat(lengths, starts), 1)


def _evaluate(
    model: nn.Module, split: SplitTensors, batch_size: int, device: torch.device
) -> dict[str, float]:
    return ctr_metrics(split.labels.numpy(), predict_probs(model, split.x_ids, batch_size, device))


def train_pepler(
    dataset: Dataset,
    lm: TextLM | str,
    config: PEPLERConfig | None = None,
    seed: int = 0,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> PEPLERResult:
    """Train PEPLER (prompt vectors + rating MLP, text loss through ``lm``) on the train split, select the
    epoch by **validation** AUC of the rating head, and score the test split once with it.

    ``lm``: a loaded ``TextLM`` (its device is used; it is not modified: ``train_lm`` fine-tunes a copy) or an
    ``--lm`` spec, loaded with ``config.lm_dtype``/``lm_device``. ``seed`` seeds the initialisation and the
    shuffling. With ``output_dir``, writes ``model.safetensors`` (prompt tables + MLP of the best epoch, not
    the LM), ``config.json`` and, last, ``metrics.json``.
    """
    config = config or PEPLERConfig()
    if isinstance(lm, str):
        lm = load_text_lm(lm, dataset=dataset, dtype=config.lm_dtype, device=config.lm_device)
    if not isinstance(lm, TextLM):
        raise TypeError(f"lm must be a TextLM or an --lm spec string, got {type(lm).__name__}")
    out = Path(output_dir) if output_dir is not None else None  # written only once everything succeeded

    data = build_pepler_data(dataset)
    if "train" not in data.splits or "test" not in data.splits:
        raise ValueError(f"dataset needs train and test interactions; has splits {sorted(data.splits)}")
    device = lm.device
    use_text = config.text_reg > 0
    targets = build_text_targets(dataset, lm.tokenizer, config)
    text_table = targets.to(device)
    host_lengths = targets.lengths.numpy()[targets.row_keys]  # (N_train,) per training row, on the host
    log.info(
        "PEPLER: %d training rows, text source %r (%d texts, mean %.1f tokens), LM %s%s",
        len(host_lengths),
        targets.source,
        len(targets.texts),
        float(host_lengths.mean()) if len(host_lengths) else 0.0,
        lm.describe(),
        ", fine-tuned" if config.train_lm else ", frozen",
    )

    seed_everything(seed)
    lm_module = lm.model
    if config.train_lm:
        lm_module = copy.deepcopy(lm.model)  # the caller's LM stays as it is
    model = PEPLERModel(
        lm_module,
        dataset.num_users,
        dataset.num_items,
        config.mlp_hidden_dim,
        config.mlp_layers,
        config.init_range,
        config.train_lm,
    )
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [p for _, p in trainable], lr=config.lr, weight_decay=config.weight_decay, eps=ADAMW_EPS
    )
    users, items, labels = _train_rows(dataset, device)
    row_keys = torch.from_numpy(targets.row_keys).to(device)
    valid = data.splits.get("valid")
    generator = torch.Generator().manual_seed(seed)  # shuffling stream, independent of the model's init
    cost = OfflineCost(device=lm.describe())
    n = len(host_lengths)
    num_batches = math.ceil(n / config.batch_size)

    history: list[EpochRecord] = []
    epoch_losses: list[dict[str, float]] = []
    best_auc, best_epoch, best_state = -math.inf, 0, None
    bad_epochs, stopped_early = 0, False
    for epoch in range(1, config.max_epochs + 1):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=generator)
        widths = _batch_widths(host_lengths[perm.numpy()], config.batch_size)
        perm = perm.to(device)
        model.train()
        text_sum = torch.zeros((), device=device)
        rating_sum = torch.zeros((), device=device)
        bar = tqdm(total=num_batches, desc=f"pepler epoch {epoch}", disable=not progress, leave=False)
        for b in range(num_batches):
            idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
            u, i, y = users.index_select(0, idx), items.index_select(0, idx), labels.index_select(0, idx)
            rating_loss = F.binary_cross_entropy_with_logits(model.score(u, i), y)
            loss = config.rating_reg * rating_loss
            if use_text:
                text, mask = text_table.batch(row_keys.index_select(0, idx), int(widths[b]))
                text_loss = model.text_loss(u, i, text, mask)
                loss = loss + config.text_reg * text_loss
                text_sum += text_loss.detach() * idx.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rating_sum += rating_loss.detach() * idx.numel()
            bar.update()
        bar.close()
        text_mean, rating_mean = float(text_sum) / n, float(rating_sum) / n  # one host sync per epoch
        seconds = time.perf_counter() - start
        train_loss = config.text_reg * text_mean + config.rating_reg * rating_mean
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"PEPLER epoch {epoch}: training loss is {train_loss}; lower PEPLERConfig.lr"
            )
        if use_text:
            cost.train_samples += n
            cost.train_tokens += int(host_lengths.sum())
            cost.train_seconds += seconds
        record = EpochRecord(epoch, train_loss, seconds, n / max(seconds, 1e-9))
        history.append(record)
        epoch_losses.append({"epoch": epoch, "text_loss": text_mean, "rating_loss": rating_mean})
        if valid is None:
            best_epoch = epoch
            log.info("PEPLER epoch %d: text loss %.4f, BCE %.4f", epoch, text_mean, rating_mean)
            continue
        metrics = _evaluate(model, valid, config.eval_batch_size, device)
        record.valid_auc, record.valid_logloss = metrics["auc"], metrics["logloss"]
        improved = metrics["auc"] > best_auc
        log.info(
            "PEPLER epoch %d: text loss %.4f, BCE %.4f, valid AUC %.5f, Logloss %.5f (%.1f s)%s",
            epoch,
            text_mean,
            rating_mean,
            metrics["auc"],
            metrics["logloss"],
            seconds,
            " *" if improved else "",
        )
        if improved:
            best_auc, best_epoch, bad_epochs = metrics["auc"], epoch, 0
            best_state = {name: p.detach().clone() for name, p in trainable}
        else:
            bad_epochs += 1  # consecutive: reset on every gain (PEPLER's endure_count never resets)
            if bad_epochs >= config.patience:
                stopped_early = epoch < config.max_epochs
                break
    if best_state is not None:
        with torch.no_grad():
            for name, p in trainable:
                p.copy_(best_state[name])
    del best_state, optimizer
    model.eval()
    # Calibrated on validation like every CTR row (userip.ctr.calibration); the choice stays PEPLER's own.
    valid_metrics, calibration = (
        validate_model(model, valid, batch_size=config.eval_batch_size, device=device)
        if valid is not None
        else (None, None)
    )
    fit = FitResult(best_epoch, None if valid is None else best_auc, stopped_early, history)
    if calibration is not None:
        fit.calibration = calibration

    result = PEPLERResult(
        model_name=MODEL_NAME,
        with_profiles=False,
        seed=seed,
        valid=valid_metrics,
        fit=fit,
        data=data,
        model=model,
        output_dir=out,
        **score_test(model, data["test"], config.eval_batch_size, device, calibration),
        offline_cost=cost,
        text_source=targets.source,
        epoch_losses=epoch_losses,
    )
    log.info("PEPLER: best epoch %d, valid %s, test %s", best_epoch, valid_metrics, result.test)
    if out is None:
        return result
    # The folder replaces an earlier one only now (atomic_dir): a failed run leaves it byte-identical.
    with atomic_dir(out) as folder:
        save_tensors(
            folder / MODEL_FILE,
            model.trainable_state_dict(),
            {"epoch": str(best_epoch), "valid_auc": repr(fit.best_valid_auc)},
        )
        atomic_write_json(
            folder / CONFIG_FILE,
            {
                "model": MODEL_NAME,
                "pepler": to_dict(config),
                "seed": seed,
                "text_source": targets.source,
                "num_users": dataset.num_users,
                "num_items": dataset.num_items,
                "hidden_size": model.hidden_size,
                "dataset_hash": dataset.content_hash,
                "lm": lm.name,
                "lm_fingerprint": lm.fingerprint(),
            },
        )
        atomic_write_json(folder / METRICS_FILE, result.metrics())
    return result


__all__ = [
    "PEPLERConfig",
    "PEPLERModel",
    "PEPLERResult",
    "RatingMLP",
    "TextTargets",
    "build_pepler_data",
    "build_text_targets",
    "item_description",
    "resolve_text_source",
    "train_pepler",
]
