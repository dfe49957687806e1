"""ReLLa (Lin et al., "ReLLa: Retrieval-enhanced Large Language Models for Lifelong Sequential Behavior
Comprehension in Recommendation") as a baseline: the LM itself scores each row, P(yes) to "will the user like
this item?", from a prompt holding the user's semantically retrieved history; LoRA fine-tuning on a few
sampled train rows ("few-shot"), or none (zero-shot).

Steps (design note ``/work/shared/design/llm-baselines.md`` section 3, "minimal faithful version"):

1. *Semantic item embeddings*: "Here is a movie. Its title is ... Its genre is ..." (first category) encoded
   raw (no chat template: its system prompt would dominate) by one plain forward of the LM, masked mean of
   the final hidden states; PCA to ``pca_dim``; cosine similarity (``semantic_item_embeddings``).
2. *Retrieval* (``HistoryIndex``): for a row (user u, item i, time t) the pool is u's observed rows of the
   **train** split (or of the ``history`` split under a protocol with one) with timestamp **strictly** before
   t and item != i, so neither the target nor any valid/test label can enter a prompt. "semantic" keeps the
   ``num_history_items`` pool rows most similar to the target (ReLLa's retrieval), "recent" the last ones
   (ReLLa's "simple"); either way they are listed in time order (ReLLa's "sequential").
3. *Prompt* (``PromptBuilder``): the user's features, the history as "k. Title (r stars)" (stars of train
   rows strictly before the target: allowed), the question about the target and "You should ONLY tell me yes
   or no.", inside the tokenizer's chat template with its generation prompt. A prompt over
   ``max_prompt_tokens`` loses its least relevant history items, never its end (ReLLa cut on the right and
   so could cut the answer position off).
4. *Score*: P(yes) = softmax([logit No, logit Yes]) at the last prompt position, where "Yes"/"No" are the
   first tokens the tokenizer gives each answer right after the generation prompt (``answer_token_ids``:
   recomputed per tokenizer, never ReLLa's Llama ids). Equivalently sigmoid(logit Yes - logit No):
   ``ReLLaModel``'s forward returns that difference, the row's CTR logit.
5. *Fine-tuning*: peft LoRA on ``lora_target_modules``; cross-entropy over the whole vocabulary at the last
   prompt position against the answer's first token (ReLLa's answer-only loss); AdamW, linear decay (the HF
   Trainer's default schedule), gradient norm clipped at 1.0 (its default); "mixed" puts each sampled train
   row in twice, with recent and with retrieved history. Early stopping and the choice of epoch use
   **validation** AUC (ReLLa's script evaluated and selected on test), on a fixed seeded sample of at most
   ``max_valid_rows`` valid rows; the test split is scored once, with the chosen epoch's adapter.

The caller's LM is left as it was: the adapter is injected for training and scoring only and removed
afterwards (peft ``unload()``, no merge), so base weights stay bit-identical; ``ReLLaModel`` keeps the
adapter's weights and re-attaches them whenever it scores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from userip.baselines.kar import IGNORED_USER_COLUMNS, _user_intro, default_cache_dir
from userip.baselines.llm_text import (
    OfflineCost,
    TextLM,
    TextLMError,
    chat_text,
    check_lm_placement,
    encode_cached,
    load_text_lm,
)
from userip.ctr.calibration import IDENTITY, fit_platt, probs_to_logits
from userip.ctr.data import build_ctr_data
from userip.ctr.recipe import CTRResult
from userip.ctr.trainer import EpochRecord, FitResult
from userip.data.schema import HISTORY_SPLIT, Dataset
from userip.evaluation.metrics import ctr_metrics
from userip.utils.artifacts import save_tensors
from userip.utils.config import ConfigError, check_fields, to_dict
from userip.utils.io import atomic_dir, atomic_write_json
from userip.utils.logging import get_logger

log = get_logger(__name__)

RETRIEVALS = ("semantic", "recent")
POOL_SPLITS = ("train", HISTORY_SPLIT)  # rows a prompt may show (with their stars): never valid/test
MAX_GRAD_NORM = 1.0  # the HF Trainer's default, which ReLLa's finetune.py ran with
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ANSWERS = ("Yes", "No")


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class ReLLaConfig:
    """ReLLa's settings (keys equal constructor arguments).

    Prompt: ``num_history_items`` K (ReLLa: 5-30; 10 here); ``retrieval`` for valid/test prompts (and for
    train prompts unless ``mixed``): "semantic" (ReLLa's retrieval) or "recent" (the last K, ReLLa's
    "simple"); ``mixed`` puts each sampled train row in twice, once per retrieval (ReLLa's "mixed" training
    set); ``max_prompt_tokens`` caps a prompt by dropping its least relevant history items;
    ``item_noun`` names the items; ``prompt_version`` is recorded with the run (bump it when the wording
    changes). ``pca_dim``: the item embeddings' PCA size (ReLLa: 512), capped at the LM's hidden size and
    the item count.

    Training: ``zero_shot`` scores with the LM as it is (no training at all); otherwise LoRA
    (``lora_r``/``lora_alpha``/``lora_dropout`` on ``lora_target_modules``; ReLLa: 8/16/0.05 on q/v) is
    trained on ``num_train_samples`` seeded train rows (twice as many passes when ``mixed``) for up to
    ``max_epochs`` epochs of AdamW at ``lr`` in batches of ``batch_size``, stopping after ``patience`` epochs
    without a validation-AUC gain. ``max_valid_rows``: the per-epoch validation (and the reported valid
    metrics) use a fixed seeded sample of at most this many valid rows (None: all of them).
    ``eval_batch_size``: rows per scoring forward (and texts per embedding forward). ``lm_dtype``/
    ``lm_device`` apply when ``train_rella`` loads the LM from a spec string.
    """

    num_history_items: int = 10
    retrieval: str = "semantic"
    mixed: bool = True
    num_train_samples: int = 1024
    zero_shot: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 1e-3
    max_epochs: int = 2
    patience: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    max_valid_rows: int | None = 4096
    max_prompt_tokens: int = 1024
    pca_dim: int = 512
    item_noun: str = "movie"
    prompt_version: str = "rella-v1"
    lm_dtype: str = "fp32"
    lm_device: str = "cpu"

    def __post_init__(self) -> None:
        modules = self.lora_target_modules
        if isinstance(modules, str):
            raise ConfigError(
                f"ReLLaConfig.lora_target_modules must be a list of module names, got {modules!r}"
            )
        self.lora_target_modules = tuple(modules)
        check_fields(
            self,
            positive_ints=(
                "num_history_items",
                "num_train_samples",
                "lora_r",
                "max_epochs",
                "patience",
                "batch_size",
                "eval_batch_size",
                "max_prompt_tokens",
                "pca_dim",
            ),
            optional_positive_ints=("max_valid_rows",),
            positive_numbers=("lr", "lora_alpha"),
            fractions=("lora_dropout",),
            flags=("mixed", "zero_shot"),
            words=("item_noun", "prompt_version"),
            choices={"retrieval": RETRIEVALS},
        )
        check_lm_placement(self)
        if not self.lora_target_modules or not all(
            isinstance(m, str) and m.strip() for m in self.lora_target_modules
        ):
            raise ConfigError(
                f"ReLLaConfig.lora_target_modules must be non-empty module names, got {modules!r}"
            )

    def lora_config(self) -> Any:
        """The ``peft.LoraConfig`` (ReLLa's: no bias, causal-LM task)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


# ---------------------------------------------------------------------------------------------- embeddings
def item_texts(dataset: Dataset, noun: str = "movie") -> list[str]:
    """ReLLa's item description, one per item (index = item_id): title and first category."""
    texts = []
    for title, categories in zip(
        dataset.items["title"].fillna("").astype(str), dataset.items["categories"], strict=True
    ):
        first = next((str(c) for c in (categories if categories is not None else ()) if str(c)), "")
        genre = f" Its genre is {first}." if first else ""
        texts.append(f"Here is a {noun}. Its title is {title}.{genre}")
    return texts


def reduce_embeddings(table: np.ndarray, dim: int) -> np.ndarray:
    """(N, H) -> (N, d) float32 unit rows: PCA to d = min(dim, H, N) (full SVD: deterministic), then L2
    normalisation, so a dot product is the cosine similarity of the PCA vectors."""
    from sklearn.decomposition import PCA

    n = min(dim, table.shape[1], table.shape[0])
    reduced = PCA(n_components=n, svd_solver="full").fit_transform(table.astype(np.float64))
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)


