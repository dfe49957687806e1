"""Implicit feedback: the loader, sampled negatives, per-user ordered splits, positives-only profile rows and
hints, and the protocols, checked against independent per-user (pure Python) computations on tiny CSVs."""

from __future__ import annotations

import csv
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from userip.cli import main
from userip.data.prepare import prepare
from userip.data.preprocess import PrepareConfig, sample_negatives
from userip.data.protocols import ProtocolConfig, apply_protocol
from userip.data.schema import Dataset, DatasetError
from userip.data.sources.base import DataLoadError
from userip.utils.config import ConfigError

CATEGORIES = ["Arcade", "Puzzle", "Racing"]
K = 3  # negatives per positive in most tests


def implicit_rows(seed: int = 0, num_users: int = 18, num_items: int = 30) -> list[tuple[str, str, int]]:
    """(user, item, position) rows in shuffled file order: each user has distinct items at positions 0..n-1
    (one user has 24, so 10% splits round to 2), plus a 2-row user and a 2-row item that the 4-core drops."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = 24 if u == 0 else int(rng.integers(5, 12))
        items = rng.choice(num_items, size=n, replace=False)
        rows += [(f"u{u:02d}", f"i{it:02d}", p) for p, it in enumerate(items.tolist())]
    rows += [("usparse", "i00", 0), ("usparse", "i01", 1)]
    rows += [("u01", "irare", 50), ("u02", "irare", 50)]
    return [rows[k] for k in rng.permutation(len(rows))]


def write_implicit(folder: Path, rows, with_categories: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "position"])
        w.writerows(rows)
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "categories"] if with_categories else ["item_id", "title"])
        for item in sorted({i for _, i, _ in rows}):
            index = int(item[1:]) if item[1:].isdigit() else 7
            extra = [f"{CATEGORIES[index % 3]}|All"] if with_categories else []
            w.writerow([item, f"Game {index}", *extra])
    return folder


def load(folder: Path, k: int = K, **prepare_kwargs) -> Dataset:
    options = {"path": str(folder), "categories_column": "categories"}
    config = PrepareConfig(negatives_per_positive=k, **{"split": "leave_last_out", **prepare_kwargs})
    return prepare("implicit", options, config)


def raw_frame(ds: Dataset) -> pd.DataFrame:
    """The interactions with raw user and item ids."""
    inter = ds.interactions
    return inter.assign(
        raw_user=ds.users["raw_user_id"].to_numpy()[inter["user_id"]],
        raw_item=ds.items["raw_item_id"].to_numpy()[inter["item_id"]],
    )


def kept_histories(rows, fx) -> dict[str, list[str]]:
    """Each kept user's kept items in position order (reference k-core of the conftest)."""
    kept = set(fx.reference_kcore(rows))
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for u, i, p in rows:
        if (u, i) in kept:
            out[u].append((p, i))
    return {u: [i for _, i in sorted(v)] for u, v in out.items()}


@pytest.fixture
def rows():
    return implicit_rows()


@pytest.fixture
def folder(tmp_path, rows):
    return write_implicit(tmp_path / "games", rows)


# ---------------------------------------------------------------------------------------------- negatives
@pytest.mark.parametrize("split", ["leave_last_out", "user_ordered", "random"])
def test_negatives_are_never_a_positive_of_their_user_in_any_split(folder, rows, split):
    ds = load(folder, split=split)
    positives: dict[str, set[str]] = defaultdict(set)
    for u, i, _ in rows:  # every row of the file, before any filtering
        positives[u].add(i)
    frame = raw_frame(ds)
    negatives = frame[frame["sampled"] == 1]
    assert len(negatives) == K * ds.num_interactions > 0
    for u, i in zip(negatives["raw_user"], negatives["raw_item"]):
        assert i not in positives[u]
    assert (negatives["label"] == 0).all() and negatives["rating"].isna().all()
    assert (frame.loc[frame["sampled"] == 0, "label"] == 1).all()


