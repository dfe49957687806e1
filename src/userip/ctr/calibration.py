"""Platt scaling of a CTR model's logit, fitted on validation: ``p = sigmoid(scale * logit + bias)``.

Why Platt (two parameters) and not temperature (scale only) or isotonic regression:

* the models overfit their probabilities (runs stop on validation AUC, so the last epochs sharpen the
  logits) and, with sampled negatives or a shift between splits, the base rate moves too: a bias term costs
  nothing and fixes the second, which temperature scaling cannot;
* it is a strictly increasing affine map of the logit, so AUC (and every ranking) is exactly unchanged and
  serving folds it into two scalar operations on the logit (Table 6 latency does not move);
* isotonic regression is piecewise constant: it ties scores that were ordered (AUC changes, usually down),
  needs its breakpoints shipped with the model, and with a few thousand validation rows per model its
  extra freedom overfits; it was not adopted.

The fit is an unregularised logistic regression of the label on the logit (Newton's method in float64 with
a backtracking line search: two parameters, a handful of iterations). A negative fitted scale (a model that
ranks validation rows backwards) would reverse the ranking; then only the bias is fitted.

The calibration is stored with the weights: two float64 tensors ``calibration.scale`` and
``calibration.bias`` in the model's safetensors file, covered by its content hash
(``userip.utils.artifacts``). ``split_calibration`` takes them out of a loaded state dict; a file without
them (older runs) means no calibration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import ArrayLike

from userip.utils.artifacts import CorruptArtifactError
from userip.utils.logging import get_logger

log = get_logger(__name__)

SCALE_KEY = "calibration.scale"
BIAS_KEY = "calibration.bias"
CALIBRATION_KEYS = (SCALE_KEY, BIAS_KEY)
CALIBRATION_METHODS = ("platt", "none")
_MAX_NEWTON_STEPS = 100
_PROB_EPS = 1e-7  # the metrics' clipping (evaluation.metrics.DEFAULT_EPS): logit(0) and logit(1) stay finite


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``sigmoid(scale * logit + bias)``; the identity (1, 0) means uncalibrated."""

    scale: float = 1.0
    bias: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.bias == 0.0

    def logits(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated logits (float64)."""
        return self.scale * np.asarray(logits, dtype=np.float64) + self.bias

    def probs(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated click probabilities (float32, like every scorer's output)."""
        return _sigmoid(self.logits(logits)).astype(np.float32)

    def sigmoid(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities of a logit tensor, for serving: two scalar operations, none for the
        identity (the same float32 arithmetic as ``torch.sigmoid(scale * logits + bias)``)."""
        if self.is_identity:
            return torch.sigmoid(logits)
        return torch.sigmoid(logits.mul(self.scale).add_(self.bias))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            SCALE_KEY: torch.tensor(self.scale, dtype=torch.float64),
            BIAS_KEY: torch.tensor(self.bias, dtype=torch.float64),
        }


IDENTITY = Calibration()


def split_calibration(
    state: Mapping[str, torch.Tensor], where: str = "state dict"
) -> tuple[Calibration | None, dict[str, torch.Tensor]]:
    """(the calibration stored in a state dict, or None when it has none; the state dict without it).
    A partial or malformed one (not two finite scalars, scale <= 0) is a ``CorruptArtifactError``."""
    rest = {k: v for k, v in state.items() if k not in CALIBRATION_KEYS}
    present = [k for k in CALIBRATION_KEYS if k in state]
    if not present:
        return None, rest
    values = [state[k] for k in CALIBRATION_KEYS if k in state]
    if len(present) != len(CALIBRATION_KEYS) or any(v.numel() != 1 for v in values):
        raise CorruptArtifactError(
            f"{where}: calibration must be two scalar tensors {list(CALIBRATION_KEYS)}, found "
            f"{ {k: tuple(state[k].shape) for k in present} }"
        )
    scale, bias = (float(state[k]) for k in CALIBRATION_KEYS)
    if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
        raise CorruptArtifactError(f"{where}: calibration scale {scale} / bias {bias} (scale must be > 0)")
    return Calibration(scale, bias), rest


def probs_to_logits(probs: ArrayLike) -> np.ndarray:
    """Logits of probabilities (for scorers that give probabilities only), clipped like the metrics."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(logits: ArrayLike, labels: ArrayLike) -> Calibration:
    """Maximum-likelihood ``(scale, bias)`` of ``labels ~ Bernoulli(sigmoid(scale * logit + bias))``."""
    x = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"fit_platt needs one label per logit, got {x.size} logits and {y.size} labels")
    if not np.isfinite(x).all():
        raise ValueError("fit_platt: logits contain NaN or inf")
    features = np.stack([x, np.ones_like(x)], axis=1)
    params = _newton(features, y, np.array([1.0, 0.0]))
    if params[0] <= 0:  # a backwards ranking on validation: never reverse the model's order
        log.info(
            "calibration: fitted scale %.4g <= 0 (validation AUC < 0.5?); fitting the bias only", params[0]
        )
        bias = _newton(features[:, 1:], y, np.array([0.0]), offset=x)[0]
        return Calibration(1.0, float(bias))
    return Calibration(float(params[0]), float(params[1]))


def fit_calibration(method: str, logits: ArrayLike, labels: ArrayLike) -> Calibration:
    """``method`` ``platt`` (fit_platt) or ``none`` (the identity)."""
    if method == "none":
        return IDENTITY
    if method == "platt":
        return fit_platt(logits, labels)
    raise ValueError(f"calibration method {method!r}; accepted: {list(CALIBRATION_METHODS)}")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _newton(
    features: np.ndarray, y: np.ndarray, start: np.ndarray, offset: np.ndarray | float = 0.0
) -> np.ndarray:
    """Minimise the mean logistic NLL of ``features @ w + offset`` from ``start`` (Newton, backtracking)."""
    w = start.astype(np.float64)
    loss = _nll(features @ w + offset, y)
    for _ in range(_MAX_NEWTON_STEPS):
        z = features @ w + offset
        p = _sigmoid(z)
        grad = features.T @ (p - y) / len(y)
        hess = (features * (p * (1 - p))[:, None]).T @ features / len(y)
        hess += 1e-12 * np.eye(len(w))  # a separable or constant column keeps the system solvable
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            candidate = w - t * step
            new_loss = _nll(features @ candidate + offset, y)
            if math.isfinite(new_loss) and new_loss <= loss:
                break
            t *= 0.5
        else:
            break  # no descent along the Newton direction: converged to float precision
        converged = abs(loss - new_loss) < 1e-15 and float(np.max(np.abs(t * step))) < 1e-9
        w, loss = candidate, new_loss
        if converged:
            break
    return w
