"""Platt calibration (userip.ctr.calibration) against independent fits: scikit-learn and scipy."""

import numpy as np
import pytest
import torch
from scipy import optimize
from sklearn.linear_model import LogisticRegression

from userip.ctr.calibration import (
    IDENTITY,
    Calibration,
    fit_calibration,
    fit_platt,
    probs_to_logits,
    split_calibration,
)
from userip.ctr.trainer import CheckpointChoice
from userip.evaluation import auc, logloss
from userip.utils.artifacts import CorruptArtifactError


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits 3x too sharp and shifted by +1 relative to the true log-odds of their labels."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-0.5, 1.2, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.float64)
    return 3.0 * true_logit + 1.0, labels


def test_platt_equals_sklearn_and_scipy_maximum_likelihood():
    logits, labels = overconfident(4000, 0)
    fitted = fit_platt(logits, labels)

    sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logits[:, None], labels)
    assert fitted.scale == pytest.approx(sk.coef_[0, 0], abs=1e-5)
    assert fitted.bias == pytest.approx(sk.intercept_[0], abs=1e-5)

    def nll(w: np.ndarray) -> float:
        z = w[0] * logits + w[1]
        return float(np.mean(np.logaddexp(0, z) - labels * z))

    sp = optimize.minimize(nll, x0=[1.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-14})
    assert fitted.scale == pytest.approx(sp.x[0], abs=1e-4) and fitted.bias == pytest.approx(
        sp.x[1], abs=1e-4
    )
    # The planted distortion is undone: scale ~ 1/3, bias ~ -1/3.
    assert fitted.scale == pytest.approx(1 / 3, abs=0.03) and fitted.bias == pytest.approx(-1 / 3, abs=0.06)


def test_calibration_keeps_auc_and_lowers_held_out_logloss():
    valid_logits, valid_labels = overconfident(3000, 1)
    test_logits, test_labels = overconfident(3000, 2)
    calibration = fit_calibration("platt", valid_logits, valid_labels)
    raw = 1 / (1 + np.exp(-test_logits))
    calibrated = calibration.probs(test_logits)
    assert calibrated.dtype == np.float32
    assert auc(test_labels, calibrated) == pytest.approx(auc(test_labels, raw), abs=1e-12)
    assert logloss(test_labels, calibrated) < logloss(test_labels, raw) - 0.1
    assert fit_calibration("none", valid_logits, valid_labels) is IDENTITY
    with pytest.raises(ValueError, match="calibration method"):
        fit_calibration("isotonic", valid_logits, valid_labels)


def test_backwards_ranking_is_never_reversed():
    logits, labels = overconfident(2000, 3)
    calibration = fit_platt(-logits, labels)  # a model that ranks validation backwards
    assert calibration.scale == 1.0  # bias only: the model's order is kept
    expected_bias = optimize.minimize_scalar(
        lambda b: float(np.mean(np.logaddexp(0, -logits + b) - labels * (-logits + b)))
    ).x
    assert calibration.bias == pytest.approx(expected_bias, abs=1e-5)


def test_separable_and_probability_inputs_stay_finite():
    logits = np.array([-2.0, -1.0, 1.0, 2.0])
    calibration = fit_platt(logits, np.array([0, 0, 1, 1]))
    assert np.isfinite([calibration.scale, calibration.bias]).all() and calibration.scale > 0
    assert np.isfinite(probs_to_logits([0.0, 0.5, 1.0])).all()
    assert probs_to_logits([0.5])[0] == 0.0


def test_stored_with_the_weights_and_checked_on_load():
    state = {"w": torch.ones(2), **Calibration(0.5, -0.25).to_tensors()}
    calibration, rest = split_calibration(state)
    assert calibration == Calibration(0.5, -0.25) and set(rest) == {"w"}
    none, rest = split_calibration({"w": torch.ones(2)})
    assert none is None and set(rest) == {"w"}
    with pytest.raises(CorruptArtifactError, match="two scalar tensors"):
        split_calibration({"calibration.scale": torch.tensor(1.0)}, "m.safetensors")
    bad = {**state, "calibration.scale": torch.tensor(-1.0, dtype=torch.float64)}
    with pytest.raises(CorruptArtifactError, match="scale must be > 0"):
        split_calibration(bad, "m.safetensors")


def test_checkpoint_rule_on_a_synthetic_epoch_sequence():
    model = torch.nn.Linear(1, 1)
    choice = CheckpointChoice(tolerance=0.001)
    # (AUC, calibrated Logloss) per epoch
    epochs = {1: (0.80, 0.50), 2: (0.85, 0.48), 3: (0.8495, 0.45), 4: (0.86, 0.47), 5: (0.8595, 0.46)}
    changes = []
    for epoch, (auc_value, ll) in epochs.items():
        with torch.no_grad():
            model.weight.fill_(epoch)  # the weights of that epoch
        changes.append(choice.offer(epoch, auc_value, ll, Calibration(1.0 / epoch, 0.0), model))
    # Epoch 3 wins on Logloss while within 0.001 of epoch 2, then leaves the window when epoch 4 raises the
    # best AUC to 0.86; among 4 and 5 (within 0.001), 5 has the lower Logloss.
    assert changes == [True, True, True, True, True]
    assert choice.chosen == 5 and set(choice.kept) == {4, 5}
    assert float(choice.kept[5].state["weight"]) == 5.0 and choice.kept[5].calibration.scale == 0.2
    # Tolerance 0: the best AUC alone.
    strict = CheckpointChoice(tolerance=0.0)
    for epoch, (auc_value, ll) in epochs.items():
        strict.offer(epoch, auc_value, ll, IDENTITY, model)
    assert strict.chosen == 4