def test_k_distinct_negatives_per_positive_share_its_event_split_and_order(folder):
    ds = load(folder)
    inter = ds.interactions
    observed = inter[inter["sampled"] == 0].set_index(["user_id", "event"])
    assert observed.index.is_unique
    groups = inter[inter["sampled"] == 1].groupby(["user_id", "event"])
    assert len(groups) == len(observed)
    for (user, event), negatives in groups:
        positive = observed.loc[(user, event)]
        assert len(negatives) == K and negatives["item_id"].nunique() == K
        assert set(negatives["split"]) == {positive["split"]}
        assert set(negatives["timestamp"]) == {positive["timestamp"]}
    # Stored order: each positive right before its negatives, users and events ascending.
    assert inter["sampled"].tolist() == ([0] + [1] * K) * ds.num_interactions
    keys = inter["user_id"].to_numpy() * 1000 + inter["event"].to_numpy()
    assert (np.diff(keys) >= 0).all()


def test_negatives_are_reproducible_by_seed_and_move_with_it(folder):
    a, b, c = load(folder, seed=0), load(folder, seed=0), load(folder, seed=1)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert a.content_hash == b.content_hash
    observed = a.interactions["sampled"] == 0
    # An ordered split does not depend on the seed: only the negatives change.
    pd.testing.assert_frame_equal(a.interactions[observed], c.interactions[observed])
    changed = a.interactions.loc[~observed, "item_id"].to_numpy() != c.interactions.loc[~observed, "item_id"]
    assert changed.mean() > 0.5


def test_sample_negatives_exact_fallback_for_a_user_who_has_seen_nearly_everything():
    seen_users = np.array([0, 0, 0, 0, 1])
    seen_items = np.array([0, 1, 2, 3, 0])
    rng = np.random.default_rng(0)
    out = sample_negatives(np.array([0] * 50 + [1] * 50), seen_users, seen_items, 6, 2, rng)
    assert out.shape == (100, 2)
    for row in out[:50]:
        assert sorted(row.tolist()) == [4, 5]  # the only two items user 0 never met
    for row in out[50:]:
        assert 0 not in row and row[0] != row[1]
    with pytest.raises(
        DataLoadError, match=r"user 0 \(dataset id\) has interacted with 4 of 6 items, leaving 2 to sample 3"
    ):
        sample_negatives(np.array([0]), seen_users, seen_items, 6, 3, np.random.default_rng(0))


def test_sample_negatives_takes_seconds_at_games_scale():
    # Games after filtering: ~50k users, ~440k interactions, ~17k items; 4 negatives each.
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50_000), 9)
    items = rng.integers(0, 16_800, len(users))
    started = time.perf_counter()
    out = sample_negatives(users, users, items, 16_800, 4, np.random.default_rng(1))
    assert time.perf_counter() - started < 20  # measured ~0.5 s; generous for a loaded 2-core machine
    seen = set(zip(users.tolist(), items.tolist()))
    assert not any((u, i) in seen for u, i in zip(np.repeat(users, 4).tolist(), out.ravel().tolist()))


# ---------------------------------------------------------------------------------------------- splits
def test_leave_last_out_by_position(folder, rows, fx):
    ds = load(folder)
    frame = raw_frame(ds)
    observed = frame[frame["sampled"] == 0]
    got = dict(zip(zip(observed["raw_user"], observed["raw_item"]), observed["split"]))
    histories = kept_histories(rows, fx)
    assert len(got) == sum(len(h) for h in histories.values())
    for user, items in histories.items():
        expected = ["train"] * (len(items) - 2) + ["valid", "test"]
        assert [got[(user, i)] for i in items] == expected
        events = observed[observed["raw_user"] == user].sort_values("event")
        assert events["raw_item"].tolist() == items and events["event"].tolist() == list(range(len(items)))


