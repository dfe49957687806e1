"""The LLM baselines as experiment rows (``userip.baselines.rows``) and KAR's cached adaptor for serving."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from userip.baselines.kar import (
    CachedKnowledgeEmbedding,
    KARConfig,
    KARModel,
    KnowledgeMode,
    build_kar_data,
    cache_adaptor,
)
from userip.baselines.pepler import PEPLERConfig
from userip.baselines.rella import ReLLaConfig
from userip.baselines.rows import (
    BASELINE_ROWS,
    BaselineConfigs,
    cell_key,
    changes_lm,
    lm_placement,
    row_config,
)

from .conftest import NUM_ITEMS, NUM_USERS


def test_each_row_fixes_its_own_setting_and_keeps_the_rest_of_its_section():
    configs = BaselineConfigs(kar=KARConfig(max_new_tokens=7), rella=ReLLaConfig(num_history_items=3))
    assert row_config("kar", configs).mode is KnowledgeMode.GENERATION
    assert row_config("kar_nogen", configs).mode is KnowledgeMode.NO_GENERATION
    assert row_config("kar_nogen", configs).max_new_tokens == 7
    assert row_config("rella_zeroshot", configs).zero_shot and not row_config("rella", configs).zero_shot
    assert row_config("rella", configs).num_history_items == 3
    assert isinstance(row_config("pepler", configs), PEPLERConfig)


def test_cell_key_holds_the_rows_section_but_not_where_it_runs(monkeypatch):
    # A cuda placement is validated against this machine's devices: pretend one GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    configs = BaselineConfigs()
    on_gpu = BaselineConfigs(pepler=dataclasses.replace(PEPLERConfig(), lm_device="cuda"))
    assert cell_key("pepler", configs, "smollm2") == cell_key("pepler", on_gpu, "smollm2")
    assert lm_placement("pepler", on_gpu) == ("fp32", "cuda")
    bf16 = BaselineConfigs(pepler=dataclasses.replace(PEPLERConfig(), lm_dtype="bf16"))
    assert cell_key("pepler", configs, "smollm2") != cell_key("pepler", bf16, "smollm2")
    assert cell_key("pepler", configs, "smollm2") != cell_key("pepler", configs, "offline")
    # Another row's section does not enter the key: changing ReLLa's settings keeps PEPLER's cells.
    other = BaselineConfigs(rella=ReLLaConfig(num_history_items=3))
    assert cell_key("pepler", configs, "smollm2") == cell_key("pepler", other, "smollm2")
    assert cell_key("rella", configs, "smollm2") != cell_key("rella", other, "smollm2")
    assert set(BASELINE_ROWS) == {"kar", "kar_nogen", "pepler", "rella", "rella_zeroshot"}


def test_only_pepler_with_train_lm_changes_the_shared_lm():
    assert not any(changes_lm(row, BaselineConfigs()) for row in BASELINE_ROWS)
    trained = BaselineConfigs(pepler=dataclasses.replace(PEPLERConfig(), train_lm=True))
    assert changes_lm("pepler", trained) and not changes_lm("rella", trained)


def test_cached_adaptor_gives_the_online_adaptors_scores(movie_dataset):
    data = build_kar_data(movie_dataset)
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(NUM_USERS, 12)), rng.normal(size=(NUM_ITEMS, 12))
    config = KARConfig(
        adaptor_output_dim=8, adaptor_hidden_dim=16, num_shared_experts=1, num_specific_experts=2
    )
    model = KARModel(
        data.feature_map, users, items, config, {"embedding_dim": 4, "hidden_units": (8,)}
    ).eval()
    cached = cache_adaptor(model)
    assert isinstance(cached.backbone.embedding, CachedKnowledgeEmbedding)
    assert model.backbone.embedding is not cached.backbone.embedding  # the trained model is left as it was
    x = data["test"].x_ids
    with torch.inference_mode():
        torch.testing.assert_close(cached(x), model(x), rtol=0, atol=1e-6)
        # Independent computation of one row: the user tower on that user's knowledge vector.
        u = int(x[0, -2])
        tower = model.backbone.embedding.adaptor.tower(0, model.backbone.embedding.user_knowledge[u : u + 1])
        torch.testing.assert_close(cached.backbone.embedding.user_vectors[u], tower[0])
    with pytest.raises(TypeError, match="already cached"):
        cache_adaptor(cached)