def semantic_item_embeddings(
    dataset: Dataset,
    lm: TextLM,
    config: ReLLaConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    cost: OfflineCost | None = None,
) -> np.ndarray:
    """(num_items, d) unit vectors: ``item_texts`` encoded raw by ``lm`` (one forward, masked mean of the
    final hidden states; cached under ``cache_dir/encodings``), PCA'd to ``config.pca_dim``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    raw = encode_cached(
        lm,
        item_texts(dataset, config.item_noun),
        root / "encodings",
        max_tokens=256,
        batch_size=config.eval_batch_size,
        cost=cost,
    )
    return reduce_embeddings(raw, config.pca_dim)


# ---------------------------------------------------------------------------------------------- retrieval
class HistoryIndex:
    """Each user's pool rows (observed rows of ``POOL_SPLITS``), sorted by (timestamp, row order), and the
    retrieval over them. Positions ``p`` index this object's arrays; ``rows[p]`` is the row's position in
    ``dataset.interactions``. ``item_embeddings`` (num_items, d), unit rows, are needed for "semantic"."""

    def __init__(self, dataset: Dataset, item_embeddings: np.ndarray | None = None) -> None:
        inter = dataset.interactions
        mask = inter["split"].isin(POOL_SPLITS).to_numpy()
        if "sampled" in inter.columns:  # implicit data: a sampled negative is not something the user did
            mask &= inter["sampled"].to_numpy() == 0
        rows = np.flatnonzero(mask)
        users = inter["user_id"].to_numpy(np.int64)[rows]
        times = inter["timestamp"].to_numpy(np.int64)[rows]
        order = np.lexsort((rows, times, users))
        self.rows = rows[order]
        self.users = users[order]
        self.times = times[order]
        self.items = inter["item_id"].to_numpy(np.int64)[self.rows]
        self.ratings = inter["rating"].to_numpy(np.float64)[self.rows]
        ids = np.arange(dataset.num_users)
        self.starts = np.searchsorted(self.users, ids, "left")
        self.ends = np.searchsorted(self.users, ids, "right")
        if item_embeddings is not None and item_embeddings.shape[0] != dataset.num_items:
            raise ValueError(
                f"item_embeddings has {item_embeddings.shape[0]} rows for {dataset.num_items} items"
            )
        self.item_embeddings = item_embeddings

    def pool(self, user: int, item: int, timestamp: int) -> np.ndarray:
        """Positions (time order) of the user's pool rows strictly before ``timestamp``, the item excluded."""
        start, end = int(self.starts[user]), int(self.ends[user])
        cut = start + int(np.searchsorted(self.times[start:end], timestamp, "left"))
        positions = np.arange(start, cut)
        return positions[self.items[positions] != item]

    def retrieve(self, user: int, item: int, timestamp: int, retrieval: str, k: int) -> np.ndarray:
        """At most ``k`` pool positions in priority order (most relevant first): "recent" by recency,
        "semantic" by cosine similarity of their item to ``item`` (ties: the more recent first)."""
        pool = self.pool(user, item, timestamp)
        if retrieval == "recent":
            return pool[::-1][:k]
        if retrieval != "semantic":
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
        if self.item_embeddings is None:
            raise ValueError("semantic retrieval needs item_embeddings")
        sims = self.item_embeddings[self.items[pool]] @ self.item_embeddings[item]  # (P,)
        order = np.lexsort((-pool, -sims))  # similarity descending, then the later row first
        return pool[order[:k]]