def test_user_ordered_8_1_1_by_position(folder, rows, fx):
    ds = load(folder, split="user_ordered")
    frame = raw_frame(ds)
    observed = frame[frame["sampled"] == 0]
    got = dict(zip(zip(observed["raw_user"], observed["raw_item"]), observed["split"]))
    histories = kept_histories(rows, fx)
    assert max(len(h) for h in histories.values()) >= 15  # some user gets 2 valid and 2 test rows
    for user, items in histories.items():
        n = len(items)
        num_test = min(max(1, math.floor(0.1 * n + 0.5)), n - 1)
        num_valid = min(max(1, math.floor(0.1 * n + 0.5)), n - 1 - num_test)
        expected = ["train"] * (n - num_test - num_valid) + ["valid"] * num_valid + ["test"] * num_test
        assert [got[(user, i)] for i in items] == expected


def test_ordered_split_keeps_a_training_row_for_short_histories():
    from userip.data.preprocess import SplitMode, assign_user_split

    users = np.array([0, 1, 1, 2, 2, 2])
    for mode in (SplitMode.LEAVE_LAST_OUT, SplitMode.USER_ORDERED):
        split = assign_user_split(users, mode, (0.8, 0.1, 0.1)).tolist()
        assert split == ["train", "train", "test", "train", "valid", "test"]


# ---------------------------------------------------------------------------------------------- profiles
def test_profile_rows_and_hints_come_from_training_positives_only(folder):
    ds = load(folder)
    train = ds.split("train")
    profile = ds.profile_rows()
    assert (profile["label"] == 1).all() and (profile["sampled"] == 0).all()
    assert len(profile) == int((train["sampled"] == 0).sum())
    samples = ds.profile_samples()  # the surrogate's labelled rows: the same positives and their negatives
    assert len(samples) == len(train) == (K + 1) * len(profile)
    # favourite_category, recomputed per user in pure Python over training positives (ties: smallest name).
    cats = dict(zip(ds.items["item_id"], ds.items["categories"]))
    for user in range(ds.num_users):
        counts = Counter(c for i in profile.loc[profile["user_id"] == user, "item_id"] for c in cats[i])
        best = max(counts.values())
        assert ds.hints.loc[user, "favourite_category"] == min(c for c, n in counts.items() if n == best)


def test_save_and_load_keep_the_implicit_columns(folder, tmp_path):
    ds = load(folder)
    ds.save(tmp_path / "run" / "data")
    back = Dataset.load(tmp_path / "run")
    pd.testing.assert_frame_equal(back.interactions, ds.interactions)
    assert back.is_implicit and back.content_hash == ds.content_hash
    stats = back.statistics()
    assert stats["interactions"] == back.num_interactions == int((ds.interactions["sampled"] == 0).sum())
    assert stats["sampled_negatives"] == K * stats["interactions"]
    assert stats["positive_rate"] == pytest.approx(1 / (K + 1))


def test_validate_refuses_inconsistent_implicit_columns(folder):
    ds = load(folder)
    broken = Dataset(ds.interactions.drop(columns="event"), ds.items, ds.users)
    with pytest.raises(DatasetError, match=r"implicit columns \['event', 'sampled'\] come together"):
        broken.validate()
    inter = ds.interactions.copy()
    inter.loc[1, "label"] = 1  # a sampled negative labelled positive
    with pytest.raises(DatasetError, match="sampled rows must have label 0"):
        Dataset(inter, ds.items, ds.users).validate()


