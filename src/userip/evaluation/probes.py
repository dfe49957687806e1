"""Linear probes: what do the learned user profiles know about facts they never saw?

On real data there are no true profiles to recover, so the profile IDs are judged by what a linear classifier
can read off them: observable user attributes (gender, age, occupation; never in the prompt) and facts about
the *held-out* interactions (positive rate, favourite genre), which the profiles, inferred from training rows
only, cannot have seen. The same probes run on baselines built from the very rows the profiles were inferred
from (bag of items, bag of categories) and on random vectors (chance level, ~0.5), so a table reads as "the
profile IDs keep x of what the raw history tells".

    usage = code_usage(codes, bank.profile_names, bank.codebook_sizes)   # userip.profile.bank
    table = probe_report(dataset, {"profile_ids": one_hot_codes(codes, sizes)}, dataset.split("train"))
    print(probe_markdown(table))
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler, normalize
from threadpoolctl import threadpool_limits

from userip.data.schema import Dataset
from userip.evaluation.tables import markdown_table
from userip.utils.threads import choose_threads

log = logging.getLogger(__name__)

Features = np.ndarray | sp.spmatrix | sp.sparray

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse L2 strength, chosen per outer fold by inner CV
INNER_FOLDS = 3
HELD_OUT_SPLITS = ("valid", "test")
NUM_TOP_GENRES = 2
# Nested-CV probes cost ~2 min on ML-100K's 943 users and 18 min on a 5,000-user sample of Yelp (a wide
# category bag); a seeded sample of this many users keeps large sets to minutes (AUC std about 0.01-0.02).
MAX_PROBE_USERS = 2000
# Bump when ``user_truths`` gains or changes a target: cached diagnostics keyed by it are then recomputed.
TARGETS_VERSION = 2
# MovieLens-1M stores occupation as a code: 4 = "college/grad student", 10 = "K-12 student".
_ML1M_STUDENT_CODES = frozenset({"4", "10"})


# ---------------------------------------------------------------------------------------------- targets
def user_truths(
    dataset: Dataset, users: np.ndarray, held_out_splits: Sequence[str] = HELD_OUT_SPLITS
) -> dict[str, np.ndarray]:
    """Binary probe targets for ``users`` (float arrays aligned with them, NaN where undefined).

    Every target is something the profiles never saw: user attributes (not in the prompt) and facts of the
    rows whose split is in ``held_out_splits`` (the profiles are inferred from train rows). Present only when
    the source has the column / held-out rows:

    - ``gender_male``: gender "M" vs "F" (other values NaN);
    - ``age_under_30``: age as a number < 30 (non-numeric ages, e.g. "18-24" buckets, NaN; on MovieLens-1M
      the age is the bucket's lower bound, so "25" = 25-34 counts as under 30);
    - ``student``: occupation "student" (MovieLens-1M codes 4 and 10 when the column is all digits);
    - ``heldout_positive_rate_high``: mean held-out label above the median over ``users`` with held-out rows;
    - ``heldout_items_popular``: the mean popularity of a user's held-out positives (how many held-out
      positives of all users each item has) above the median over ``users``: a taste for hits rather than
      niche items, defined on implicit data too, where every user's positive rate is the same;
    - ``heldout_top_genre_is_<g>`` for the ``NUM_TOP_GENRES`` most common favourite categories ``g``: a user's
      favourite is the most frequent category of their held-out positives (ties: the category more frequent
      over all held-out positives, then by name); NaN for users without held-out positives.
    """
    user_ids = np.asarray(users, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    attrs = dataset.users.set_index("user_id").reindex(user_ids)
    if "gender" in attrs.columns:
        gender = _clean_str(attrs["gender"]).str.upper()
        out["gender_male"] = _binary(gender == "M", gender.isin(["M", "F"]))
    if "age" in attrs.columns:
        age = pd.to_numeric(attrs["age"], errors="coerce")
        out["age_under_30"] = _binary(age < 30, age.notna())
    if "occupation" in attrs.columns:
        occupation = _clean_str(attrs["occupation"]).str.lower()
        present = occupation != ""
        if present.any() and occupation[present].str.fullmatch(r"\d+").all():
            is_student = occupation.isin(_ML1M_STUDENT_CODES)
        else:
            is_student = occupation == "student"
        out["student"] = _binary(is_student, present)

    inter = dataset.interactions
    held_out = inter[inter["split"].isin(list(held_out_splits)) & inter["user_id"].isin(user_ids)]
    if len(held_out) == 0:
        log.warning("no held-out rows (splits %s) for these users: held-out targets skipped", held_out_splits)
        return out
    if not dataset.is_implicit:  # implicit: every evaluated positive has its k negatives, a constant rate
        rate = held_out.groupby("user_id")["label"].mean().reindex(user_ids)
        out["heldout_positive_rate_high"] = _binary(rate > rate.median(), rate.notna())

    all_positives = inter[inter["split"].isin(list(held_out_splits)) & (inter["label"] == 1)]
    popularity = all_positives["item_id"].value_counts()  # over every user, so a sample sees the same counts
    positives = held_out[held_out["label"] == 1]
    taste = positives["item_id"].map(popularity).groupby(positives["user_id"]).mean().reindex(user_ids)
    out["heldout_items_popular"] = _binary(taste > taste.median(), taste.notna())

    favourite = _favourite_category(dataset, positives).reindex(user_ids)
    ranked = favourite.dropna().value_counts().rename_axis("category").reset_index(name="count")
    ranked = ranked.sort_values(["count", "category"], ascending=[False, True])
    for genre in ranked["category"].head(NUM_TOP_GENRES):
        out[f"heldout_top_genre_is_{_slug(genre)}"] = _binary(favourite == genre, favourite.notna())
    return out


def _favourite_category(dataset: Dataset, rows: pd.DataFrame) -> pd.Series:
    """Each user's most frequent item category in ``rows`` (Series user_id -> category)."""
    cats = _item_categories(dataset).rename("category")
    pairs = rows[["user_id", "item_id"]].join(cats, on="item_id").explode("category").dropna()
    if len(pairs) == 0:
        return pd.Series(dtype=object)
    counts = pairs.groupby(["user_id", "category"]).size().rename("count").reset_index()
    counts["overall"] = counts["category"].map(pairs["category"].value_counts())
    counts = counts.sort_values(
        ["user_id", "count", "overall", "category"], ascending=[True, False, False, True]
    )
    return counts.drop_duplicates("user_id").set_index("user_id")["category"]


