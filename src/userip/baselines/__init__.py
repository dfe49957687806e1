"""The paper's LLM baselines (Table 2): KAR, PEPLER and ReLLa, built on the project's CTR stage.

Public API::

    from userip.baselines import KARConfig, PEPLERConfig, ReLLaConfig, load_text_lm
    from userip.baselines import train_kar, train_pepler, train_rella

    lm = load_text_lm("smollm2", dtype="bf16", device="cuda")     # or pass the spec string
    result = train_kar(dataset, lm, KARConfig(), seed=0, cache_dir=...)   # a CTRResult + offline_cost
    result = train_pepler(dataset, lm, PEPLERConfig(), seed=0)
    result = train_rella(dataset, lm, ReLLaConfig(zero_shot=False), seed=0, cache_dir=...)
    result.test["auc"], result.offline_cost.to_dict()

``userip.baselines.rows`` makes them rows of ``userip experiment``:
``llm_baselines: [kar, kar_nogen, pepler, rella, rella_zeroshot]``.

``userip.baselines.llm_text`` holds the LLM plumbing the baselines share: loading, fingerprinting, cached and
resumable generation, mean-pooled encoding, train-statistics standardisation, and the offline-cost record.
"""

from userip.baselines.kar import (
    HybridExpertAdaptor,
    KARConfig,
    KARModel,
    KARPrompts,
    KARResult,
    KnowledgeMode,
    KnowledgeTables,
    build_kar_data,
    build_knowledge,
    build_prompts,
    cache_adaptor,
    train_kar,
)
from userip.baselines.llm_text import (
    DecodingConfig,
    GenerationCache,
    OfflineCost,
    TextLM,
    encode_texts,
    generate_cached,
    load_text_lm,
    standardize,
)
from userip.baselines.pepler import PEPLERConfig, PEPLERModel, PEPLERResult, train_pepler
from userip.baselines.rella import ReLLaConfig, ReLLaModel, ReLLaResult, train_rella
from userip.baselines.rows import BASELINE_ROWS, BaselineConfigs

__all__ = [
    "BASELINE_ROWS",
    "BaselineConfigs",
    "PEPLERConfig",
    "PEPLERModel",
    "PEPLERResult",
    "ReLLaConfig",
    "ReLLaModel",
    "ReLLaResult",
    "cache_adaptor",
    "train_pepler",
    "train_rella",
    "DecodingConfig",
    "GenerationCache",
    "HybridExpertAdaptor",
    "KARConfig",
    "KARModel",
    "KARPrompts",
    "KARResult",
    "KnowledgeMode",
    "KnowledgeTables",
    "OfflineCost",
    "TextLM",
    "build_kar_data",
    "build_knowledge",
    "build_prompts",
    "encode_texts",
    "generate_cached",
    "load_text_lm",
    "standardize",
    "train_kar",
]