# ---------------------------------------------------------------------------------------------- protocols
def test_sparse_keeps_k_training_positives_with_their_negatives(folder):
    ds = load(folder)
    out = apply_protocol(ds, ProtocolConfig(name="sparse", history_rows=2, seed=3)).dataset
    inter = out.interactions
    train = inter[inter["split"] == "train"]
    observed = train[train["sampled"] == 0]
    before = ds.split("train")
    for user in range(ds.num_users):
        available = int(((before["user_id"] == user) & (before["sampled"] == 0)).sum())
        assert int((observed["user_id"] == user).sum()) == min(2, available)
    # Every kept positive keeps its K negatives, and no negative outlives its positive.
    kept_events = set(zip(observed["user_id"], observed["event"]))
    negatives = train[train["sampled"] == 1]
    assert Counter(zip(negatives["user_id"], negatives["event"])) == dict.fromkeys(kept_events, K)
    for split in ("valid", "test"):
        pd.testing.assert_frame_equal(
            out.split(split).reset_index(drop=True), ds.split(split).reset_index(drop=True)
        )
    assert (out.profile_rows()["label"] == 1).all() and len(out.profile_rows()) == len(observed)


def test_cold_start_uses_first_positives_as_evidence(folder, rows, fx):
    ds = load(folder)
    result = apply_protocol(
        ds, ProtocolConfig(name="cold_start", history_rows=2, cold_user_fraction=0.5, seed=0)
    )
    out, new_users = result.dataset, result.new_users
    histories = kept_histories(rows, fx)
    cold = set(new_users["raw_user_id"])
    assert len(cold) == round(0.5 * ds.num_users)
    # Cold users' known rows: their first 2 positives by position, nothing else (no sampled negatives).
    assert (new_users["label"] == 1).all()
    for user in cold:
        assert new_users.loc[new_users["raw_user_id"] == user, "raw_item_id"].tolist() == histories[user][:2]
    frame = raw_frame(out)
    # Warm users' history split: their first 2 positives, each with its K negatives.
    history = frame[frame["split"] == "history"]
    for user, items in histories.items():
        mine = history[history["raw_user"] == user]
        if user in cold:
            assert mine.empty
            rest = frame[(frame["raw_user"] == user) & (frame["sampled"] == 0)]["raw_item"].tolist()
            assert rest == items[2:]  # scored on the rest, in valid or test
            continue
        assert sorted(mine.loc[mine["sampled"] == 0, "raw_item"]) == sorted(items[:2])
        assert int((mine["sampled"] == 1).sum()) == 2 * K
    assert (out.profile_rows()["label"] == 1).all()
    assert set(out.profile_rows()["split"]) == {"history"}


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_order_column_is_named_with_file_row_and_field(tmp_path, rows):
    folder = write_implicit(tmp_path / "a", rows)
    path = folder / "interactions.csv"
    frame = pd.read_csv(path, dtype=str)
    for bad in ("1.5", "abc", "-1"):
        frame.loc[2, "position"] = bad
        frame.to_csv(path, index=False)
        with pytest.raises(DataLoadError, match=rf"interactions.csv: row 3: column 'position' .*{bad!r}"):
            load(folder)
    frame.drop(columns="position").to_csv(path, index=False)
    with pytest.raises(
        DataLoadError, match=r"interactions.csv: unknown column 'position' \(from order_column\)"
    ):
        load(folder)
    duplicated = pd.DataFrame({"user_id": ["a", "a"], "item_id": ["x", "y"], "position": [0, 0]})
    duplicated.to_csv(path, index=False)
    with pytest.raises(DataLoadError, match="row 2: user 'a' has position 0 twice"):
        load(folder)


def test_missing_item_column_and_blank_ids_are_named(tmp_path, rows):
    folder = write_implicit(tmp_path / "b", rows, with_categories=False)
    with pytest.raises(
        DataLoadError, match=r"items.csv: unknown column 'categories' \(from categories_column\)"
    ):
        load(folder)
    path = folder / "interactions.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[4, "item_id"] = ""
    frame.to_csv(path, index=False)
    with pytest.raises(
        DataLoadError, match=r"interactions.csv: row 5: column 'item_id' \(item_column\) is empty"
    ):
        prepare("implicit", {"path": str(folder)}, PrepareConfig(negatives_per_positive=1))


