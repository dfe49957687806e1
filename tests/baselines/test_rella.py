"""ReLLa on the tiny synthetic movie set with tiny LMs built from a config: leakage, retrieval, truncation,
padded scoring, LoRA training that leaves the base LM untouched, zero-shot, config errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from userip.baselines.llm_text import TextLM, chat_text
from userip.baselines.rella import (
    ADAPTER_FILE,
    HistoryIndex,
    PromptBuilder,
    ReLLaConfig,
    ReLLaModel,
    ReLLaResult,
    answer_token_ids,
    item_texts,
    make_batches,
    semantic_item_embeddings,
    train_rella,
)
from userip.ctr.calibration import probs_to_logits
from userip.data.schema import Dataset
from userip.utils.config import ConfigError, from_dict

from .conftest import make_movie_dataset, make_tiny_lm

RELLA_WORDS = (
    "Given a female male user who is aged and a engineer writer, this user's movie rating history over time "
    "is listed below. Based on the movies this user has rated, deduce whether the user will like the movie. "
    "Note that the more stars the user gave a movie, the more the user liked the movie. You should ONLY tell "
    "me yes or no. Here is a movie. Its title is Film. Its genre is comedy drama. (5 stars) (2 stars) "
    "user assistant\nYes\nNo\n"
)
FAST = dict(
    num_history_items=4,
    num_train_samples=48,
    batch_size=16,
    eval_batch_size=32,
    max_epochs=2,
    patience=2,
    pca_dim=8,
    lr=0.01,
    max_valid_rows=48,
)


def make_rella_lm(dataset: Dataset, dtype: str = "fp32", seed: int = 0) -> TextLM:
    """conftest's tiny LM over a tokenizer that also knows ReLLa's prompt words, so that "Yes" and "No" are
    single tokens and prompts stay short."""
    return make_tiny_lm(
        dataset, seed, [RELLA_WORDS] * 20, vocab_size=600, dtype=dtype, name=f"tiny-rella-{dtype}"
    )


def tied_dataset() -> Dataset:
    """The tiny set with timestamps that tie in pairs (ML-100K has many equal timestamps)."""
    ds = make_movie_dataset(seed=1)
    inter = ds.interactions.copy()
    inter["timestamp"] = 1000 + (inter["timestamp"] - 1000) // 2
    out = Dataset(inter, ds.items, ds.users, source="tiny-tied")
    out.validate()
    return out


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return tied_dataset()


@pytest.fixture(scope="module")
def lm(dataset) -> TextLM:
    return make_rella_lm(dataset)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    table = np.random.default_rng(seed).normal(size=(n, d))
    return (table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float32)


def independent_pool(dataset: Dataset, row: int) -> pd.DataFrame:
    """The pool recomputed with pandas: the user's train rows strictly before the target, not its item,
    in (timestamp, row) order."""
    inter = dataset.interactions.reset_index(drop=True)
    target = inter.iloc[row]
    pool = inter[
        (inter["user_id"] == target["user_id"])
        & (inter["split"] == "train")
        & (inter["timestamp"] < target["timestamp"])
        & (inter["item_id"] != target["item_id"])
    ]
    return pool.assign(_row=pool.index).sort_values(["timestamp", "_row"], kind="stable")


def builder_for(dataset, lm, embeddings=None, **overrides) -> PromptBuilder:
    config = ReLLaConfig(**{**FAST, **overrides})
    return PromptBuilder(dataset, config, HistoryIndex(dataset, embeddings), lm.tokenizer)


def base_snapshot(lm: TextLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_base_unchanged(lm: TextLM, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype
        assert torch.equal(after[key], value), key  # bit-identical
    assert not any("lora" in name for name, _ in lm.model.named_modules())
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_history_items", 0),
        ("retrieval", "simple"),
        ("mixed", "yes"),
        ("num_train_samples", -1),
        ("zero_shot", 1),
        ("lora_r", 0),
        ("lora_alpha", 0.0),
        ("lora_dropout", 1.0),
        ("lora_target_modules", ()),
        ("lora_target_modules", "q_proj"),
        ("lr", float("nan")),
        ("max_epochs", 0),
        ("patience", 0),
        ("batch_size", 1.5),
        ("eval_batch_size", True),
        ("max_valid_rows", 0),
        ("max_prompt_tokens", 0),
        ("pca_dim", 0),
        ("item_noun", " "),
        ("prompt_version", ""),
        ("lm_dtype", "fp16"),
        ("lm_device", ""),
    ],
)
def test_config_errors_name_the_field(key, value):
    with pytest.raises(ConfigError, match=rf"ReLLaConfig\.{key}"):
        ReLLaConfig(**{key: value})


def test_config_from_dict_and_defaults():
    config = from_dict(ReLLaConfig, {"lora_alpha": 16, "max_valid_rows": None, "retrieval": "recent"})
    assert config.lora_alpha == 16.0 and config.max_valid_rows is None and config.retrieval == "recent"
    default = ReLLaConfig()
    assert (default.num_history_items, default.lora_r, default.lora_target_modules) == (
        10,
        8,
        ("q_proj", "v_proj"),
    )
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ReLLaConfig, {"K": 5})


# ------------------------------------------------------------------------------------------ answer ids
def test_answer_token_ids_follow_the_generation_prompt(lm):
    answer = answer_token_ids(lm.tokenizer)
    assert answer.yes != answer.no
    tok = lm.tokenizer
    prompt = chat_text(tok, "anything")
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok(prompt + "Yes", add_special_tokens=False).input_ids[len(ids)] == answer.yes
    assert tok.decode([answer.yes]).strip().lower() == "yes"
    assert tok.decode([answer.no]).strip().lower() == "no"


# ------------------------------------------------------------------------------------------ leakage
def planted_dataset() -> Dataset:
    """The tied set plus two items that occur once each: in a valid row and in a test row of user 0, with
    ratings (3.7, 1.3) found nowhere else."""
    ds = tied_dataset()
    items = pd.concat(
        [
            ds.items,
            pd.DataFrame(
                {
                    "item_id": [len(ds.items), len(ds.items) + 1],
                    "raw_item_id": ["leak-v", "leak-t"],
                    "title": ["Zzleakvalid Secret", "Zzleaktest Secret"],
                    "categories": [["comedy"], ["drama"]],
                    "brand": "",
                    "price": np.nan,
                }
            ),
        ],
        ignore_index=True,
    )
    inter = ds.interactions.copy()
    for split, item, rating in (("valid", len(ds.items), 3.7), ("test", len(ds.items) + 1, 1.3)):
        row = inter.index[(inter["user_id"] == 0) & (inter["split"] == split)][0]
        inter.loc[row, ["item_id", "rating"]] = [item, rating]
    out = Dataset(inter, items, ds.users, source="tiny-planted")
    out.validate()
    return out


def test_no_valid_or_test_row_reaches_any_prompt(lm):
    ds = planted_dataset()
    emb = unit_rows(ds.num_items, 6)
    builder = builder_for(ds, lm, emb, num_history_items=20)
    split = ds.interactions["split"].to_numpy()
    items = ds.interactions["item_id"].to_numpy()
    planted = {ds.num_items - 2: "zzleakvalid", ds.num_items - 1: "zzleaktest"}
    checked = 0
    for name in ("train", "valid", "test"):
        rows = np.flatnonzero(split == name)
        for retrieval in ("semantic", "recent"):
            messages = builder.messages(rows, retrieval)
            for row, message in zip(rows, messages, strict=True):
                text = message.lower()
                assert "3.7 stars" not in text and "1.3 stars" not in text
                for item, title in planted.items():
                    # the planted title appears only as its own row's target, once, never in a history
                    assert text.count(title) == (1 if items[row] == item else 0)
                    if items[row] == item:
                        assert f"***{title} secret***" in text
                checked += 1
            if name != "train":  # the token ids hold the same prompts
                decoded = [lm.tokenizer.decode(ids) for ids in builder.token_ids(rows, retrieval)]
                for row, text in zip(rows, decoded, strict=True):
                    assert ("zzleak" in text) == (items[row] in planted)
    assert checked == 2 * len(split)


@pytest.mark.parametrize("retrieval", ["semantic", "recent"])
def test_history_is_strictly_earlier_train_rows_without_the_target(dataset, retrieval):
    index = HistoryIndex(dataset, unit_rows(dataset.num_items, 6))
    inter = dataset.interactions.reset_index(drop=True)
    k = 5
    ties_seen = 0
    for row in range(len(inter)):  # every row of every split
        target = inter.iloc[row]
        history = index.rows[index.retrieve(target.user_id, target.item_id, target.timestamp, retrieval, k)]
        pool = independent_pool(dataset, row)
        shown = inter.iloc[history]
        assert (shown["split"] == "train").all()
        assert (shown["user_id"] == target.user_id).all()
        assert (shown["timestamp"] < target.timestamp).all()
        assert (shown["item_id"] != target.item_id).all()
        assert row not in set(history)
        assert set(history) <= set(pool["_row"])
        assert len(history) == min(k, len(pool))
        if retrieval == "recent":
            assert sorted(history) == sorted(pool["_row"].to_numpy()[-k:])
        same_time = inter[(inter.user_id == target.user_id) & (inter.timestamp == target.timestamp)]
        ties_seen += int(len(same_time) > 1 and target.split == "train")
    assert ties_seen > 0  # the tied set does exercise the strict '<'


# ------------------------------------------------------------------------------------------ retrieval
def test_semantic_top_k_matches_brute_force_and_is_listed_in_time_order(dataset, lm):
    emb = unit_rows(dataset.num_items, 5, seed=3)
    k = 3
    builder = builder_for(dataset, lm, emb, num_history_items=k)
    index = builder.index
    inter = dataset.interactions.reset_index(drop=True)
    titles = dataset.items["title"].tolist()
    for row in np.flatnonzero(inter["split"].isin(["valid", "test"]).to_numpy())[:24]:
        pool = independent_pool(dataset, row)
        target_item = int(inter.loc[row, "item_id"])
        sims = [float(np.dot(emb[int(i)], emb[target_item])) for i in pool["item_id"]]
        brute = [r for _, r in sorted(zip(sims, pool["_row"]), key=lambda x: -x[0])[:k]]
        history = builder.history(int(row), "semantic")
        assert sorted(index.rows[history]) == sorted(brute)
        # the prompt lists them in time order
        in_time = inter.iloc[sorted(brute)].sort_values("timestamp", kind="stable")
        message = builder.message(int(row), history)
        lines = [line for line in message.split("\n") if line[:1].isdigit()]
        expected = [
            f"{n}. {titles[i]} ({int(r)} stars)"
            for n, (i, r) in enumerate(zip(in_time["item_id"], in_time["rating"]), start=1)
        ]
        assert lines == expected


def test_item_texts_and_semantic_embeddings(dataset, lm, tmp_path):
    texts = item_texts(dataset, "movie")
    assert texts[0] == "Here is a movie. Its title is Film A (1990). Its genre is comedy."
    config = ReLLaConfig(**{**FAST, "pca_dim": 512})
    table = semantic_item_embeddings(dataset, lm, config, tmp_path)
    assert table.shape == (dataset.num_items, min(16, dataset.num_items))  # capped at hidden size
    np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)
    assert list((tmp_path / "encodings").glob("encoded-*.npy"))  # cached


# ------------------------------------------------------------------------------------------ truncation
def test_truncation_drops_history_never_the_answer_position(lm):
    ds = tied_dataset()
    emb = unit_rows(ds.num_items, 6)
    tok = lm.tokenizer
    row = int(np.flatnonzero(ds.interactions["split"].to_numpy() == "test")[0])
    full = builder_for(ds, lm, emb, num_history_items=50, max_prompt_tokens=4096)
    history = full.history(row, "semantic")
    assert len(history) >= 6
    n_tokens = [
        len(tok(chat_text(tok, full.message(row, history[:n])), add_special_tokens=False).input_ids)
        for n in range(len(history) + 1)
    ]
    limit = n_tokens[2] + 1  # room for the 2 most relevant items only
    small = builder_for(ds, lm, emb, num_history_items=50, max_prompt_tokens=limit)
    ids = small.token_ids([row], "semantic")[0]
    assert len(ids) == n_tokens[2] <= limit
    suffix = tok(chat_text(tok, "x"), add_special_tokens=False).input_ids[-3:]  # "...</s>\n<s>assistant\n"
    assert ids[-3:] == suffix  # the prompt still ends where the answer starts
    kept = tok(chat_text(tok, small.message(row, history[:2])), add_special_tokens=False).input_ids
    assert ids == kept  # the two most similar items, in time order
    untouched = small.token_ids([row], "recent")  # other rows/retrievals: same rule
    assert len(untouched[0]) <= limit
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        builder_for(ds, lm, emb, max_prompt_tokens=n_tokens[0] - 1).token_ids([row], "semantic")


# ------------------------------------------------------------------------------------------ scoring
def one_row_probability(lm: TextLM, ids: list[int], yes: int, no: int) -> float:
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return float(torch.softmax(logits[[no, yes]], dim=-1)[1])


def test_batched_padded_scores_equal_unpadded_one_row_scores(dataset, lm):
    builder = builder_for(dataset, lm, unit_rows(dataset.num_items, 6))
    rows = np.flatnonzero(dataset.interactions["split"].to_numpy() != "train")[:40]
    token_ids = builder.token_ids(rows, "semantic")
    # cut a different middle part out of each prompt: lengths differ well within a batch
    token_ids = [t[: len(t) - 10 - (j * 7) % 60] + t[-10:] for j, t in enumerate(token_ids)]
    assert len({len(t) for t in token_ids}) > 5
    answer = answer_token_ids(lm.tokenizer)
    batches = make_batches(token_ids, 16, lm.pad_token_id, lm.device)
    assert any(int(l.min()) < ids.shape[1] for ids, l, _ in batches.batches)  # padding did happen
    model = ReLLaModel(lm, answer)
    probs = model.score(batches)
    expected = [one_row_probability(lm, ids, answer.yes, answer.no) for ids in token_ids]
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert ((probs > 0) & (probs < 1)).all()

    # and with a (non-trivial) LoRA adapter attached, the same agreement
    before = base_snapshot(lm)
    lora = ReLLaModel(lm, answer, ReLLaConfig().lora_config())
    torch.manual_seed(0)
    with lora.attach():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.5)
        lora.adapter = lora.adapter_state()
        with_adapter = lora.score(batches)
        expected = [one_row_probability(lm, ids, answer.yes, answer.no) for ids in token_ids]
    np.testing.assert_allclose(with_adapter, expected, atol=1e-5, rtol=0)
    assert np.abs(with_adapter - probs).max() > 1e-4
    assert_base_unchanged(lm, before)
    np.testing.assert_allclose(lora.predict(batches), with_adapter, atol=1e-6)  # re-attaches by itself
    with pytest.raises(RuntimeError, match="attach"):
        lora(*batches.batches[0][:2])
    assert_base_unchanged(lm, before)


# ------------------------------------------------------------------------------------------ recipe
def valid_and_test_batches(result: ReLLaResult, dataset, lm, tmp_path):
    config = ReLLaConfig(**FAST)
    emb = semantic_item_embeddings(dataset, lm, config, tmp_path)
    builder = PromptBuilder(dataset, config, HistoryIndex(dataset, emb), lm.tokenizer)
    split = dataset.interactions["split"].to_numpy()
    valid_rows = np.flatnonzero(split == "valid")[result.valid_rows]
    make = lambda rows: make_batches(builder.token_ids(rows, "semantic"), 32, lm.pad_token_id, lm.device)  # noqa: E731
    return make(valid_rows), make(np.flatnonzero(split == "test")), split[split == "valid"].size


def test_lora_training_selects_on_validation_and_leaves_the_base_lm(dataset, lm, tmp_path):
    before = base_snapshot(lm)
    fingerprint = lm.fingerprint()
    config = ReLLaConfig(**{**FAST, "max_epochs": 3, "patience": 3})
    result = train_rella(dataset, lm, config, seed=0, cache_dir=tmp_path, output_dir=tmp_path / "out")
    assert_base_unchanged(lm, before)
    from userip.baselines.llm_text import model_fingerprint

    assert model_fingerprint(lm.model, lm.tokenizer) == fingerprint

    # LoRA weights were trained (lora_B starts at zero) and are kept in float32
    adapter = result.model.adapter
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())

    # the chosen epoch is the first best validation AUC, and the model holds that epoch's adapter
    fit = result.fit
    aucs = [r.valid_auc for r in fit.history]
    assert len(fit.history) == 3 and all(r.train_loss is not None for r in fit.history)
    assert fit.best_epoch == 1 + int(np.argmax(aucs)) and fit.best_valid_auc == max(aucs)
    best = fit.history[fit.best_epoch - 1]
    # Calibrated on validation like every CTR row: AUC unchanged, the raw Logloss kept, the NLL no higher.
    assert result.valid["auc"] == best.valid_auc and result.valid["logloss_raw"] == best.valid_logloss
    assert result.valid["logloss"] <= best.valid_logloss + 1e-9
    valid_batches, test_batches, n_valid = valid_and_test_batches(result, dataset, lm, tmp_path)
    assert len(result.valid_rows) == min(FAST["max_valid_rows"], n_valid)
    valid_labels = dataset.split("valid")["label"].to_numpy()[result.valid_rows]
    from userip.evaluation.metrics import auc

    assert auc(valid_labels, result.model.predict(valid_batches)) == pytest.approx(best.valid_auc, abs=1e-6)
    raw_test = result.model.predict(test_batches)
    calibrated = result.fit.calibration.probs(probs_to_logits(raw_test))
    np.testing.assert_allclose(calibrated, result.test_probs, atol=1e-6)
    assert_base_unchanged(lm, before)

    # the CTRResult contract
    test = dataset.split("test")
    np.testing.assert_array_equal(result.test_labels, test["label"].to_numpy(np.float32))
    assert result.test_probs.dtype == np.float32 and len(result.test_probs) == len(test)
    assert result.model_name == "rella" and not result.model.training
    assert len(result.data.splits["test"]) == len(test)
    cost = result.offline_cost
    passes = 2 * FAST["num_train_samples"]  # mixed
    assert cost.train_samples == 3 * passes and cost.train_tokens > 0 and cost.train_seconds > 0
    assert cost.inference_samples == 3 * len(result.valid_rows) + len(test)
    assert cost.encoded_texts == dataset.num_items and cost.device
    assert result.inference_seconds_per_10k > 0

    # outputs: the adapter only (peft names), config, metrics last
    out = tmp_path / "out"
    from safetensors.torch import load_file

    saved = load_file(out / ADAPTER_FILE)
    assert set(saved) == set(adapter) and all("lora_" in k for k in saved)
    assert all(torch.equal(saved[k], adapter[k].cpu()) for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "rella" and metrics["best_epoch"] == fit.best_epoch
    assert metrics["offline_cost"]["train_samples"] == cost.train_samples
    assert json.loads((out / "config.json").read_text())["rella"]["num_history_items"] == 4


def test_zero_shot_scores_valid_and_test(dataset, lm, tmp_path):
    before = base_snapshot(lm)
    config = ReLLaConfig(**{**FAST, "zero_shot": True, "retrieval": "recent", "max_valid_rows": None})
    result = train_rella(dataset, lm, config, seed=1, cache_dir=tmp_path, output_dir=tmp_path / "zs")
    assert_base_unchanged(lm, before)
    assert result.model_name == "rella-zeroshot" and result.model.adapter == {}
    assert ((result.test_probs > 0) & (result.test_probs < 1)).all()
    assert len(result.test_probs) == len(dataset.split("test"))
    assert result.fit.best_epoch == 0 and len(result.fit.history) == 1
    record = result.fit.history[0]
    assert record.train_loss is None and record.valid_auc == result.valid["auc"]
    assert len(result.valid_rows) == len(dataset.split("valid"))  # max_valid_rows None: all of them
    assert result.offline_cost.train_samples == 0 and result.offline_cost.encoded_texts == 0  # "recent"
    assert not (tmp_path / "zs" / ADAPTER_FILE).exists()
    assert (tmp_path / "zs" / "metrics.json").exists()


def test_lora_training_in_bf16(dataset, tmp_path):
    lm = make_rella_lm(dataset, dtype="bf16")
    assert lm.dtype == torch.bfloat16
    before = base_snapshot(lm)
    config = ReLLaConfig(**{**FAST, "max_epochs": 1, "num_train_samples": 32, "lm_dtype": "bf16"})
    result = train_rella(dataset, lm, config, seed=0, cache_dir=tmp_path)
    assert_base_unchanged(lm, before)
    assert all(v.dtype == torch.float32 for v in result.model.adapter.values())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in result.model.adapter.items())
    assert np.isfinite(result.fit.history[0].train_loss)
    assert ((result.test_probs > 0) & (result.test_probs < 1)).all()

    # the output head runs in float32 over the bf16 decoder's final state (a bf16 head would round logits)
    builder = builder_for(dataset, lm, unit_rows(dataset.num_items, 6))
    token_ids = builder.token_ids(
        np.flatnonzero(dataset.interactions["split"].to_numpy() == "test")[:4], "recent"
    )
    answer = answer_token_ids(lm.tokenizer)
    probs = ReLLaModel(lm, answer).score(make_batches(token_ids, 1, lm.pad_token_id, lm.device))
    weight = lm.model.get_output_embeddings().weight.float()
    for ids, prob in zip(token_ids, probs, strict=True):
        with torch.inference_mode():
            last = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        logits = last.float() @ weight[[answer.no, answer.yes]].T
        assert prob == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-6)
