"""CTR metrics as pure functions: AUC, Logloss, the paper's relative improvements, and seed statistics.

All functions take array-likes, never mutate them, and compute in float64. Undefined cases (one class only,
a base AUC of exactly 0.5, fewer than two paired seeds) raise ``ValueError`` naming the cause instead of
returning a silent NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from sklearn.metrics import roc_auc_score

DEFAULT_EPS = 1e-7
# Below this many seeds the exact two-sided Wilcoxon test cannot reach p < 0.05 (n = 5: p >= 0.0625).
MIN_WILCOXON_PAIRS = 6


def _labels_probs(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        raise ValueError("labels and probs are empty")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or inf")
    return y, p


def auc(labels: ArrayLike, probs: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half). Scores need not be probabilities, only rankable."""
    y, p = _labels_probs(labels, probs)
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise ValueError(f"AUC is undefined with one class only ({positives} positives of {y.size})")
    return float(roc_auc_score(y, p))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = DEFAULT_EPS) -> float:
    """Mean binary cross-entropy; probs are clipped to [eps, 1 - eps] so a confident miss stays finite."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    y, p = _labels_probs(labels, probs)
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probs must lie in [0, 1] (apply a sigmoid to logits first)")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def ctr_metrics(
    labels: ArrayLike, probs: ArrayLike, calibrated_probs: ArrayLike | None = None
) -> dict[str, float]:
    """``{"auc", "logloss"}`` of one split's predictions: what every table and checkpoint choice reads.

    With ``calibrated_probs`` (the same scores after a calibration, a monotone map: AUC stays the raw
    scores'), ``logloss`` is theirs and the raw probabilities' is added as ``logloss_raw``.
    """
    if calibrated_probs is None:
        return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, calibrated_probs),
        "logloss_raw": logloss(labels, probs),
    }


def rela_impr_auc(auc_value: float, base_auc: float) -> float:
    """Paper's RelaImpr on AUC: (AUC - 0.5) / (AUC_base - 0.5) - 1 (gain over random guessing, relative)."""
    if base_auc == 0.5:
        raise ValueError("RelaImpr_AUC is undefined for a base AUC of exactly 0.5")
    return (auc_value - 0.5) / (base_auc - 0.5) - 1.0


def rela_impr_logloss(logloss_value: float, base_logloss: float) -> float:
    """Paper's RelaImpr on Logloss: (LL_base - LL) / LL (positive when the model's loss is lower)."""
    if logloss_value <= 0:
        raise ValueError(f"RelaImpr_LL needs a positive logloss, got {logloss_value}")
    return (base_logloss - logloss_value) / logloss_value


def mean_std(values: Sequence[float] | ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as pandas reports it); std is 0.0 for a single value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_std of an empty sequence")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class PairedTestResult:
    """Paired comparison of scores a and b over the same seeds (difference = a - b)."""

    num_pairs: int
    mean_diff: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float | None  # None when there are too few pairs or every difference is zero
    wilcoxon_pvalue: float | None

    def significant(self, alpha: float = 0.05) -> bool:
        """True if the paired t-test rejects equal means at level ``alpha`` (NaN p-values never do)."""
        return not math.isnan(self.t_pvalue) and self.t_pvalue < alpha


def paired_test(
    a_scores: Sequence[float] | ArrayLike, b_scores: Sequence[float] | ArrayLike
) -> PairedTestResult:
    """Two-sided paired t-test of per-seed scores (scipy), plus a Wilcoxon signed-rank test when n permits.

    ``a_scores[i]`` and ``b_scores[i]`` must come from the same seed (same split and init stream). When every
    difference is equal (to within float rounding) the t statistic is undefined: it is reported as +-inf
    with p = 0 if the common difference is non-zero, and NaN with p = 1 if it is zero.
    """
    a = np.asarray(a_scores, dtype=np.float64).ravel()
    b = np.asarray(b_scores, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs one score per seed on both sides: {a.size} vs {b.size}")
    if a.size < 2:
        raise ValueError(f"paired_test needs at least 2 paired seeds, got {a.size}")
    diff = a - b
    mean_diff = float(diff.mean())
    if np.allclose(diff, diff[0], rtol=1e-9, atol=1e-12):
        # (Numerically) zero variance: scipy would warn and return NaN or a huge t; decide by hand.
        t_stat, t_p = (math.copysign(math.inf, mean_diff), 0.0) if mean_diff != 0 else (math.nan, 1.0)
    else:
        res = stats.ttest_rel(a, b)
        t_stat, t_p = float(res.statistic), float(res.pvalue)
    w_stat: float | None = None
    w_p: float | None = None
    if a.size >= MIN_WILCOXON_PAIRS and np.any(diff != 0):
        w = stats.wilcoxon(a, b)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedTestResult(a.size, mean_diff, t_stat, t_p, w_stat, w_p)


@dataclasses.dataclass(frozen=True)
class NoiseAwareChoice:
    """``choose_simplest_within_noise``'s decision and its evidence, one entry per candidate."""

    chosen: int  # index of the chosen candidate
    best: int  # index of the candidate with the highest mean score
    means: tuple[float, ...]  # mean score over seeds (NaN when not every seed ran)
    gaps: tuple[float, ...]  # mean paired difference best - candidate (0 for the best)
    gap_ses: tuple[float, ...]  # standard error of that paired difference (std ddof=1 / sqrt(seeds))
    within_noise: tuple[bool, ...]  # complete and gap <= threshold * gap_se


def choose_simplest_within_noise(
    scores: Sequence[Sequence[float]] | ArrayLike,
    threshold: float = 2.0,
    complexity: Sequence[int] | None = None,
) -> NoiseAwareChoice:
    """The simplest candidate whose validation score is not clearly below the best one's.

    ``scores[c][s]``: candidate ``c``'s score (higher is better) on seed ``s``, the same seeds for every
    candidate; NaN marks a cell that was not run (a pruned candidate),
    which makes that candidate ineligible. The best candidate has the highest mean over seeds (ties: the
    earlier). A candidate is within noise of it when the mean of the paired differences best - candidate is
    at most ``threshold`` standard errors of those differences, i.e. the paired t statistic of the best
    against it is at most ``threshold``; with one seed there is no error estimate and only ties are within
    noise. The choice is the simplest candidate within noise: a richer setting wins only when its gain over
    every simpler one is above noise.

    ``complexity[c]`` (lower = simpler) says which candidates are simpler than which; among the simplest
    candidates within noise the highest mean wins. None: the order itself (candidate c has complexity c).
    Give equal complexity to settings that are not simpler than one another (two learning rates), so that
    the rule protects the simpler *model* (a warm start that keeps DCN, fewer fields) without handing a
    hyper-parameter grid to its first value whenever the seeds are noisy.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty (candidates, seeds) array, got shape {s.shape}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    complete = ~np.isnan(s).any(axis=1)
    if not complete.any():
        raise ValueError("no candidate has a score on every seed")
    means = s.mean(axis=1)  # NaN for an incomplete candidate
    best = int(np.flatnonzero(means == np.nanmax(means))[0])
    diffs = s[best] - s
    gaps = diffs.mean(axis=1)
    num_seeds = s.shape[1]
    ses = diffs.std(axis=1, ddof=1) / math.sqrt(num_seeds) if num_seeds > 1 else np.zeros(len(s))
    # A difference that is constant up to float rounding has no spread: compare the gap with 0 alone.
    ses = np.where(ses < 1e-12 * np.maximum(1.0, np.abs(gaps)), 0.0, ses)
    within = complete & (gaps <= threshold * ses)
    rank = np.arange(len(s)) if complexity is None else np.asarray(complexity, dtype=np.int64)
    if rank.shape != (len(s),):
        raise ValueError(f"complexity must give one rank per candidate ({len(s)}), got {len(rank)}")
    simplest = within & (rank == rank[within].min())
    chosen = int(np.flatnonzero(simplest)[np.argmax(means[simplest])])
    return NoiseAwareChoice(
        chosen,
        best,
        tuple(float(m) for m in means),
        tuple(float(g) for g in gaps),
        tuple(float(e) for e in ses),
        tuple(bool(w) for w in within),
    )


def hopeless_candidates(first_seed_scores: Sequence[float] | ArrayLike, margin: float | None) -> set[int]:
    """Candidates to drop after the first seed of a search: those whose score is more than ``margin`` below
    that seed's best (None: drop none). The first candidate (the simplest) never is, so the rule of
    ``choose_simplest_within_noise`` always has it to fall back on."""
    if margin is None:
        return set()
    first = np.asarray(first_seed_scores, dtype=np.float64)
    return {c for c in range(1, len(first)) if first[c] < np.nanmax(first) - margin}