def test_config_errors_for_negatives_and_splits(folder):
    with pytest.raises(ConfigError, match="set prepare.negatives_per_positive >= 1"):
        load(folder, k=0)
    with pytest.raises(ConfigError, match="negatives_per_positive: expected an integer >= 0, got -1"):
        PrepareConfig(negatives_per_positive=-1)
    with pytest.raises(DataLoadError, match="split=time needs timestamps comparable across users"):
        load(folder, split="time")
    with pytest.raises(ConfigError, match="applies to implicit sources only"):
        prepare("synthetic", {"num_users": 40, "num_items": 20}, PrepareConfig(negatives_per_positive=2))
    with pytest.raises(ConfigError, match=r"order_type: 'daily' is not one of \['position', 'timestamp'\]"):
        prepare(
            "implicit", {"path": str(folder), "order_type": "daily"}, PrepareConfig(negatives_per_positive=1)
        )


def test_timestamp_order_allows_the_global_time_split(tmp_path, rows):
    stamped = [(u, i, 1_600_000_000 + 1000 * p + int(u[1:]) if u[1:].isdigit() else 0) for u, i, p in rows]
    folder = write_implicit(tmp_path / "t", stamped)
    options = {"path": str(folder), "order_column": "position", "order_type": "timestamp"}
    ds = prepare("implicit", options, PrepareConfig(negatives_per_positive=1, split="time"))
    observed = ds.interactions[ds.interactions["sampled"] == 0]
    newest_train = observed.loc[observed["split"] == "train", "timestamp"].max()
    assert newest_train <= observed.loc[observed["split"] == "test", "timestamp"].min()


