"""KAR (Xi et al., "Towards Open-World Recommendation with Knowledge Augmentation from Large Language Models")
as a baseline: LLM-generated user and item knowledge, encoded, and fed to DCN through a hybrid-expert adaptor.

Steps (design note ``/work/shared/design/llm-baselines.md`` section 1, "minimal faithful version"):

1. *Factorization prompts*, one per user and one per item. A user prompt holds the user's observable
   features and their chronological history from the **training split only** (the most recent
   ``max_history_items``, each as ``"Title", k stars;``: stars are labels, so a valid/test row in a prompt
   would leak its label), then asks the LM to analyse the user's preferences over a fixed list of factors.
   An item prompt asks the LM to introduce the item by its title along the same factors.
2. *Generation* with a local instruct LM through its chat template, greedy, cached and resumable under a key
   holding the dataset's content hash (which covers the split), the LM's fingerprint, the prompt version and
   the decoding settings (``userip.baselines.llm_text``).
3. *Encoding* with the same LM (masked mean of its final hidden states; no BERT offline): user text = the
   prompt's feature-and-history part + ". " + the answer, item text = the answer (as KAR's
   ``lm_encoding.py``); each dimension standardised with the statistics of the users / items of the train
   split.
4. *Hybrid-expert adaptor* (``HybridExpertAdaptor``): per tower (user, item) shared and tower-specific expert
   MLPs mixed by a softmax gate, trained jointly with the CTR backbone (DCN) on BCE; its two output vectors
   enter DCN as extra dense inputs next to the field embeddings (``KARModel``).

``KnowledgeMode.NO_GENERATION`` is the "KAR without generation" ablation: nothing is generated, and the
encoder reads the user's feature-and-history text and the item's title alone, which separates what the LM's
text adds from what the encoder adds.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from userip.baselines.llm_text import (
    DecodingConfig,
    GenerationCache,
    OfflineCost,
    TextLM,
    cache_key,
    check_lm_placement,
    encode_cached,
    generate_cached,
    load_text_lm,
    standardize,
)
from userip.ctr.data import CTRData, SplitTensors, build_ctr_data
from userip.ctr.features import FeatureMap, Field, FieldSource
from userip.ctr.layers import FieldEmbedding
from userip.ctr.models import build_model, model_arguments
from userip.ctr.recipe import CTRResult, score_test
from userip.ctr.trainer import CTRTrainerConfig, Trainer, save_state_dict
from userip.data.schema import SPLITS, Dataset
from userip.utils.config import ConfigError, check_fields, choice, to_dict
from userip.utils.io import atomic_dir, atomic_write_json, user_cache_dir
from userip.utils.logging import get_logger
from userip.utils.seed import seed_everything

log = get_logger(__name__)

CACHE_FORMAT = 1
# KAR's factor list for movies (its ml-1m prompts); the user and the item prompt share it here.
MOVIE_FACTORS = (
    "genre",
    "director/actors",
    "time period/country",
    "character",
    "plot/theme",
    "mood/tone",
    "critical acclaim/award",
    "production quality",
    "soundtrack",
)
BACKBONES = ("dcn", "dcnv2")  # models whose only reader of x_ids is ``model.embedding`` (see KARModel)
USER_KNOWLEDGE_FIELD = "kar_user"
ITEM_KNOWLEDGE_FIELD = "kar_item"
IGNORED_USER_COLUMNS = ("user_id", "raw_user_id", "zip_code")  # KAR's prompts leave the zip code out


class KnowledgeMode(enum.Enum):
    GENERATION = "generation"  # KAR: encode the LM's generated knowledge
    NO_GENERATION = "no_generation"  # ablation: encode the prompt's facts (history, title) without generating


@dataclasses.dataclass
class KARConfig:
    """KAR's settings (keys equal constructor arguments). The CTR backbone's own arguments and the trainer's
    settings are separate (``train_kar``'s ``model_config`` and ``trainer_config``), as for ``train_ctr``.

    Prompt: ``item_noun`` names the domain's items ("movie"), ``factors`` the aspects the LM is asked about,
    ``max_history_items`` caps the history (KAR: 30); change ``prompt_version`` whenever the wording changes,
    so the cache is not reused. Decoding (greedy): ``max_new_tokens`` (design note: 256, 128 on a slow CPU),
    ``repetition_penalty``, ``generation_batch_size``. Encoding: ``encode_max_tokens`` (texts cut on the left,
    keeping the recent history and the answer), ``encode_batch_size``. Adaptor: experts are MLPs
    in -> ``adaptor_hidden_dim`` -> ``adaptor_output_dim`` (KAR: 128 -> 32), ``num_shared_experts`` shared by
    both towers plus ``num_specific_experts`` per tower (KAR: 2 and 6); ``adaptor_output_dim`` must be a
    multiple of the backbone's ``embedding_dim``. ``lm_dtype``/``lm_device`` apply when ``train_kar`` loads
    the LM from a spec string.
    """

    mode: KnowledgeMode = KnowledgeMode.GENERATION
    item_noun: str = "movie"
    factors: tuple[str, ...] = MOVIE_FACTORS
    max_history_items: int = 30
    prompt_version: str = "kar-v1"
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    generation_batch_size: int = 16
    encode_max_tokens: int = 1024
    encode_batch_size: int = 16
    backbone: str = "dcn"
    adaptor_output_dim: int = 32
    adaptor_hidden_dim: int = 128
    num_shared_experts: int = 2
    num_specific_experts: int = 6
    adaptor_dropout: float = 0.0
    lm_dtype: str = "fp32"
    lm_device: str = "cpu"

    def __post_init__(self) -> None:
        self.mode = choice(KnowledgeMode, self.mode, "KARConfig.mode")  # type: ignore[assignment]
        self.factors = tuple(self.factors)
        check_fields(
            self,
            positive_ints=(
                "max_history_items",
                "max_new_tokens",
                "generation_batch_size",
                "encode_max_tokens",
                "encode_batch_size",
                "adaptor_output_dim",
                "adaptor_hidden_dim",
            ),
            counts=("num_shared_experts", "num_specific_experts"),
            positive_numbers=("repetition_penalty",),
            fractions=("adaptor_dropout",),
            words=("item_noun", "prompt_version"),
            choices={"backbone": BACKBONES},
        )
        check_lm_placement(self)
        if self.num_shared_experts + self.num_specific_experts < 1:
            raise ConfigError(
                "KARConfig.num_specific_experts: the adaptor needs at least one expert per tower"
            )
        if not self.factors or not all(isinstance(f, str) and f.strip() for f in self.factors):
            raise ConfigError(f"KARConfig.factors must be non-empty strings, got {self.factors!r}")

    @property
    def decoding(self) -> DecodingConfig:
        return DecodingConfig(self.max_new_tokens, self.repetition_penalty, self.generation_batch_size)

    def prompt_key_fields(self) -> dict[str, Any]:
        return {
            "version": self.prompt_version,
            "item_noun": self.item_noun,
            "factors": list(self.factors),
            "max_history_items": self.max_history_items,
        }


# ---------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class KARPrompts:
    """Per user (index = user_id) and per item (index = item_id): the prompt for the LM, and the facts part
    that the encoder reads before the answer (user: features + history; item: the title)."""

    user_prompts: list[str]
    user_facts: list[str]
    item_prompts: list[str]
    item_facts: list[str]


def _factor_list(factors: Sequence[str]) -> str:
    return factors[0] if len(factors) == 1 else ", ".join(factors[:-1]) + ", and " + factors[-1]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _user_intro(features: Mapping[str, str], noun: str) -> str:
    """KAR's opening ("Given a female user who is aged 25 and a writer, ...") where the dataset has MovieLens'
    demographics; any other observable features are listed as "name: value"."""
    features = {k: v for k, v in features.items() if v}
    if {"gender", "age", "occupation"} <= set(features):
        gender = {"m": "male", "f": "female"}.get(features["gender"].lower(), features["gender"])
        occupation = features["occupation"]
        age = features["age"]
        who = f"{_article(gender)} {gender} user who is aged {age} and {_article(occupation)} {occupation}"
    elif features:
        who = "a user with " + ", ".join(f"{k}: {v}" for k, v in features.items())
    else:
        who = "a user"
    return f"Given {who}, this user's {noun} rating history over time is listed below."


def _stars(rating: float) -> str:
    if not math.isfinite(rating):  # implicit feedback: an observed item, no rating
        return ""
    value = int(rating) if float(rating).is_integer() else round(float(rating), 1)
    return f", {value} star" + ("" if value == 1 else "s")


def history_rows(dataset: Dataset) -> pd.DataFrame:
    """The rows user prompts may show: the profile rows (``Dataset.profile_rows``: the observed rows of the
    train split, or of the ``history`` split under a protocol that has one). Never valid or test rows."""
    rows = dataset.profile_rows()
    if rows["split"].isin(("valid", "test")).any():  # would leak labels: refuse rather than trust the schema
        raise ValueError("KAR prompts: the profile rows include valid/test interactions")
    return rows


def build_prompts(dataset: Dataset, config: KARConfig) -> KARPrompts:
    """KAR's factorization prompts for every user and item of ``dataset``."""
    noun, factors = config.item_noun, _factor_list(config.factors)
    titles = dataset.items["title"].fillna("").astype(str).to_numpy()
    rows = history_rows(dataset)
    # Chronological, ties in row order; keep each user's most recent max_history_items.
    order = np.lexsort((np.arange(len(rows)), rows["timestamp"].to_numpy(), rows["user_id"].to_numpy()))
    rows = rows.iloc[order]
    rows = rows.groupby("user_id", sort=False).tail(config.max_history_items)
    histories: dict[int, list[str]] = {}
    for user, item, rating in zip(
        rows["user_id"].to_numpy(),
        rows["item_id"].to_numpy(),
        rows["rating"].to_numpy(dtype=float),
        strict=True,
    ):
        histories.setdefault(int(user), []).append(f'"{titles[item]}"{_stars(rating)};')
    feature_columns = [c for c in dataset.users.columns if c not in IGNORED_USER_COLUMNS]
    users = dataset.users[feature_columns].fillna("").astype(str)
    instruction = (
        f"Analyze the user's preferences on {noun}s (consider factors like {factors}). Provide clear "
        f"explanations based on relevant details from the user's {noun} rating history and other pertinent "
        "factors."
    )
    user_facts, user_prompts = [], []
    for user in range(dataset.num_users):
        intro = _user_intro(users.iloc[user].to_dict() if feature_columns else {}, noun)
        history = " ".join(histories.get(user, [])) or "(no history yet)"
        facts = f"{intro}\n{history}"
        user_facts.append(facts)
        user_prompts.append(f"{facts}\n{instruction}")
    item_prompts = [
        f"Introduce {noun} {title} and describe its attributes (including but not limited to {factors})."
        for title in titles
    ]
    return KARPrompts(user_prompts, user_facts, item_prompts, list(titles))


# ---------------------------------------------------------------------------------------------- knowledge
@dataclasses.dataclass
class KnowledgeTables:
    """Encoded, standardised knowledge: ``user`` (num_users, H) and ``item`` (num_items, H) float32, plus the
    texts they encode and the prompts behind them (for audits: nothing from valid/test may appear)."""

    user: np.ndarray
    item: np.ndarray
    user_texts: list[str]
    item_texts: list[str]
    prompts: KARPrompts
    cache_folder: Path | None
    cost: OfflineCost


def default_cache_dir() -> Path:
    """``$USERIP_CACHE_DIR/baselines`` (default ``~/.cache/userip/baselines``): shared by runs, because the
    key already holds everything the cached texts depend on."""
    return user_cache_dir("baselines")


def generation_cache_key(dataset: Dataset, lm: TextLM, config: KARConfig) -> dict[str, Any]:
    """What the generated texts depend on: the split (the dataset's content hash covers the ``split`` column,
    so a cache built under another split, whose prompts may hold this split's test labels, is never reused),
    the LM, the prompt version and wording settings, and the decoding settings."""
    return {
        "baseline": "kar",
        "format": CACHE_FORMAT,
        "dataset": dataset.content_hash,
        "model": lm.fingerprint(),
        "prompt": config.prompt_key_fields(),
        "decoding": config.decoding.key_fields(),
    }


def build_knowledge(
    dataset: Dataset,
    lm: TextLM,
    config: KARConfig,
    cache_dir: str | os.PathLike[str] | None = None,
    cost: OfflineCost | None = None,
    progress: bool = False,
) -> KnowledgeTables:
    """Prompts -> (generation, cached) -> texts -> encoded and standardised tables (steps 1-3)."""
    cost = cost if cost is not None else OfflineCost()
    prompts = build_prompts(dataset, config)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder: Path | None = None
    if config.mode is KnowledgeMode.GENERATION:
        key_fields = generation_cache_key(dataset, lm, config)
        folder = root / f"kar-{cache_key(key_fields)[:20]}"
        cache = GenerationCache(folder, key_fields)
        asked = {f"user:{u}": p for u, p in enumerate(prompts.user_prompts)}
        asked.update({f"item:{i}": p for i, p in enumerate(prompts.item_prompts)})
        answers = generate_cached(lm, asked, config.decoding, cache, cost, progress)
        log.info("KAR generation: %d new, %d cached (%s)", cost.llm_calls, cost.cached_generations, folder)
        # KAR's lm_encoding.py: user = prompt up to its history + ". " + answer; item = the answer alone.
        user_texts = [
            f"{facts.rstrip(';')}. {answers[f'user:{u}']}" for u, facts in enumerate(prompts.user_facts)
        ]
        item_texts = [answers[f"item:{i}"] for i in range(dataset.num_items)]
    else:
        user_texts, item_texts = list(prompts.user_facts), list(prompts.item_facts)
    encode_folder = root / "encodings"
    args = (config.encode_max_tokens, config.encode_batch_size, cost)
    user = encode_cached(lm, user_texts, encode_folder, *args)  # (U, H)
    item = encode_cached(lm, item_texts, encode_folder, *args)  # (I, H)
    train = dataset.split("train")
    user = standardize(user, np.unique(train["user_id"].to_numpy()))
    item = standardize(item, np.unique(train["item_id"].to_numpy()))
    return KnowledgeTables(user, item, user_texts, item_texts, prompts, folder, cost)


# ---------------------------------------------------------------------------------------------- model
class HybridExpertAdaptor(nn.Module):
    """KAR's hybrid-expert adaptor (HEA): two towers (user, item); each mixes the shared experts and its own
    specific experts with a softmax gate over its input. Experts: MLP in -> hidden -> out (ReLU between).
    Each tower reads only its own vector, so after training its output can be pre-computed per user / item.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int = 32,
        hidden_dim: int = 128,
        num_shared: int = 2,
        num_specific: int = 6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        def expert() -> nn.Module:
            return nn.Sequential(
                nn.Linear(input_dim, hidden_dim),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, output_dim),
            )

        self.shared = nn.ModuleList(expert() for _ in range(num_shared))
        self.specific = nn.ModuleList(nn.ModuleList(expert() for _ in range(num_specific)) for _ in range(2))
        self.gates = nn.ModuleList(nn.Linear(input_dim, num_shared + num_specific) for _ in range(2))
        self.output_dim = output_dim

    def tower(self, which: int, x: torch.Tensor) -> torch.Tensor:
        """x (B, H) -> (B, output_dim); ``which`` 0 = user tower, 1 = item tower."""
        experts = [e(x) for e in self.shared] + [e(x) for e in self.specific[which]]
        stacked = torch.stack(experts, dim=1)  # (B, E, out)
        gate = torch.softmax(self.gates[which](x), dim=-1).unsqueeze(-1)  # (B, E, 1)
        return (gate * stacked).sum(dim=1)

    def forward(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> torch.Tensor:
        """user_vec, item_vec (B, H) -> (B, 2, output_dim)."""
        return torch.stack([self.tower(0, user_vec), self.tower(1, item_vec)], dim=1)


class KnowledgeAugmentedEmbedding(nn.Module):
    """The backbone's field embedding, extended with KAR's vectors: x_ids (B, F + 2), whose last two columns
    are ``user_id + 1`` and ``item_id + 1`` (0: unknown, a zero knowledge vector), -> (B, F + 2k, D) where
    the adaptor's two d-wide outputs are cut into k = d / D pieces. A backbone that flattens its embeddings
    (DCN, DCNv2) thus reads ``[field embeddings, user vector, item vector]``: the vectors are extra dense
    inputs, exactly as concatenated."""

    def __init__(
        self,
        fields: FieldEmbedding,
        user_table: torch.Tensor,
        item_table: torch.Tensor,
        adaptor: HybridExpertAdaptor,
    ) -> None:
        super().__init__()
        self.fields = fields
        self.adaptor = adaptor
        # Buffers: fixed inputs that move with .to(device) and are saved with the model (self-contained).
        self.register_buffer("user_knowledge", user_table)  # (U + 1, H)
        self.register_buffer("item_knowledge", item_table)  # (I + 1, H)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        base = self.fields(x_ids[:, :-2])  # (B, F, D)
        vectors = self.adaptor(
            self.user_knowledge[x_ids[:, -2]], self.item_knowledge[x_ids[:, -1]]
        )  # (B, 2, d)
        return torch.cat([base, vectors.reshape(base.shape[0], -1, base.shape[-1])], dim=1)


class CachedKnowledgeEmbedding(nn.Module):
    """``KnowledgeAugmentedEmbedding`` after training, for serving: each tower's output is pre-computed per
    user and per item (a tower reads only its own vector), so a request looks two d-wide rows up instead of
    running 2 x (shared + specific) expert MLPs over 576-wide vectors. Equal outputs in eval mode."""

    def __init__(
        self, fields: FieldEmbedding, user_vectors: torch.Tensor, item_vectors: torch.Tensor
    ) -> None:
        super().__init__()
        self.fields = fields
        self.register_buffer("user_vectors", user_vectors)  # (U + 1, d)
        self.register_buffer("item_vectors", item_vectors)  # (I + 1, d)

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        base = self.fields(x_ids[:, :-2])  # (B, F, D)
        vectors = torch.stack(
            [self.user_vectors[x_ids[:, -2]], self.item_vectors[x_ids[:, -1]]], dim=1
        )  # (B, 2, d)
        return torch.cat([base, vectors.reshape(base.shape[0], -1, base.shape[-1])], dim=1)


def cache_adaptor(model: KARModel) -> KARModel:
    """A copy of a trained ``KARModel`` (eval mode) whose adaptor outputs are looked up, not computed:
    KAR's deployment, where the knowledge and its adapted vectors are stored ahead of time."""
    embedding = model.backbone.embedding
    if not isinstance(embedding, KnowledgeAugmentedEmbedding):
        raise TypeError("cache_adaptor: the model's adaptor is already cached")
    cached = copy.deepcopy(model).eval()
    with torch.inference_mode():
        user_vectors = embedding.adaptor.tower(0, embedding.user_knowledge).clone()  # (U + 1, d)
        item_vectors = embedding.adaptor.tower(1, embedding.item_knowledge).clone()  # (I + 1, d)
    cached.backbone.embedding = CachedKnowledgeEmbedding(
        cached.backbone.embedding.fields, user_vectors, item_vectors
    )
    return cached


def _with_unknown_row(table: np.ndarray) -> torch.Tensor:
    """(N, H) -> (N + 1, H) float32 tensor with a zero row 0 (the mean, after standardisation)."""
    return torch.from_numpy(
        np.concatenate([np.zeros((1, table.shape[1]), np.float32), table]).astype(np.float32)
    )


class KARModel(nn.Module):
    """A CTR model (``forward(x_ids (B, F + 2)) -> logits (B,)``) made of a zoo backbone whose field embedding
    is replaced by ``KnowledgeAugmentedEmbedding``. ``feature_map`` is the x_ids contract: the base fields,
    then ``kar_user`` and ``kar_item`` (user/item id + 1). The backbone itself is built over the base fields
    plus 2k placeholder fields, so its cross/deep input width is F * D + 2 * d."""

    def __init__(
        self,
        feature_map: FeatureMap,
        user_table: np.ndarray,
        item_table: np.ndarray,
        config: KARConfig,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        names = feature_map.names
        if names[-2:] != [USER_KNOWLEDGE_FIELD, ITEM_KNOWLEDGE_FIELD]:
            raise ValueError(f"KARModel: the feature map must end with the knowledge fields; got {names}")
        model_config = dict(model_config or {})
        dim = {**model_arguments(config.backbone), **model_config}["embedding_dim"]
        if config.adaptor_output_dim % dim:
            raise ConfigError(
                f"KARConfig.adaptor_output_dim ({config.adaptor_output_dim}) must be a multiple of the "
                f"backbone's embedding_dim ({dim})"
            )
        pieces = config.adaptor_output_dim // dim
        base_fields = feature_map.fields[:-2]
        placeholders = tuple(
            Field(f"{tower}_{j}", 2, source)
            for tower, source in (
                (USER_KNOWLEDGE_FIELD, FieldSource.USER),
                (ITEM_KNOWLEDGE_FIELD, FieldSource.ITEM),
            )
            for j in range(pieces)
        )
        self.feature_map = feature_map
        self.backbone = build_model(config.backbone, FeatureMap(base_fields + placeholders), **model_config)
        adaptor = HybridExpertAdaptor(
            user_table.shape[1],
            config.adaptor_output_dim,
            config.adaptor_hidden_dim,
            config.num_shared_experts,
            config.num_specific_experts,
            config.adaptor_dropout,
        )
        fields = FieldEmbedding([f.vocab_size for f in base_fields], dim)
        self.backbone.embedding = KnowledgeAugmentedEmbedding(
            fields, _with_unknown_row(user_table), _with_unknown_row(item_table), adaptor
        )

    @property
    def adaptor(self) -> HybridExpertAdaptor:
        return self.backbone.embedding.adaptor

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The field embedding tables (the trainer's embedding weight decay applies to them only)."""
        return self.backbone.embedding_parameters()

    def forward(self, x_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(x_ids)  # (B,) logits


def build_kar_data(dataset: Dataset, user_features: Sequence[str] = ()) -> CTRData:
    """The project's CTR tensors (``build_ctr_data``) with two columns appended: ``user_id + 1`` and
    ``item_id + 1``, the rows of the knowledge tables (``KARModel``'s x_ids contract)."""
    data = build_ctr_data(dataset, None, user_features)
    inter = dataset.interactions
    fields = data.feature_map.fields + (
        Field(USER_KNOWLEDGE_FIELD, dataset.num_users + 1, FieldSource.USER),
        Field(ITEM_KNOWLEDGE_FIELD, dataset.num_items + 1, FieldSource.ITEM),
    )
    splits = {}
    for name in SPLITS:
        if name not in data.splits:
            continue
        rows = inter[inter["split"] == name]  # the same rows, in the same order, as build_ctr_data's
        extra = np.stack(
            [rows["user_id"].to_numpy(np.int64) + 1, rows["item_id"].to_numpy(np.int64) + 1], axis=1
        )
        tensors = data.splits[name]
        splits[name] = SplitTensors(
            torch.cat([tensors.x_ids, torch.from_numpy(extra)], dim=1), tensors.labels
        )
    return CTRData(FeatureMap(fields), data.encoder, splits)


# ---------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class KARResult(CTRResult):
    """A ``CTRResult`` (model name ``kar`` or ``kar-nogen``) plus what the offline LLM work cost."""

    offline_cost: OfflineCost = dataclasses.field(default_factory=OfflineCost)
    knowledge: KnowledgeTables | None = None

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "offline_cost": self.offline_cost.to_dict()}


def train_kar(
    dataset: Dataset,
    lm: TextLM | str,
    config: KARConfig | None = None,
    seed: int = 0,
    *,
    trainer_config: CTRTrainerConfig | None = None,
    model_config: Mapping[str, Any] | None = None,
    user_features: Sequence[str] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> KARResult:
    """Build (or reuse) KAR's knowledge for ``dataset`` with ``lm``, then train the adaptor and the backbone
    jointly with the project's trainer (BCE, early stopping on **validation** AUC) and evaluate on test.

    ``lm``: a loaded ``TextLM`` or an ``--lm`` spec (``smollm2`` by default in the CLI), loaded with
    ``config.lm_dtype``/``lm_device``. ``seed`` seeds the model and the trainer. ``cache_dir``: where
    generations and encodings are kept (default ``default_cache_dir()``). With ``output_dir``, writes
    ``model.safetensors`` (best checkpoint), ``config.json`` and, last, ``metrics.json``.
    """
    config = config or KARConfig()
    trainer_config = dataclasses.replace(trainer_config or CTRTrainerConfig(), seed=seed)
    model_config = dict(model_config or {})
    if isinstance(lm, str):
        lm = load_text_lm(lm, dataset=dataset, dtype=config.lm_dtype, device=config.lm_device)
    if not isinstance(lm, TextLM):
        raise TypeError(f"lm must be a TextLM or an --lm spec string, got {type(lm).__name__}")
    name = "kar" if config.mode is KnowledgeMode.GENERATION else "kar-nogen"
    out = Path(output_dir) if output_dir is not None else None  # written only once everything succeeded

    knowledge = build_knowledge(dataset, lm, config, cache_dir, progress=progress)
    data = build_kar_data(dataset, user_features)
    if "train" not in data.splits or "test" not in data.splits:
        raise ValueError(f"dataset needs train and test interactions; has splits {sorted(data.splits)}")
    seed_everything(seed)
    model = KARModel(data.feature_map, knowledge.user, knowledge.item, config, model_config)
    trainer = Trainer(model, trainer_config)
    valid = data.splits.get("valid")
    fit = trainer.fit(data["train"], valid)  # the best weights are restored in memory, saved at the end
    valid_metrics = trainer.evaluate(valid) if valid is not None else None
    result = KARResult(
        model_name=name,
        with_profiles=False,
        seed=seed,
        valid=valid_metrics,
        fit=fit,
        data=data,
        model=trainer.model,
        output_dir=out,
        **score_test(
            trainer.model,
            data["test"],
            trainer_config.eval_batch_size,
            trainer.device,
            trainer.calibration,
        ),
        offline_cost=knowledge.cost,
        knowledge=knowledge,
    )
    log.info("%s: valid %s, test %s, offline %s", name, valid_metrics, result.test, knowledge.cost.to_dict())
    if out is None:
        return result
    # The folder replaces an earlier one only now (atomic_dir): a failed run leaves it byte-identical.
    with atomic_dir(out) as folder:
        save_state_dict(
            trainer.model.state_dict(), folder / "model.safetensors", {"epoch": str(fit.best_epoch)}
        )
        atomic_write_json(
            folder / "config.json",
            {
                "model": name,
                "kar": to_dict(config),
                "backbone_config": {**model_arguments(config.backbone), **model_config},
                "trainer": to_dict(trainer_config),
                "dataset_hash": dataset.content_hash,
                "lm": lm.name,
                "lm_fingerprint": lm.fingerprint(),
                "cache_folder": None if knowledge.cache_folder is None else str(knowledge.cache_folder),
            },
        )
        atomic_write_json(folder / "metrics.json", result.metrics())
    return result
