"""The paper's LLM baselines (issue 14), built on the project's CTR stage.

Public API::

    from userip.baselines import KARConfig, train_kar, load_text_lm

    lm = load_text_lm("smollm2")                      # or pass the spec string to train_kar
    result = train_kar(dataset, lm, KARConfig(), seed=0, cache_dir=...)   # a CTRResult + offline_cost
    result.test["auc"], result.offline_cost.to_dict()

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

__all__ = [
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