# ---------------------------------------------------------------------------------------------- prompts
def _stars(rating: float) -> str:
    """ " (4 stars)", " (1 star)", " (3.5 stars)"; nothing for implicit data (no rating)."""
    if not math.isfinite(rating):
        return ""
    value = int(rating) if float(rating).is_integer() else round(float(rating), 1)
    return f" ({value} star" + (")" if value == 1 else "s)")


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """The ids of the first token of "Yes" and of "No" when they start the assistant's answer."""

    yes: int
    no: int


def answer_token_ids(tokenizer: Any) -> AnswerTokens:
    """Tokenize a chat prompt (with its generation prompt) alone and followed by each answer; the answer's
    first id is the one right after the prompt's ids. Refuses a tokenizer that merges the answer into the
    prompt's last token, gives both answers the same first token, or whose first token is not the start of
    the answer word."""
    prompt = chat_text(tokenizer, "Will the user like it? You should ONLY tell me yes or no.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    found = {}
    for word in ANSWERS:
        ids = tokenizer(prompt + word, add_special_tokens=False).input_ids
        if len(ids) <= len(prompt_ids) or ids[: len(prompt_ids)] != prompt_ids:
            raise TextLMError(f"the tokenizer merges the answer {word!r} into the prompt's last token")
        first = ids[len(prompt_ids)]
        text = tokenizer.decode([first]).strip()
        if not text or not word.lower().startswith(text.lower()):  # a lower-casing tokenizer: "yes"
            raise TextLMError(f"the answer {word!r} starts with token {first} = {text!r}, not with {word!r}")
        if text.lower() != word.lower():
            log.warning("ReLLa: %r is split; its first token %r (id %d) stands for it", word, text, first)
        found[word] = first
    if found["Yes"] == found["No"]:
        raise TextLMError(f"'Yes' and 'No' start with the same token {found['Yes']}")
    return AnswerTokens(yes=found["Yes"], no=found["No"])


class PromptBuilder:
    """ReLLa prompts and their token ids for rows of ``dataset`` (positions in ``dataset.interactions``)."""

    def __init__(self, dataset: Dataset, config: ReLLaConfig, index: HistoryIndex, tokenizer: Any) -> None:
        inter = dataset.interactions
        self.config = config
        self.index = index
        self.tokenizer = tokenizer
        self.users = inter["user_id"].to_numpy(np.int64)
        self.items = inter["item_id"].to_numpy(np.int64)
        self.times = inter["timestamp"].to_numpy(np.int64)
        self.labels = inter["label"].to_numpy(np.int64)
        self.titles = dataset.items["title"].fillna("").astype(str).tolist()
        self.explicit = bool(np.isfinite(index.ratings).any()) if len(index.ratings) else True
        columns = [c for c in dataset.users.columns if c not in IGNORED_USER_COLUMNS]
        users = dataset.users[columns].fillna("").astype(str)
        self.intros = [
            _user_intro(users.iloc[u].to_dict() if columns else {}, config.item_noun)
            for u in range(dataset.num_users)
        ]

    def history(self, row: int, retrieval: str) -> np.ndarray:
        """Pool positions of the row's history, in priority order (see ``HistoryIndex.retrieve``)."""
        return self.index.retrieve(
            int(self.users[row]),
            int(self.items[row]),
            int(self.times[row]),
            retrieval,
            self.config.num_history_items,
        )

    def message(self, row: int, history: np.ndarray) -> str:
        """The user message for ``row`` showing the pool positions ``history`` (listed in time order)."""
        noun = self.config.item_noun
        index = self.index
        lines = [
            f"{k}. {self.titles[index.items[p]]}{_stars(index.ratings[p])}"
            for k, p in enumerate(np.sort(history), start=1)
        ]
        stars_note = (
            f"Note that the more stars the user gave a {noun}, the more the user liked the {noun}.\n"
            if self.explicit
            else ""
        )
        return (
            f"{self.intros[self.users[row]]}\n"
            + ("\n".join(lines) if lines else "(none)")
            + f"\nBased on the {noun}s this user has rated, deduce whether the user will like the {noun} "
            f"***{self.titles[self.items[row]]}***.\n"
            f"{stars_note}"
            "You should ONLY tell me yes or no."
        )

    def messages(self, rows: Sequence[int], retrieval: str) -> list[str]:
        return [self.message(int(r), self.history(int(r), retrieval)) for r in rows]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False).input_ids

    def token_ids(self, rows: Sequence[int], retrieval: str) -> list[list[int]]:
        """Token ids of each row's chat prompt (template + generation prompt: its last id is where the answer
        starts). A prompt longer than ``max_prompt_tokens`` keeps as many of its most relevant history items
        as fit (binary search); one that does not fit even without history is an error."""
        limit = self.config.max_prompt_tokens
        histories = [self.history(int(r), retrieval) for r in rows]
        texts = [chat_text(self.tokenizer, self.message(int(r), h)) for r, h in zip(rows, histories)]
        ids = self._ids(texts)
        for j, row in enumerate(rows):
            if len(ids[j]) <= limit:
                continue
            history = histories[j]
            best: list[int] | None = None
            low, high = 0, len(history) - 1  # the largest kept count in [low, high] that fits
            while low <= high:
                mid = (low + high) // 2
                candidate = self._ids([chat_text(self.tokenizer, self.message(int(row), history[:mid]))])[0]
                if len(candidate) <= limit:
                    best, low = candidate, mid + 1
                else:
                    high = mid - 1
            if best is None:
                raise ValueError(
                    f"ReLLaConfig.max_prompt_tokens={limit} is too small: row {int(row)}'s prompt needs "
                    "more tokens than that even without history"
                )
            ids[j] = best
        return ids