def _item_categories(dataset: Dataset) -> pd.Series:
    """item_id -> list of category strings (Parquet gives numpy arrays; normalize to lists)."""
    cats = dataset.items.set_index("item_id")["categories"]
    return cats.map(lambda v: [str(c) for c in v] if v is not None and len(v) else [])


def _clean_str(col: pd.Series) -> pd.Series:
    return col.astype(object).where(col.notna(), "").astype(str).str.strip()


def _binary(positive: pd.Series, defined: pd.Series) -> np.ndarray:
    return np.where(defined.to_numpy(bool), positive.to_numpy(bool).astype(float), np.nan)


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------------------------------------- features
def bag_of_items(dataset: Dataset, rows: pd.DataFrame, num_users: int) -> sp.csr_matrix:
    """(num_users, num_items) L2-normalized counts of each user's items in ``rows``, labels ignored.

    The baseline a profile must be judged against: everything the history it was inferred from holds, as a
    linear model can use it. Users without rows get an all-zero row.
    """
    counts = _user_item_counts(rows, num_users, dataset.num_items)
    return normalize(counts, norm="l2", axis=1).tocsr()


def bag_of_categories(dataset: Dataset, rows: pd.DataFrame, num_users: int) -> np.ndarray:
    """(num_users, num_categories) L2-normalized category counts of each user's items in ``rows``.

    Columns follow the sorted category names; an item with several categories counts for each.
    """
    cats = _item_categories(dataset)
    names = sorted({c for item_cats in cats for c in item_cats})
    col_of = {c: j for j, c in enumerate(names)}
    item_ids = np.repeat(cats.index.to_numpy(np.int64), cats.map(len).to_numpy())
    cat_ids = np.array([col_of[c] for item_cats in cats for c in item_cats], dtype=np.int64)
    item_cat = sp.csr_matrix(
        (np.ones(len(item_ids)), (item_ids, cat_ids)), shape=(dataset.num_items, len(names))
    )
    counts = _user_item_counts(rows, num_users, dataset.num_items) @ item_cat
    return normalize(np.asarray(counts.todense()), norm="l2", axis=1)


