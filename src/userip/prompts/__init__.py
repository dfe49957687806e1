"""Prompts for UserIP-Tuning: template with soft-token slots, targets, and the profile-isolating 4D mask.

Public API::

    spec = ProfileSpec(name, phrase, num_soft_tokens=1, codebook_size=4)
    config = PromptConfig(profiles=(...), task_description=..., target_mode="history", max_target_tokens=96)
    builder = PromptBuilder(tokenizer, config)          # tokenizes the fixed template once
    example = builder.build(target_text, user_id, slot_texts={"hobby": "comedy"})   # -> PromptExample
    example = builder.build_from_ids(target_ids, user_id)
    examples = build_examples(dataset, builder)         # -> ExampleSet (per user or per review)
    batch = collate([example, ...], builder.pad_token_id, config.template_sees_soft_tokens)  # -> PromptBatch
    mask = build_attention_mask(token_kinds, profile_index)  # (B, 1, L, L) additive float
"""

from userip.prompts.collate import PromptBatch, build_attention_mask, collate
from userip.prompts.targets import ExampleSet, build_examples
from userip.prompts.template import (
    IGNORE_INDEX,
    ProfileSpec,
    PromptBuilder,
    PromptConfig,
    PromptExample,
    TargetMode,
    TokenKind,
    default_profiles,
)

__all__ = [
    "IGNORE_INDEX",
    "ExampleSet",
    "ProfileSpec",
    "PromptBatch",
    "PromptBuilder",
    "PromptConfig",
    "PromptExample",
    "TargetMode",
    "TokenKind",
    "build_attention_mask",
    "build_examples",
    "collate",
    "default_profiles",
]