# ---------------------------------------------------------------------------------------------- batches
@dataclasses.dataclass
class TokenBatches:
    """Prompts ready for the LM: batches of right-padded ids (B, L) with each row's length (B,) and its
    position among the prompts (B,), all on the LM's device; sorted longest first."""

    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    num_rows: int
    num_tokens: int


def make_batches(
    token_ids: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
    order: np.ndarray | None = None,
) -> TokenBatches:
    """Cut ``token_ids`` into batches in ``order`` (default: longest first, so similar lengths share a
    batch and an out-of-memory shows at once), each padded on the right to its own longest prompt."""
    lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
    if order is None:
        order = np.argsort(-lengths, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lens = lengths[idx]
        ids = np.full((len(idx), int(lens.max())), pad_id, dtype=np.int64)
        for b, k in enumerate(idx):
            ids[b, : lens[b]] = token_ids[k]
        batches.append(
            (
                torch.from_numpy(ids).to(device),
                torch.from_numpy(lens).to(device),
                torch.from_numpy(np.ascontiguousarray(idx)).to(device),
            )
        )
    return TokenBatches(batches, len(token_ids), int(lengths.sum()))


# ---------------------------------------------------------------------------------------------- model
class ReLLaModel(nn.Module):
    """The scorer: ``lm`` plus, once trained, a LoRA adapter kept as its own weights (``adapter``: peft's
    state-dict keys -> tensors). ``attach()`` injects the adapter into ``lm.model`` for as long as its
    context lasts and then removes it again (peft ``unload()`` without merging: base weights untouched).
    ``forward(input_ids, lengths)`` -> (B,) float32 logit(Yes) - logit(No) at each row's last prompt
    position = the row's CTR logit (sigmoid = P(yes)); with an adapter, only inside ``attach()``."""

    def __init__(self, lm: TextLM, answer: AnswerTokens, lora_config: Any = None) -> None:
        super().__init__()
        self.lm = lm  # a plain attribute (TextLM is no Module): the base LM is not part of this state
        self.answer = answer
        self.lora_config = lora_config
        self.adapter: dict[str, torch.Tensor] = {}
        self._peft: Any = None
        self._answer_vocab: dict[torch.device, torch.Tensor] = {}

    @property
    def attached(self) -> bool:
        return self._peft is not None

    @contextlib.contextmanager
    def attach(self) -> Iterator[Any]:
        """Inject the LoRA adapter (``self.adapter``'s weights, or a fresh initialisation while it is empty)
        into ``lm.model``; yields the peft model (None without ``lora_config``). On exit the adapter is
        removed and the LM is back in eval mode, frozen, with its base weights as they were."""
        if self._peft is not None:
            raise RuntimeError("ReLLaModel.attach: the adapter is attached already")
        if self.lora_config is None:
            yield None
            return
        from peft import get_peft_model, set_peft_model_state_dict

        model = self.lm.model
        with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, copy.deepcopy(self.lora_config))
        try:
            if self.adapter:
                result = set_peft_model_state_dict(peft_model, self.adapter)
                if result.unexpected_keys:
                    raise RuntimeError(f"ReLLa adapter keys not in the model: {result.unexpected_keys[:3]}")
            self._peft = peft_model
            yield peft_model
        finally:
            self._peft = None
            peft_model.unload()  # the LoRA layers give their base layers back; nothing is merged
            model.requires_grad_(False)
            model.eval()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The attached adapter's current weights (detached copies)."""
        from peft import get_peft_model_state_dict

        if self._peft is None:
            raise RuntimeError("ReLLaModel.adapter_state: no adapter attached")
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self._peft).items()}

    def answer_logits(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) right-padded ids, (B,) lengths -> (B, V) float32 logits at each row's last position (only
        the ``vocab`` ids' columns when given). The decoder runs once; the output head reads only those
        positions, in float32: a bf16 head rounds logits of size ~20 to steps of 0.125, so P(yes) would
        take a handful of values and AUC would be mostly ties."""
        if self.adapter and not self.attached:
            raise RuntimeError("ReLLaModel: score inside `with model.attach():` (the adapter is detached)")
        model = self.lm.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, L); built on the device
        states = model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = states[torch.arange(input_ids.shape[0], device=input_ids.device), lengths - 1]  # (B, H)
        head = model.get_output_embeddings()
        if type(head) is nn.Linear:
            weight, bias = head.weight, head.bias
            if vocab is not None:
                weight, bias = weight[vocab], None if bias is None else bias[vocab]
            return F.linear(last.float(), weight.float(), None if bias is None else bias.float())
        logits = head(last).float()  # an adapted or unusual head: its own dtype
        return logits if vocab is None else logits[:, vocab]

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        vocab = self._answer_vocab.get(input_ids.device)
        if vocab is None:  # made once per device (no copy per batch), never as an inference tensor
            with torch.inference_mode(False):
                vocab = torch.tensor([self.answer.no, self.answer.yes], device=input_ids.device)
            self._answer_vocab[input_ids.device] = vocab
        logits = self.answer_logits(input_ids, lengths, vocab)  # (B, 2)
        return logits[:, 1] - logits[:, 0]

    def score(self, batches: TokenBatches) -> np.ndarray:
        """(N,) float32 P(yes) for the prompts in ``batches`` (in prompt order), with whatever is attached
        now; the LM is put in eval mode and inference mode."""
        self.lm.model.eval()
        out = torch.empty(batches.num_rows, dtype=torch.float32, device=self.lm.device)
        with torch.inference_mode():
            for ids, lengths, positions in batches.batches:
                out[positions] = torch.sigmoid(self(ids, lengths))
        return out.cpu().numpy()

    def predict(self, batches: TokenBatches) -> np.ndarray:
        """``score`` with this model's adapter attached for the call (nothing to attach when zero-shot)."""
        if self.attached or not self.adapter:
            return self.score(batches)
        with self.attach():
            return self.score(batches)


