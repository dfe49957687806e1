"""`userip prepare` end to end: artifacts, manifest, statistics, errors, atomic writes; ml-100k."""

from __future__ import annotations

import csv
from collections import Counter

import pandas as pd
import pytest

from userip.cli import main
from userip.data.prepare import prepare
from userip.data.schema import Dataset, DatasetError


def test_prepare_synthetic_writes_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prepare", "--source", "synthetic", "--num-users", "120", "--num-items", "60", "--seed", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    ds = Dataset.load(out)
    manifest = Dataset.read_manifest(out)
    assert manifest["source"] == "synthetic" and manifest["content_hash"] == ds.content_hash
    assert manifest["config"]["source_config"]["seed"] == 3 and manifest["config"]["prepare"]["seed"] == 3
    assert ds.num_users == 120 and ds.num_items == 60 and ds.truth is not None and ds.hints is not None
    assert f"| Interactions         | {ds.num_interactions:,} |" in printed
    assert f"| Sparsity             | {100 * (1 - ds.num_interactions / (120 * 60)):.2f}% |" in printed
    assert str(out / "data") in printed
    assert (out / "logs" / "prepare.log").read_text().count("k-core filter") == 1
    for table in ("interactions", "items", "users", "truth", "hints"):
        assert (out / "data" / f"{table}.parquet").is_file()


def test_prepare_config_file_and_flag_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "source: synthetic\nsource_options: {num_users: 50, num_items: 24}\nprepare: {split: time}\n"
    )
    assert main(["prepare", "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    ds = Dataset.load(tmp_path / "a")
    train, test = ds.split("train"), ds.split("test")
    assert train["timestamp"].max() <= test["timestamp"].min()
    # A flag that the source does not take, an unknown key, a missing file: exit 2 with the cause named.
    assert (
        main(["prepare", "--source", "synthetic", "--reviews", "x.json", "--out", str(tmp_path / "b")]) == 2
    )
    assert "--reviews does not apply to --source synthetic" in capsys.readouterr().err
    config.write_text("source: synthetic\nprepare: {min_users: 3}\n")
    assert main(["prepare", "--config", str(config), "--out", str(tmp_path / "b")]) == 2
    assert "unknown key(s) ['min_users']" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                "--source",
                "movielens",
                "--path",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "no MovieLens files" in capsys.readouterr().err
    assert not (tmp_path / "b" / "data" / "manifest.json").exists()


def test_crash_mid_write_leaves_no_readable_half_dataset(tmp_path, monkeypatch):
    out = tmp_path / "run"
    main(["prepare", "--source", "synthetic", "--num-users", "60", "--num-items", "24", "--out", str(out)])
    before = Dataset.load(out).content_hash
    calls = Counter()
    original = pd.DataFrame.to_parquet

    def crash_on_third(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash_on_third)
    ds = prepare("synthetic", {"num_users": 70, "num_items": 24})
    with pytest.raises(OSError, match="disk full"):
        ds.save(out / "data")
    assert ds.content_hash != before
    with pytest.raises(DatasetError, match="no manifest.json"):
        Dataset.load(out)  # the old manifest was removed first, the new one never written
    assert not list((out / "data").glob(".*.tmp"))  # no temp files left behind


def read_ml100k_independently(folder):
    with open(folder / "ml-100k.inter", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        return [(u, i, float(r), int(float(t))) for u, i, r, t in reader]


def test_shared_ml100k_recbole(ml100k_recbole, fx):
    rows = read_ml100k_independently(ml100k_recbole)
    assert len(rows) == 100_000
    ds = prepare("recbole", {"path": str(ml100k_recbole)})
    expected = fx.reference_kcore(rows)
    assert ds.num_interactions == len(expected)
    assert ds.num_users == len({u for u, _ in expected}) == 943
    assert ds.num_items == len({i for _, i in expected})
    kept = set(expected)
    positives = sum(r > 3 for u, i, r, _ in rows if (u, i) in kept)
    assert int(ds.interactions["label"].sum()) == positives
    stats = ds.statistics()
    assert stats["sparsity_pct"] == pytest.approx(
        100 * (1 - len(expected) / (ds.num_users * ds.num_items)), abs=1e-3
    )
    toy_story = ds.items.set_index("raw_item_id").loc["1"]
    assert toy_story["title"] == "Toy Story" and list(toy_story["categories"]) == [
        "Animation",
        "Children's",
        "Comedy",
    ]
    assert {"age", "gender", "occupation", "zip_code"} <= set(ds.users.columns)
    assert (ds.hints["price_level"] == "unknown").all() and (ds.hints["favourite_category"] != "").all()


def test_set_overrides_prepare_after_the_flags_and_a_bad_section_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prepare", "--source", "synthetic", "--num-users", "60", "--num-items", "24", "--out", str(out)]
    assert main([*args, "--set", "source_options.num_users=40", "--set", "prepare.split=time"]) == 0
    ds = Dataset.load(out)
    assert ds.num_users <= 40 and ds.split("train")["timestamp"].max() <= ds.split("test")["timestamp"].min()
    assert main([*args, "--out", str(tmp_path / "b"), "--set", "train.lr=1"]) == 2
    assert "unknown section(s) ['train']" in capsys.readouterr().err
    assert not (tmp_path / "b" / "data").exists()