def _user_item_counts(rows: pd.DataFrame, num_users: int, num_items: int) -> sp.csr_matrix:
    u = rows["user_id"].to_numpy(np.int64)
    i = rows["item_id"].to_numpy(np.int64)
    return sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(num_users, num_items))  # duplicates are summed


def one_hot_codes(codes: np.ndarray, codebook_sizes: Sequence[int]) -> np.ndarray:
    """(num_users, sum K_p) one-hot of each profile's code, profiles side by side; unknown (-1) -> zeros."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.shape[1] != len(codebook_sizes):
        raise ValueError(f"codes have {codes.shape[1]} profiles, got {len(codebook_sizes)} codebook sizes")
    out = np.zeros((len(codes), int(sum(codebook_sizes))), dtype=np.float32)
    offset = 0
    for p, size in enumerate(codebook_sizes):
        col = codes[:, p]
        if col.max(initial=-1) >= size:
            raise ValueError(f"profile {p}: code {col.max()} outside codebook of size {size}")
        known = np.flatnonzero(col >= 0)
        out[known, offset + col[known]] = 1.0
        offset += size
    return out


def random_features(num_users: int, dim: int, seed: int = 0) -> np.ndarray:
    """Standard-normal vectors: the chance control (its probe AUCs should sit near 0.5)."""
    return np.random.default_rng(seed).standard_normal((num_users, dim)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- probes
def probe_auc(
    features: Features, target: np.ndarray, folds: int = 5, seed: int = 0, C: float | None = None
) -> float:
    """Cross-validated ROC AUC of an L2 logistic regression reading ``target`` from ``features``.

    Only users whose target is not NaN take part. Out-of-fold probabilities from ``StratifiedKFold(folds)``
    (``cross_val_predict(method="predict_proba")``) are pooled over the folds and scored by *one* AUC: more
    stable than a mean of per-fold AUCs when a class is small. Dense features are standardized inside each
    fold (a Pipeline, so test folds never inform the scaling); sparse ones (L2-normalized bags) are used as
    they are. ``C=None`` picks C from ``C_GRID`` by an inner ``INNER_FOLDS``-fold CV on each outer training
    fold (nested, so feature sets of very different widths each get a fair regularization); pass a float to
    fix it (faster). Returns NaN, with the reason logged, when a class has too few users for the folds.
    """
    target = np.asarray(target, dtype=float)
    features = sp.csr_matrix(features) if sp.issparse(features) else np.asarray(features)
    if features.ndim == 1:
        features = features[:, None]
    if features.shape[0] != len(target):
        raise ValueError(f"features have {features.shape[0]} rows, target has {len(target)}")
    keep = np.flatnonzero(~np.isnan(target))
    x = features[keep]
    y = target[keep].astype(np.int64)
    num_per_class = np.bincount(y, minlength=2)
    needed = folds if C is not None else max(folds, _min_class_for_inner_cv(folds))
    if len(num_per_class) != 2 or num_per_class.min() < needed:
        log.warning(
            "probe AUC is NaN: class sizes %s among %d users with a target; %d-fold CV%s needs >= %d "
            "per class",
            num_per_class.tolist(),
            len(y),
            folds,
            "" if C is not None else f" (with {INNER_FOLDS}-fold inner CV for C)",
            needed,
        )
        return float("nan")
    outer = StratifiedKFold(folds, shuffle=True, random_state=seed)
    # BLAS threads by the project's rule (userip.utils.threads): an L-BFGS iteration is ~4 x N x D FLOPs.
    threads, _ = choose_threads(None, 4.0 * x.shape[0] * x.shape[1])
    with threadpool_limits(limits=threads):
        scores = cross_val_predict(
            _probe_model(sp.issparse(x), C, seed), x, y, cv=outer, method="predict_proba"
        )
    return float(roc_auc_score(y, scores[:, 1]))


def _probe_model(sparse: bool, C: float | None, seed: int):
    steps = [] if sparse else [("scale", StandardScaler())]
    steps.append(("logreg", LogisticRegression(C=1.0 if C is None else C, max_iter=2000)))
    model = Pipeline(steps)
    if C is not None:
        return model
    inner = StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=seed)
    return GridSearchCV(model, {"logreg__C": list(C_GRID)}, scoring="roc_auc", cv=inner)


def _min_class_for_inner_cv(folds: int) -> int:
    """Smallest class size whose every outer training fold still holds ``INNER_FOLDS`` members."""
    n = INNER_FOLDS
    while n - -(-n // folds) < INNER_FOLDS:
        n += 1
    return n


def probe_table(
    feature_sets: Mapping[str, Features],
    targets: Mapping[str, np.ndarray],
    folds: int = 5,
    seed: int = 0,
    C: float | None = None,
) -> pd.DataFrame:
    """Probe AUC of every feature set (rows) on every target (columns); see ``probe_auc``.

    ``table.attrs["num_users"]`` holds, per target, ``(users with a value, positives)``.
    """
    table = pd.DataFrame(
        {
            name: [probe_auc(feats, target, folds, seed, C) for feats in feature_sets.values()]
            for name, target in targets.items()
        },
        index=pd.Index(list(feature_sets), name="features"),
    )
    table.attrs["num_users"] = {
        name: (int((~np.isnan(t)).sum()), int(np.nansum(t))) for name, t in targets.items()
    }
    return table


def probe_report(
    dataset: Dataset,
    feature_sets: Mapping[str, Features],
    profile_rows: pd.DataFrame,
    users: np.ndarray | None = None,
    held_out_splits: Sequence[str] = HELD_OUT_SPLITS,
    folds: int = 5,
    seed: int = 0,
    C: float | None = None,
    random_dim: int | None = None,
    max_users: int | None = MAX_PROBE_USERS,
) -> pd.DataFrame:
    """``probe_table`` of the given feature sets plus the baselines, on ``user_truths``; with more than
    ``max_users`` users, on a seeded sample of them (None: all).

    ``feature_sets`` rows are aligned with ``users`` (default: every dataset user). Baselines are built from
    ``profile_rows``, the rows the profiles were inferred from: ``bag_of_items``, ``bag_of_categories``, and
    ``random`` vectors (``random_dim`` wide; default the widest given feature set) as chance control.
    """
    user_ids = np.arange(dataset.num_users) if users is None else np.asarray(users, dtype=np.int64)
    baselines = {"bag_of_items": bag_of_items(dataset, profile_rows, dataset.num_users)[user_ids]}
    if _item_categories(dataset).map(len).sum():  # Amazon Games has titles only
        baselines["bag_of_categories"] = bag_of_categories(dataset, profile_rows, dataset.num_users)[user_ids]
    clash = set(feature_sets) & {*baselines, "random"}
    if clash:
        raise ValueError(f"feature set names {sorted(clash)} are reserved for the baselines")
    for name, feats in feature_sets.items():
        if feats.shape[0] != len(user_ids):
            raise ValueError(f"feature set {name!r} has {feats.shape[0]} rows for {len(user_ids)} users")
    widths = [feats.shape[1] if feats.ndim > 1 else 1 for feats in feature_sets.values()]
    dim = random_dim or max(widths, default=16)
    all_sets = {**feature_sets, **baselines, "random": random_features(len(user_ids), dim, seed)}
    rows = np.arange(len(user_ids))
    if max_users is not None and len(rows) > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
        log.info("probes on a seeded sample of %d of %d users", max_users, len(user_ids))
        all_sets = {name: feats[rows] for name, feats in all_sets.items()}
    return probe_table(all_sets, user_truths(dataset, user_ids[rows], held_out_splits), folds, seed, C)


def probe_markdown(table: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """``probe_table``/``probe_report`` as Markdown: best AUC per target **bold**, second underlined."""
    columns = list(table.columns)
    return markdown_table(
        table.reset_index(), mark_columns={c: True for c in columns}, float_format=float_format
    )