# ---------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class ReLLaResult(CTRResult):
    """A ``CTRResult`` (model ``rella`` or ``rella-zeroshot``; ``model`` is the ``ReLLaModel``) plus the LM
    work's cost and the test scoring's time per 10,000 rows (LM forwards only: prompts are built and
    tokenized beforehand). ``valid_rows``: the positions, within the valid split, of the sampled rows that
    early stopping and ``valid`` use."""

    offline_cost: OfflineCost = dataclasses.field(default_factory=OfflineCost)
    inference_seconds_per_10k: float = 0.0
    valid_rows: np.ndarray | None = None
    answer_ids: AnswerTokens | None = None

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "offline_cost": self.offline_cost.to_dict(),
            "inference_seconds_per_10k": self.inference_seconds_per_10k,
            "num_valid_rows_scored": None if self.valid_rows is None else int(len(self.valid_rows)),
            "answer_ids": None if self.answer_ids is None else dataclasses.asdict(self.answer_ids),
        }


def _sample(rng: np.random.Generator, positions: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` of ``positions`` drawn without replacement, kept in their order."""
    if limit is None or len(positions) <= limit:
        return positions
    return positions[np.sort(rng.choice(len(positions), size=limit, replace=False))]


def _train_epoch(
    model: ReLLaModel,
    token_ids: list[list[int]],
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[nn.Parameter],
    config: ReLLaConfig,
    generator: torch.Generator,
) -> tuple[float, int]:
    """One shuffled pass: answer-token cross-entropy over the vocabulary; returns (mean loss, tokens)."""
    lm = model.lm
    lm.model.train()
    order = torch.randperm(len(token_ids), generator=generator).numpy()
    batches = make_batches(token_ids, config.batch_size, lm.pad_token_id, lm.device, order=order)
    total = torch.zeros((), dtype=torch.float32, device=lm.device)
    for ids, lengths, positions in batches.batches:
        logits = model.answer_logits(ids, lengths)  # (B, V) float32
        loss = F.cross_entropy(logits, targets[positions])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        total += loss.detach() * ids.shape[0]
    lm.model.eval()
    return float(total) / len(token_ids), batches.num_tokens


def train_rella(
    dataset: Dataset,
    lm: TextLM | str,
    config: ReLLaConfig | None = None,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ReLLaResult:
    """Score ``dataset``'s valid and test rows with ReLLa: zero-shot (``config.zero_shot``) or after LoRA
    fine-tuning on sampled train rows with early stopping on validation AUC; the test split is scored once,
    with the chosen epoch's adapter. ``lm`` is left unchanged.

    ``lm``: a loaded ``TextLM`` or an ``--lm`` spec, loaded with ``config.lm_dtype``/``lm_device``. ``seed``
    seeds the train-row and valid-row samples, the LoRA initialisation, dropout and shuffling.
    ``cache_dir``: where the item encodings are kept (default ``kar.default_cache_dir()``). With
    ``output_dir``, writes the adapter (``adapter_model.safetensors`` + ``adapter_config.json``, peft's
    names; not the base LM; fine-tuned runs only), ``config.json`` and, last, ``metrics.json``.
    ``progress`` logs each epoch at INFO level (there is no bar)."""
    config = config or ReLLaConfig()
    if isinstance(lm, str):
        lm = load_text_lm(lm, dataset=dataset, dtype=config.lm_dtype, device=config.lm_device)
    if not isinstance(lm, TextLM):
        raise TypeError(f"lm must be a TextLM or an --lm spec string, got {type(lm).__name__}")
    name = "rella-zeroshot" if config.zero_shot else "rella"
    out = Path(output_dir) if output_dir is not None else None  # written only once everything succeeded
    say = log.info if progress else log.debug

    inter = dataset.interactions
    split = inter["split"].to_numpy()
    test_rows = np.flatnonzero(split == "test")
    train_rows = np.flatnonzero(split == "train")
    if len(test_rows) == 0 or (not config.zero_shot and len(train_rows) == 0):
        raise ValueError(f"dataset needs train and test interactions; has {sorted(set(split))}")
    labels_all = inter["label"].to_numpy(np.float32)
    valid_positions = _sample(
        np.random.default_rng([seed, 2]), np.arange(int((split == "valid").sum())), config.max_valid_rows
    )
    valid_rows = np.flatnonzero(split == "valid")[valid_positions]

    cost = OfflineCost(device=lm.describe())
    needs_semantic = config.retrieval == "semantic" or (config.mixed and not config.zero_shot)
    embeddings = semantic_item_embeddings(dataset, lm, config, cache_dir, cost) if needs_semantic else None
    index = HistoryIndex(dataset, embeddings)
    answer = answer_token_ids(lm.tokenizer)
    builder = PromptBuilder(dataset, config, index, lm.tokenizer)
    start = time.perf_counter()
    valid_batches = make_batches(
        builder.token_ids(valid_rows, config.retrieval), config.eval_batch_size, lm.pad_token_id, lm.device
    )
    test_batches = make_batches(
        builder.token_ids(test_rows, config.retrieval), config.eval_batch_size, lm.pad_token_id, lm.device
    )
    seconds = time.perf_counter() - start
    say("ReLLa: %d valid and %d test prompts in %.1f s", len(valid_rows), len(test_rows), seconds)
    valid_labels = labels_all[valid_rows]
    model = ReLLaModel(lm, answer, None if config.zero_shot else config.lora_config())

    def score(batches: TokenBatches) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        probs = model.score(batches)  # ends with a device -> host copy: the time includes the device work
        seconds = time.perf_counter() - t0
        cost.inference_samples += batches.num_rows
        cost.inference_tokens += batches.num_tokens
        cost.inference_seconds += seconds
        return probs, seconds

    valid_metrics: dict[str, float] | None = None
    valid_probs: np.ndarray | None = None
    torch.manual_seed(seed)  # the adapter's initialisation (at attach) and LoRA dropout
    with model.attach():
        if config.zero_shot:
            fit = FitResult(0, None, False, [EpochRecord(0, None, 0.0, 0.0)])
            if len(valid_rows):
                valid_probs = score(valid_batches)[0]
                valid_metrics = ctr_metrics(valid_labels, valid_probs)
                fit.history[0].valid_auc = valid_metrics["auc"]
                fit.history[0].valid_logloss = valid_metrics["logloss"]
                fit.best_valid_auc = valid_metrics["auc"]
        else:
            fit, valid_metrics, valid_probs = _fine_tune(
                model, builder, train_rows, valid_batches, valid_labels, config, seed, cost, score, say
            )
        test_probs, test_seconds = score(test_batches)
        # The adapter leaves the LM with the context: keep what is saved at the end.
        adapter = None if config.zero_shot else (model.adapter, _lora_config_dict(model.lora_config))
    model.eval()
    test_labels = labels_all[test_rows]
    # Calibrated on validation like every CTR row (userip.ctr.calibration), from the LM's probabilities.
    calibration = IDENTITY
    if valid_probs is not None:
        calibration = fit_platt(probs_to_logits(valid_probs), valid_labels)
        valid_metrics = ctr_metrics(
            valid_labels, valid_probs, calibration.probs(probs_to_logits(valid_probs))
        )
        fit.calibration = calibration
    calibrated_test = calibration.probs(probs_to_logits(test_probs))
    result = ReLLaResult(
        model_name=name,
        with_profiles=False,
        seed=seed,
        valid=valid_metrics,
        test=ctr_metrics(test_labels, test_probs, calibrated_test),
        test_labels=test_labels,
        test_probs=calibrated_test,
        fit=fit,
        data=build_ctr_data(dataset, None),
        model=model,
        test_inference_samples_per_s=len(test_rows) / max(test_seconds, 1e-9),
        output_dir=out,
        offline_cost=cost,
        inference_seconds_per_10k=test_seconds / len(test_rows) * 10_000,
        valid_rows=valid_positions,
        answer_ids=answer,
    )
    log.info("%s: valid %s, test %s, cost %s", name, valid_metrics, result.test, cost.to_dict())
    if out is None:
        return result
    # The folder replaces an earlier one only now (atomic_dir): a failed run leaves it byte-identical.
    with atomic_dir(out) as folder:
        if adapter is not None:
            save_tensors(folder / ADAPTER_FILE, adapter[0], {"best_epoch": str(fit.best_epoch)})
            atomic_write_json(folder / ADAPTER_CONFIG_FILE, adapter[1])
        atomic_write_json(
            folder / "config.json",
            {
                "model": name,
                "rella": to_dict(config),
                "seed": seed,
                "dataset_hash": dataset.content_hash,
                "lm": lm.name,
                "lm_fingerprint": lm.fingerprint(),
                "answer_ids": dataclasses.asdict(answer),
                "valid_rows_scored": int(len(valid_rows)),
            },
        )
        atomic_write_json(folder / "metrics.json", result.metrics())
    return result


def _lora_config_dict(lora_config: Any) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}


def _fine_tune(
    model: ReLLaModel,
    builder: PromptBuilder,
    train_rows: np.ndarray,
    valid_batches: TokenBatches,
    valid_labels: np.ndarray,
    config: ReLLaConfig,
    seed: int,
    cost: OfflineCost,
    score: Any,
    say: Any,
) -> tuple[FitResult, dict[str, float] | None, np.ndarray | None]:
    """LoRA training inside ``model.attach()``; leaves the best epoch's adapter loaded and in
    ``model.adapter``. Returns the fit record, the chosen epoch's valid metrics and valid probabilities."""
    from peft import set_peft_model_state_dict

    lm = model.lm
    sampled = _sample(np.random.default_rng([seed, 1]), train_rows, config.num_train_samples)
    retrievals = ("recent", "semantic") if config.mixed else (config.retrieval,)
    token_ids: list[list[int]] = []
    for retrieval in retrievals:
        token_ids += builder.token_ids(sampled, retrieval)
    answer_ids = np.where(builder.labels[sampled] == 1, model.answer.yes, model.answer.no)
    targets = torch.from_numpy(np.tile(answer_ids, len(retrievals))).to(lm.device)

    # attach() made a fresh adapter (seeded by the caller); peft keeps it in float32 over a bf16 LM
    # (get_peft_model's autocast_adapter_dtype), so the optimiser updates float32 weights.
    peft_model = model._peft
    params = [p for p in lm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = math.ceil(len(token_ids) / config.batch_size) * config.max_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / steps))
    generator = torch.Generator().manual_seed(seed)
    has_valid = valid_batches.num_rows > 0
    history: list[EpochRecord] = []
    best_auc, best_epoch, best_state, best_metrics, best_probs = -math.inf, 0, None, None, None
    bad_epochs, stopped_early = 0, False
    for epoch in range(1, config.max_epochs + 1):
        start = time.perf_counter()
        train_loss, tokens = _train_epoch(
            model, token_ids, targets, optimizer, scheduler, params, config, generator
        )
        seconds = time.perf_counter() - start
        cost.train_samples += len(token_ids)
        cost.train_tokens += tokens
        cost.train_seconds += seconds
        record = EpochRecord(epoch, train_loss, seconds, len(token_ids) / max(seconds, 1e-9))
        history.append(record)
        if not has_valid:
            best_epoch, best_state = epoch, model.adapter_state()
            say("ReLLa epoch %d: train loss %.5f", epoch, train_loss)
            continue
        probs = score(valid_batches)[0]
        metrics = ctr_metrics(valid_labels, probs)
        record.valid_auc, record.valid_logloss = metrics["auc"], metrics["logloss"]
        improved = metrics["auc"] > best_auc
        mark = " *" if improved else ""
        say("ReLLa epoch %d: train loss %.5f, valid %s%s", epoch, train_loss, metrics, mark)
        if improved:
            best_auc, best_epoch, best_metrics, best_probs, bad_epochs = (
                metrics["auc"],
                epoch,
                metrics,
                probs,
                0,
            )
            best_state = model.adapter_state()
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                stopped_early = epoch < config.max_epochs
                break
    assert best_state is not None
    set_peft_model_state_dict(peft_model, best_state)
    model.adapter = best_state
    lm.model.eval()
    fit = FitResult(best_epoch, best_auc if has_valid else None, stopped_early, history)
    return fit, best_metrics, best_probs
