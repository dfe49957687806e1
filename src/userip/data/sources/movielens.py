"""MovieLens, as GroupLens ships it (ml-100k, ml-1m) and as RecBole atomic files (.inter / .item / .user).

ml-100k   u.data "user<TAB>item<TAB>rating<TAB>timestamp";
          u.item "id|title|date|video date|url|19 genre flags";
          u.user "id|age|gender|occupation|zip" (latin-1)
ml-1m     ratings.dat "UserID::MovieID::Rating::Timestamp"; movies.dat "MovieID::Title::Genre|Genre";
          users.dat "UserID::Gender::Age::Occupation::Zip-code" (latin-1)
RecBole   tab-separated files whose header cells are "name:type" (token, token_seq, float, float_seq), e.g.
          ml-100k.inter "user_id:token item_id:token rating:float timestamp:float";
          ml-100k.item "item_id:token movie_title:token_seq release_year:token class:token_seq"
Genres are the items' categories; MovieLens has no brand or price.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.sources.base import DataLoadError, LoadReport, RawData, as_int64, read_bytes

# fmt: off
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# fmt: on

# RecBole column names that carry each piece of item metadata, in order of preference.
RECBOLE_TITLE = ("title", "movie_title", "item_name", "name")
RECBOLE_CATEGORIES = ("categories", "category", "class", "genre", "genres")


@dataclasses.dataclass
class MovieLensConfig:
    path: str  # the ml-100k or ml-1m folder


@dataclasses.dataclass
class RecBoleConfig:
    path: str  # a folder holding <name>.inter (+ .item, .user), or the .inter file itself


def _read_delimited(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """A headerless delimited file of strings; a multi-character separator is rewritten to a tab first."""
    if not path.is_file():
        raise DataLoadError(f"{path}: file not found")
    data = read_bytes(path)
    if len(sep) > 1:
        data, sep = data.replace(sep.encode(), b"\t"), "\t"
    try:
        return pd.read_csv(
            io.BytesIO(data), sep=sep, names=names, header=None, dtype=str, encoding=encoding,
            quoting=csv.QUOTE_NONE, keep_default_na=False,
        )  # fmt: skip
    except (pd.errors.ParserError, ValueError) as e:
        raise DataLoadError(f"{path}: cannot parse ({e})") from e


def _ratings(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    rating = pd.to_numeric(frame["rating"], errors="coerce")
    timestamp = pd.to_numeric(frame["timestamp"], errors="coerce")
    bad = rating.isna() | timestamp.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataLoadError(
            f"{path}:{row + 1}: rating and timestamp must be numbers, got {frame.iloc[row].tolist()}"
        )
    return pd.DataFrame(
        {
            "raw_user_id": frame["user"],
            "raw_item_id": frame["item"],
            "rating": rating.astype("float64"),
            "timestamp": as_int64(timestamp, "timestamp", path),
        }
    )


def _load_ml100k(folder: Path) -> RawData:
    inter = _ratings(
        _read_delimited(folder / "u.data", "\t", ["user", "item", "rating", "timestamp"]), folder / "u.data"
    )
    genre_path = folder / "u.genre"
    genres = list(ML100K_GENRES)
    if genre_path.is_file():
        genres = [g for g in _read_delimited(genre_path, "|", ["name", "index"])["name"] if g]
    raw_items = _read_delimited(
        folder / "u.item", "|", ["item", "title", "date", "video_date", "url", *genres]
    )
    flags = raw_items[genres].to_numpy() == "1"  # (num_items, num_genres)
    genre_names = np.array(genres, dtype=object)
    items = pd.DataFrame(
        {
            "raw_item_id": raw_items["item"],
            "title": raw_items["title"],
            "categories": [list(genre_names[row]) for row in flags],
            "brand": "",
            "price": np.nan,
        }
    )
    users = _read_delimited(
        folder / "u.user", "|", ["raw_user_id", "age", "gender", "occupation", "zip_code"]
    )
    return RawData(interactions=inter, items=items, users=users)


def _load_ml1m(folder: Path) -> RawData:
    path = folder / "ratings.dat"
    inter = _ratings(_read_delimited(path, "::", ["user", "item", "rating", "timestamp"]), path)
    movies = _read_delimited(folder / "movies.dat", "::", ["item", "title", "genres"])
    items = pd.DataFrame(
        {
            "raw_item_id": movies["item"],
            "title": movies["title"],
            "categories": movies["genres"].str.split("|").map(lambda g: [x for x in g if x]),
            "brand": "",
            "price": np.nan,
        }
    )
    users = None
    if (folder / "users.dat").is_file():
        users = _read_delimited(
            folder / "users.dat", "::", ["raw_user_id", "gender", "age", "occupation", "zip_code"]
        )
    return RawData(interactions=inter, items=items, users=users)


def load_movielens(cfg: MovieLensConfig) -> RawData:
    folder = Path(cfg.path)
    if (folder / "u.data").is_file():
        return _load_ml100k(folder)
    if (folder / "ratings.dat").is_file():
        return _load_ml1m(folder)
    raise DataLoadError(
        f"{folder}: no MovieLens files (expected u.data for ml-100k or ratings.dat for ml-1m)"
    )


# ---------------------------------------------------------------------------------------------- RecBole
def read_atomic(path: Path, required: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, str]]:
    """A RecBole atomic file as str columns named without their type, plus {name: type}; ``required`` columns
    must be present."""
    if not path.is_file():
        raise DataLoadError(f"{path}: file not found")
    try:
        frame = pd.read_csv(
            path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8"
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataLoadError(f"{path}: cannot parse as a RecBole atomic file ({e})") from e
    types = {}
    for cell in frame.columns:
        name, sep, kind = cell.partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataLoadError(
                f"{path}:1: header cell {cell!r} is not 'name:type' with type token/token_seq/float/float_seq"
            )
        types[name] = kind
    frame.columns = list(types)
    for column in required:
        if column not in frame.columns:
            raise DataLoadError(f"{path}: no {column!r} column (found {list(frame.columns)})")
    return frame, types


def _pick(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


def load_recbole(cfg: RecBoleConfig) -> RawData:
    path = Path(cfg.path)
    if path.is_dir():
        found = sorted(path.glob("*.inter"))
        if len(found) != 1:
            raise DataLoadError(f"{path}: expected exactly one *.inter file, found {[p.name for p in found]}")
        path = found[0]
    if path.suffix != ".inter":
        raise DataLoadError(f"{path}: expected a RecBole .inter file (or the folder holding it)")
    report = LoadReport()
    inter, _ = read_atomic(path, required=("user_id", "item_id"))
    if "rating" not in inter.columns and "label" not in inter.columns:
        raise DataLoadError(f"{path}: needs a 'rating' or a 'label' column (found {list(inter.columns)})")
    interactions = pd.DataFrame({"raw_user_id": inter["user_id"], "raw_item_id": inter["item_id"]})
    for column in ("rating", "label", "timestamp"):
        if column in inter.columns:
            values = pd.to_numeric(inter[column].replace("", np.nan), errors="coerce")
            if values.isna().any():
                row = int(np.flatnonzero(values.isna().to_numpy())[0])
                raise DataLoadError(
                    f"{path}:{row + 2}: column {column!r} must be numeric, got {inter[column].iloc[row]!r}"
                )
            interactions[column] = values.astype("int8" if column == "label" else "float64")
    if "timestamp" in interactions.columns:
        interactions["timestamp"] = as_int64(
            interactions["timestamp"], "column 'timestamp'", path, first_row=2
        )
    if "review" in inter.columns:
        interactions["review"] = inter["review"]

    items = None
    item_path = path.with_suffix(".item")
    if item_path.is_file():
        meta, types = read_atomic(item_path, required=("item_id",))
        title, cats = _pick(meta, RECBOLE_TITLE), _pick(meta, RECBOLE_CATEGORIES)
        categories = pd.Series([[]] * len(meta), dtype=object)
        if cats is not None:
            # token_seq cells are space-separated tokens; a plain token is one category.
            categories = (
                meta[cats].str.split()
                if types[cats] == "token_seq"
                else meta[cats].map(lambda c: [c] if c else [])
            )
        items = pd.DataFrame(
            {
                "raw_item_id": meta["item_id"],
                "title": meta[title] if title else "",
                "categories": categories,
                "brand": meta["brand"] if "brand" in meta.columns else "",
                "price": pd.to_numeric(meta["price"], errors="coerce") if "price" in meta.columns else np.nan,
            }
        )
    users = None
    user_path = path.with_suffix(".user")
    if user_path.is_file():
        users, _ = read_atomic(user_path, required=("user_id",))
        users = users.rename(columns={"user_id": "raw_user_id"})
    return RawData(interactions=interactions, items=items, users=users, report=report)