def test_prepare_cli_on_an_implicit_folder(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prepare", "--source", "implicit", "--path", str(folder), "--split", "leave_last_out"]
    assert main([*args, "--out", str(out)]) == 2
    assert "negatives_per_positive >= 1" in capsys.readouterr().err
    assert main([*args, "--negatives-per-positive", "2", "--seed", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ds = Dataset.load(out)
    assert ds.is_implicit and ds.config["prepare"]["negatives_per_positive"] == 2
    assert f"| Interactions         | {ds.num_interactions:,} |" in printed
    assert f"| Sampled negatives    | {2 * ds.num_interactions:,} |" in printed


# ---------------------------------------------------------------------------------------------- shared sets
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
# name -> (folder, source options beyond the path, raw rows, users, items) as ../shared/data/README.md states
SHARED_SETS = {
    "amazon-games": ({}, 440_264, 50_546, 16_859),
    "yelp": ({"categories_column": "categories"}, 316_354, 30_431, 20_033),
}


@pytest.mark.parametrize("name", sorted(SHARED_SETS))
def test_shared_implicit_sets(name):
    folder = SHARED_DATA / name
    if not (folder / "interactions.csv").is_file():
        pytest.skip(f"shared {name} data not found at {folder} (../shared/data is not part of the project)")
    options, num_rows, num_users, num_items = SHARED_SETS[name]
    with open(folder / "interactions.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["user_id", "item_id", "position"]
        raw = [(u, i, int(p)) for u, i, p in reader]
    assert (len(raw), len({u for u, _, _ in raw}), len({i for _, i, _ in raw})) == (
        num_rows,
        num_users,
        num_items,
    )
    ds = prepare(
        "implicit",
        {"path": str(folder), **options},
        PrepareConfig(negatives_per_positive=1, split="leave_last_out"),
    )
    positives = set((u, i) for u, i, _ in raw)
    frame = raw_frame(ds)
    negatives = frame[frame["sampled"] == 1]
    assert len(negatives) == ds.num_interactions
    assert not any(pair in positives for pair in zip(negatives["raw_user"], negatives["raw_item"]))
    # Each user's test positive is their newest (largest position) raw interaction that survived the filter.
    kept_items = set(ds.items["raw_item_id"])
    newest: dict[str, tuple[int, str]] = {}
    for u, i, p in raw:
        if i in kept_items and (u not in newest or p > newest[u][0]):
            newest[u] = (p, i)
    test = frame[(frame["split"] == "test") & (frame["sampled"] == 0)]
    assert len(test) == ds.num_users
    assert all(newest[u][1] == i for u, i in zip(test["raw_user"], test["raw_item"]))
    assert (ds.profile_rows()["label"] == 1).all()
    if options:  # Yelp has categories: nearly every user gets a favourite one from training positives
        assert (ds.hints["favourite_category"] != "").mean() > 0.99


@pytest.mark.parametrize("name", ["games", "yelp"])
def test_shipped_experiment_configs_prepare_their_set(name):
    from userip.pipeline.experiment import ExperimentConfig
    from userip.utils.config import from_dict, load_yaml

    path = Path(__file__).resolve().parents[2] / "configs" / f"experiment_{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# userip experiment --config configs/experiment_{name}.yaml"
    cfg = from_dict(ExperimentConfig, load_yaml(path), where=str(path))
    assert cfg.source == "implicit" and cfg.prepare.negatives_per_positive >= 1
    folder = Path(__file__).resolve().parents[2] / cfg.source_options["path"]
    if not (folder / "interactions.csv").is_file():
        pytest.skip(
            f"shared data for {path.name} not found at {folder} (../shared/data is not part of the project)"
        )
    ds = apply_protocol(
        prepare(cfg.source, {**cfg.source_options, "path": str(folder)}, cfg.prepare), cfg.protocol
    ).dataset
    k = cfg.prepare.negatives_per_positive
    stats = ds.statistics()
    assert stats["sampled_negatives"] == k * stats["interactions"]
    assert stats["num_test"] == stats["num_valid"] == (1 + k) * ds.num_users
    # The real-data protocols on the same set: counts are over positives, negatives follow them.
    sparse = apply_protocol(ds, ProtocolConfig(name="sparse", history_rows=5)).dataset
    train = sparse.split("train")
    per_user = train[train["sampled"] == 0].groupby("user_id").size()
    assert per_user.max() == 5 and len(train) == (1 + k) * per_user.sum()
    cold = apply_protocol(ds, ProtocolConfig(name="cold_start", history_rows=5, cold_user_fraction=0.2))
    assert (cold.new_users["label"] == 1).all()
    assert cold.new_users.groupby("raw_user_id").size().eq(5).all()
    history = cold.dataset.split("history")
    positives = ds.interactions[ds.interactions["sampled"] == 0].groupby("user_id").size()
    warm = history[history["sampled"] == 0].groupby("user_id").size()
    assert (warm == positives.loc[warm.index].clip(upper=5)).all()
    assert len(history) == (1 + k) * int((history["sampled"] == 0).sum())
    assert (cold.dataset.profile_rows()["label"] == 1).all()


def test_rating_level_is_unknown_on_implicit_data(folder):
    hints = load(folder).hints
    assert (hints["rating_level"] == "unknown").all() and (hints["favourite_category"] != "").all()


def test_prompt_targets_are_the_training_positives_in_position_order(folder, rows, fx):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from userip.prompts import PromptBuilder, PromptConfig, build_examples

    words = ["[UNK]", "[BOS]", "[EOS]", "game", ",", *map(str, range(100))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    ds = load(folder)
    examples = build_examples(ds, PromptBuilder(tokenizer, PromptConfig(max_target_tokens=200)))
    assert len(examples) == ds.num_users and examples.num_skipped_users == 0
    raw_users = ds.users["raw_user_id"].to_numpy()
    histories = kept_histories(rows, fx)
    for n in range(len(examples)):
        target = tokenizer.convert_ids_to_tokens(
            examples.target_ids[examples.offsets[n] : examples.offsets[n + 1]].tolist()
        )
        titles = [f"i{int(t):02d}" for t in target if t.isdigit()]
        assert titles == histories[raw_users[examples.user_ids[n]]][:-2]  # leave-last-out: valid, test last
