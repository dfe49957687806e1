"""Every loader on tiny files written here in the source's real format; counts after the 4-core filter are
checked against the independent set-based filter in conftest."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from userip.data.prepare import prepare
from userip.data.preprocess import PrepareConfig
from userip.data.sources.base import DataLoadError
from userip.data.sources.nete import restricted_load


def check_counts(dataset, expected) -> None:
    assert dataset.num_interactions == len(expected)
    assert dataset.num_users == len({u for u, _ in expected})
    assert dataset.num_items == len({i for _, i in expected})
    got = set(
        zip(
            dataset.users["raw_user_id"].to_numpy()[dataset.interactions["user_id"]],
            dataset.items["raw_item_id"].to_numpy()[dataset.interactions["item_id"]],
        )
    )
    assert got == set(expected)
    assert "Uchain" not in set(dataset.users["raw_user_id"])  # dropped only in the second round


def check_labels(dataset, rows, threshold: float = 3.0) -> None:
    ratings = {(u, i): r for u, i, r, _ in rows}
    inter = dataset.interactions
    users = dataset.users["raw_user_id"].to_numpy()[inter["user_id"]]
    items = dataset.items["raw_item_id"].to_numpy()[inter["item_id"]]
    expected = np.array([ratings[(u, i)] > threshold for u, i in zip(users, items)], dtype=np.int8)
    np.testing.assert_array_equal(inter["label"].to_numpy(), expected)


@pytest.mark.parametrize("gz", [True, False])
def test_amazon_2018(tmp_path, rows, gz, fx):
    reviews, meta = fx.write_amazon_2018(tmp_path, rows, gz=gz)
    ds = prepare("amazon", {"reviews": str(reviews), "meta": str(meta)})
    check_counts(ds, fx.reference_kcore(rows))
    check_labels(ds, rows)
    items = ds.items.set_index("raw_item_id")
    assert items.loc["A005", "title"] == "Thing number 5"
    assert items.loc["A005", "price"] == pytest.approx(5.5)  # parsed from "$5.50"
    assert list(items.loc["A005", "categories"]) == ["Garden", "All"]
    assert items.loc["A002", "title"] == ""  # no metadata: tolerated, counted
    assert ds.config["load_report"]["num_missing_titles"] == 1
    assert ds.has_reviews and ds.interactions["review"].str.startswith("text U").all()


def test_amazon_2014_folder_and_python_literal_meta(tmp_path, rows, fx):
    fx.write_amazon_2014(tmp_path, rows)
    ds = prepare("amazon", {"path": str(tmp_path)})
    check_counts(ds, fx.reference_kcore(rows))
    items = ds.items.set_index("raw_item_id")
    # Category paths [[c, "Sub"], [c]] flatten to unique names in order.
    assert list(items.loc["A003", "categories"]) == ["Books", "Sub"]
    assert items.loc["A003", "brand"] == "Brand1"
    assert items.loc["A001", "title"] == "" and np.isnan(items.loc["A001", "price"])
    report = ds.config["load_report"]
    assert report["num_missing_titles"] == 1 and report["num_missing_prices"] == 1


def test_amazon_malformed_lines_reported_then_fatal(tmp_path, rows, fx):
    reviews, meta = fx.write_amazon_2018(tmp_path, rows, gz=False)
    lines = reviews.read_text().splitlines()
    lines[3] = '{"reviewerID": "U1", "asin": '  # truncated JSON on line 4
    lines[7] = '{"reviewerID": "U1", "overall": 5}'  # no asin on line 8
    fx.write_lines(reviews, lines)
    ds = prepare("amazon", {"reviews": str(reviews), "meta": str(meta), "max_bad_lines": 2})
    bad = ds.config["load_report"]["bad_lines"]
    assert ds.config["load_report"]["num_bad_lines"] == 2
    assert bad[0].startswith(f"{reviews}:4: invalid JSON") and bad[1].startswith(
        f"{reviews}:8: missing field"
    )
    with pytest.raises(DataLoadError, match=r"(?s)2 malformed line\(s\).*max_bad_lines=1.*:4: invalid JSON"):
        prepare("amazon", {"reviews": str(reviews), "meta": str(meta), "max_bad_lines": 1})


def test_amazon_missing_file_named(tmp_path):
    with pytest.raises(DataLoadError, match="nope.json.gz: Amazon reviews file not found"):
        prepare("amazon", {"reviews": str(tmp_path / "nope.json.gz")})


def test_yelp(tmp_path, rows, fx):
    reviews = [
        json.dumps({"review_id": f"r{k}", "user_id": u, "business_id": i, "stars": r, "text": "nice",
                    "date": pd.Timestamp(t, unit="s").strftime("%Y-%m-%d %H:%M:%S")})
        for k, (u, i, r, t) in enumerate(rows)
    ]  # fmt: skip
    fx.write_lines(tmp_path / "yelp_academic_dataset_review.json", reviews)
    businesses = [
        json.dumps({"business_id": i, "name": f"Place {i}", "categories": "Food, Coffee & Tea",
                    "attributes": {"RestaurantsPriceRange2": "3", "Ambience": "{'romantic': False}"}})
        for i in sorted({i for _, i, *_ in rows})
    ]  # fmt: skip
    businesses.append(
        json.dumps({"business_id": "Bnone", "name": "x", "categories": None, "attributes": None})
    )
    fx.write_lines(tmp_path / "business.json", businesses, gz=False)
    users = [json.dumps({"user_id": u, "review_count": 5, "fans": 0, "average_stars": 3.7,
                         "yelping_since": "2015-01-02",
                         "friends": "a, b"}) for u in sorted({u for u, *_ in rows})]  # fmt: skip
    fx.write_lines(tmp_path / "user.json", users)
    ds = prepare("yelp", {"path": str(tmp_path)}, PrepareConfig(split="time"))
    check_counts(ds, fx.reference_kcore(rows))
    check_labels(ds, rows)
    assert ds.interactions["timestamp"].min() > 1_400_000_000  # dates parsed to seconds
    items = ds.items.set_index("raw_item_id")
    assert (
        list(items.loc["A000", "categories"]) == ["Food", "Coffee & Tea"]
        and items.loc["A000", "price"] == 3.0
    )
    user = ds.users.iloc[0]
    assert (user["review_count"], user["fans"], user["average_stars"], user["yelping_since"]) == (
        "4-7",
        "0",
        "3.5",
        "2015",
    )
    # Time split: every train interaction is no later than every test interaction.
    inter = ds.interactions
    assert (
        inter.loc[inter.split == "train", "timestamp"].max()
        <= inter.loc[inter.split == "test", "timestamp"].min()
    )


def write_nete(folder, rows, with_index: bool = True):
    records = [
        {"user": u, "item": i, "rating": r, "template": ("screen", "great", f"the screen is great {k}", 1),
         "predicted": ""}
        for k, (u, i, r, _) in enumerate(rows)
    ]  # fmt: skip
    (folder / "reviews.pickle").write_bytes(pickle.dumps(records, protocol=4))
    items = {i: {"title": f"Item {i}", "brand": "B", "price": 9.5} for i in sorted({i for _, i, *_ in rows})}
    (folder / "item.json").write_text(json.dumps(items))
    (folder / "user.json").write_text(
        json.dumps([{"user": u, "age": 30} for u in sorted({u for u, *_ in rows})])
    )
    if with_index:
        order = np.random.default_rng(1).permutation(len(rows))
        cut1, cut2 = int(0.8 * len(rows)), int(0.9 * len(rows))
        (folder / "1").mkdir()
        for name, part in (("train", order[:cut1]), ("validation", order[cut1:cut2]), ("test", order[cut2:])):
            (folder / "1" / f"{name}.index").write_text(" ".join(map(str, part)))
        return {"train": order[:cut1], "valid": order[cut1:cut2], "test": order[cut2:]}
    return None


def test_nete_with_source_split(tmp_path, rows, fx):
    parts = write_nete(tmp_path, rows)
    ds = prepare("nete", {"path": str(tmp_path)}, PrepareConfig(split="source"))
    check_counts(ds, fx.reference_kcore(rows))
    split_of = {(rows[k][0], rows[k][1]): name for name, idx in parts.items() for k in idx}
    inter = ds.interactions
    users = ds.users["raw_user_id"].to_numpy()[inter["user_id"]]
    items = ds.items["raw_item_id"].to_numpy()[inter["item_id"]]
    assert list(inter["split"]) == [split_of[(u, i)] for u, i in zip(users, items)]
    assert ds.items["title"].str.startswith("Item ").all() and (ds.users["age"] == "30").all()
    assert inter["review"].str.startswith("the screen is great").all()


def test_nete_without_index_cannot_use_source_split(tmp_path, rows):
    write_nete(tmp_path, rows, with_index=False)
    with pytest.raises(DataLoadError, match="split=source but the source has no split"):
        prepare("nete", {"path": str(tmp_path)}, PrepareConfig(split="source"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_nete_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps([{"user": "u", "item": _Exploit(marker)}]))
    with pytest.raises(DataLoadError, match=r"refused to load global (posix|os|nt)\.system"):
        prepare("nete", {"path": str(tmp_path)})
    assert not marker.exists()
    # Builtin containers and scalars still load.
    (tmp_path / "ok.pickle").write_bytes(pickle.dumps([{"a": (1, 2.5, "x", {3}), "b": [True, None]}]))
    assert restricted_load(tmp_path / "ok.pickle") == [{"a": (1, 2.5, "x", {3}), "b": [True, None]}]


@pytest.mark.parametrize("with_genre_file", [True, False])
def test_movielens_100k_raw(tmp_path, rows, fx, with_genre_file):
    users = sorted({u for u, *_ in rows})
    items = sorted({i for _, i, *_ in rows})
    uid = {u: k + 1 for k, u in enumerate(users)}
    iid = {i: k + 1 for k, i in enumerate(items)}
    fx.write_lines(tmp_path / "u.data", [f"{uid[u]}\t{iid[i]}\t{int(r)}\t{t}" for u, i, r, t in rows])
    # Without u.genre the loader uses the 19 ml-100k genres, whose 5th is "Children's".
    genres = [f"Genre{g}" for g in range(19)] if with_genre_file else None
    if with_genre_file:
        fx.write_lines(tmp_path / "u.genre", [f"{name}|{g}" for g, name in enumerate(genres)] + [""])

    def flags(k: int) -> str:
        return "|".join("1" if g in (4, k % 19) else "0" for g in range(19))

    lines = [f"{iid[i]}|Film {i} é (1995)|01-Jan-1995||http://x|{flags(iid[i])}" for i in items]
    (tmp_path / "u.item").write_bytes("\n".join(lines).encode("latin-1"))
    fx.write_lines(tmp_path / "u.user", [f"{uid[u]}|{20 + uid[u]}|M|writer|12345" for u in users])
    ds = prepare("movielens", {"path": str(tmp_path)})
    renamed = [(str(uid[u]), str(iid[i]), r, t) for u, i, r, t in rows]
    check_counts_raw(ds, fx.reference_kcore(renamed))
    item = ds.items.set_index("raw_item_id").loc[str(iid["A005"])]
    assert item["title"] == "Film A005 é (1995)"
    assert iid["A005"] == 6  # flags at genres 4 and 6
    expected = ["Genre4", "Genre6"] if with_genre_file else ["Children's", "Crime"]
    assert list(item["categories"]) == expected
    assert set(ds.users.columns) == {"user_id", "raw_user_id", "age", "gender", "occupation", "zip_code"}


def check_counts_raw(dataset, expected) -> None:
    assert dataset.num_interactions == len(expected)
    assert dataset.num_users == len({u for u, _ in expected})
    assert dataset.num_items == len({i for _, i in expected})


def test_movielens_1m_raw(tmp_path, rows, fx):
    fx.write_lines(tmp_path / "ratings.dat", [f"{u}::{i}::{int(r)}::{t}" for u, i, r, t in rows])
    fx.write_lines(
        tmp_path / "movies.dat",
        [f"{i}::Film {i} (1999)::Comedy|Drama" for i in sorted({i for _, i, *_ in rows})],
    )
    fx.write_lines(tmp_path / "users.dat", [f"{u}::F::25::4::55455" for u in sorted({u for u, *_ in rows})])
    ds = prepare("movielens", {"path": str(tmp_path)})
    check_counts(ds, fx.reference_kcore(rows))
    check_labels(ds, rows)
    assert all(list(c) == ["Comedy", "Drama"] for c in ds.items["categories"])
    assert (ds.users["occupation"] == "4").all()


def test_recbole_fixture(tmp_path, rows, fx):
    with open(tmp_path / "toy.inter", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["user_id:token", "item_id:token", "rating:float", "timestamp:float"])
        w.writerows(rows)
    with open(tmp_path / "toy.item", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["item_id:token", "movie_title:token_seq", "class:token_seq", "price:float"])
        w.writerows([(i, f"Movie {i}", "Drama Sci-Fi", 3.5) for i in sorted({i for _, i, *_ in rows})])
    ds = prepare("recbole", {"path": str(tmp_path)})
    check_counts(ds, fx.reference_kcore(rows))
    check_labels(ds, rows)
    assert all(list(c) == ["Drama", "Sci-Fi"] for c in ds.items["categories"])
    assert (ds.items["price"] == 3.5).all()


def test_recbole_bad_header_named(tmp_path):
    (tmp_path / "x.inter").write_text("user_id\titem_id:token\n1\t2\n")
    with pytest.raises(DataLoadError, match=r"x.inter:1: header cell 'user_id'"):
        prepare("recbole", {"path": str(tmp_path)})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tabular_with_rating_and_items(tmp_path, rows, fmt, fx):
    frame = pd.DataFrame(rows, columns=["uid", "iid", "stars", "ts"])
    meta = pd.DataFrame([fx.item_meta(i) for i in sorted(frame["iid"].unique())])
    meta["category"] = meta["category"].map("|".join)
    if fmt == "csv":
        frame.to_csv(tmp_path / "inter.csv", index=False)
        meta.to_csv(tmp_path / "items.csv", index=False)
    else:
        frame.to_parquet(tmp_path / "inter.csv.parquet")
        meta.to_parquet(tmp_path / "items.csv.parquet")
    suffix = ".csv" if fmt == "csv" else ".csv.parquet"
    options = {
        "path": str(tmp_path / f"inter{suffix}"), "items": str(tmp_path / f"items{suffix}"),
        "user_column": "uid", "item_column": "iid", "rating_column": "stars", "timestamp_column": "ts",
        "item_id_column": "asin", "categories_column": "category", "brand_column": "brand",
        "price_column": "price",
    }  # fmt: skip
    ds = prepare("csv", options, PrepareConfig(label_threshold=4.0))
    check_counts(ds, fx.reference_kcore(rows))
    check_labels(ds, rows, threshold=4.0)
    item = ds.items.set_index("raw_item_id").loc["A004"]
    assert (item["title"], list(item["categories"]), item["price"]) == (
        "Thing number 4",
        ["Toys", "All"],
        4.5,
    )


def test_tabular_label_and_split_columns(tmp_path, rows, fx):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "ts"])
    frame["clicked"] = (frame["rating"] >= 2).astype(int)
    frame["fold"] = np.where(np.arange(len(frame)) % 10 == 0, "validation", "train")
    frame.loc[frame.index % 10 == 1, "fold"] = "test"
    frame.to_csv(tmp_path / "x.csv", index=False)
    options = {"path": str(tmp_path / "x.csv"), "rating_column": None, "label_column": "clicked"}
    ds = prepare("csv", {**options, "split_column": "fold"}, PrepareConfig(split="source"))
    check_counts(ds, fx.reference_kcore(rows))
    assert ds.interactions["rating"].isna().all()
    assert set(ds.interactions["split"]) == {"train", "valid", "test"}
    assert ds.interactions["label"].mean() == pytest.approx(
        np.mean([r >= 2 for u, i, r, _ in rows if (u, i) in set(fx.reference_kcore(rows))])
    )


def test_tabular_unknown_column_named(tmp_path, rows):
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "ts"]).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(DataLoadError, match=r"x.csv: unknown column 'stars' \(from rating_column\)"):
        prepare("csv", {"path": str(tmp_path / "x.csv"), "rating_column": "stars"})
