"""The CTR stage as one plain recipe: setup (data, fields, model) -> train -> evaluate -> save.

``train_ctr`` is a library call: it prints nothing (logging goes to the ``userip`` logger, silent unless a
handler is configured; ``CTRTrainerConfig.progress`` turns the tqdm bar on) and returns a ``CTRResult``
holding valid/test AUC and Logloss (calibrated on validation, ``userip.ctr.calibration``; the raw Logloss
beside it) plus the calibrated test probabilities, so an experiment runner can call it per seed and pair the
results. Given a run directory it reads ``RUN/data`` (and ``RUN/bank`` with profiles) and writes
``RUN/ctr/<model>[+profiles]/``: ``model.safetensors`` (weights and calibration), ``feature_map.json``,
``encoder.json``, ``config.json`` and, last, ``metrics.json`` (its presence marks a complete run). The folder
is built under a temporary name and moved into place only when training succeeds (``atomic_dir``): a run that
fails, on bad input or midway, leaves the earlier model folder byte-identical. ``config.json``
(``model_record``) is the key of the trained model: ``userip run`` reuses a folder only when it records the
config asked now and its ``metrics.json`` passes ``check_metrics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from userip.ctr.calibration import IDENTITY, Calibration
from userip.ctr.data import CTRData, ProfileBank, SplitTensors, build_ctr_data, freeze_field_rows
from userip.ctr.extend import extend_model
from userip.ctr.models import build_model, model_arguments
from userip.ctr.trainer import CTRTrainerConfig, FitResult, Trainer, calibrated_metrics, predict_logits
from userip.data.schema import Dataset
from userip.utils.artifacts import check_record
from userip.utils.config import to_dict
from userip.utils.io import atomic_dir, atomic_write_json
from userip.utils.logging import get_logger
from userip.utils.run_layout import RunLayout
from userip.utils.seed import seed_everything

log = get_logger(__name__)

MODEL_FILE = "model.safetensors"
FEATURE_MAP_FILE = "feature_map.json"
ENCODER_FILE = "encoder.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EXTENSION_CHECK_ROWS = 1024  # training rows on which an extended model must reproduce its base's logits


def output_name(model_name: str, with_profiles: bool) -> str:
    """Folder name under ``RUN/ctr/``: ``dcn`` or ``dcn+profiles``."""
    return f"{model_name.lower()}+profiles" if with_profiles else model_name.lower()


@dataclasses.dataclass
class CTRResult:
    model_name: str
    with_profiles: bool
    seed: int
    valid: dict[str, float] | None  # {"auc", "logloss", "logloss_raw"}; None without a valid split
    test: dict[str, float]  # {"auc", "logloss" (calibrated), "logloss_raw"}
    test_labels: np.ndarray  # (N_test,) float32
    test_probs: np.ndarray  # (N_test,) float32 calibrated, aligned with the dataset's test rows in order
    fit: FitResult
    data: CTRData
    model: nn.Module  # trained, holding its best weights, in eval mode
    test_inference_samples_per_s: float
    output_dir: Path | None = None

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary (what ``metrics.json`` holds)."""
        return {
            "model": self.model_name,
            "with_profiles": self.with_profiles,
            "seed": self.seed,
            "valid": self.valid,
            "test": self.test,
            "best_epoch": self.fit.best_epoch,
            "calibration": dataclasses.asdict(self.fit.calibration),
            "stopped_early": self.fit.stopped_early,
            "num_rows": {name: len(split) for name, split in self.data.splits.items()},
            "fields": self.data.feature_map.names,
            "test_inference_samples_per_s": self.test_inference_samples_per_s,
            "history": [dataclasses.asdict(r) for r in self.fit.history],
        }


def score_test(
    model: nn.Module,
    split: SplitTensors,
    batch_size: int,
    device: Any,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """``CTRResult``'s test fields for ``model`` on ``split`` under ``calibration`` (fitted on validation;
    None: uncalibrated): ``test`` (AUC, calibrated and raw Logloss), ``test_labels``, ``test_probs``
    (calibrated) and ``test_inference_samples_per_s`` (the scoring pass, timed)."""
    calibration = calibration or IDENTITY
    start = time.perf_counter()
    logits = predict_logits(model, split.x_ids, batch_size, device)
    probs = calibration.probs(logits)
    samples_per_s = len(split) / max(time.perf_counter() - start, 1e-9)
    labels = split.labels.numpy()
    return {
        "test": calibrated_metrics(labels, logits, calibration),
        "test_labels": labels,
        "test_probs": probs,
        "test_inference_samples_per_s": samples_per_s,
    }


def load_bank(path: str | Path) -> ProfileBank:
    """Load the feature bank at ``path`` (``userip.feature_bank.FeatureBank``); clear error if absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no feature bank here; run `userip profile` first or pass --bank PATH"
        )
    from userip.feature_bank import FeatureBank  # imported late: only runs with profiles need it

    return FeatureBank.load(path)


def train_ctr(
    source: str | Path | Dataset,
    model_name: str = "dcn",
    *,
    with_profiles: bool = False,
    bank: ProfileBank | str | Path | None = None,
    user_features: Sequence[str] = (),
    model_config: Mapping[str, Any] | None = None,
    config: CTRTrainerConfig | None = None,
    seed: int | None = None,
    output_dir: str | Path | None = None,
    save: bool = True,
    trainer_factory: Callable[..., Trainer] = Trainer,
) -> CTRResult:
    """Train and evaluate one CTR model.

    ``source``: a run directory (reads ``RUN/data``) or a loaded ``Dataset``. With ``with_profiles`` the
    bank's profile IDs become extra fields; ``bank`` is a bank object or path, defaulting to ``RUN/bank`` for
    a run directory, and must have been built from this dataset (content hash). ``model_config`` holds keyword
    arguments of the model (``userip.ctr.models.model_arguments(name)`` lists them). ``seed`` overrides
    ``config.seed`` and also seeds the model's initialisation. Outputs go to ``output_dir``, defaulting to
    ``RUN/ctr/<model>[+profiles]`` for a run directory; nothing is written for a ``Dataset`` without
    ``output_dir`` or when ``save`` is False. ``trainer_factory(model, config, fixed_masks)`` makes the
    trainer (``userip.ctr.distributed`` passes its DDP trainer; a warm start's base model uses it too).
    """
    config = config or CTRTrainerConfig()
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    model_config = dict(model_config or {})
    model_arguments(model_name)  # fail on an unknown model name before loading anything

    run_dir: Path | None = None
    if isinstance(source, Dataset):
        dataset = source
    else:
        run_dir = Path(source)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: run directory not found")
        dataset = Dataset.load(run_dir)

    if bank is not None and not with_profiles:
        raise ValueError("a feature bank was given but with_profiles is False; set with_profiles=True")
    if with_profiles and bank is None:
        if run_dir is None:
            raise ValueError("with_profiles needs a bank (object or path) when source is a Dataset")
        bank = RunLayout(run_dir).bank
    if isinstance(bank, str | Path):
        bank = load_bank(bank)

    if output_dir is None and run_dir is not None:
        output_dir = RunLayout(run_dir).ctr / output_name(model_name, with_profiles)
    out = Path(output_dir) if (save and output_dir is not None) else None

    # ---- setup
    data = build_ctr_data(dataset, bank, user_features)
    if "train" not in data.splits or "test" not in data.splits:
        raise ValueError(f"dataset needs train and test interactions; has splits {sorted(data.splits)}")
    extend = config.warm_start and (with_profiles or bool(user_features))
    if extend and data.frozen_embeds:
        raise ValueError(
            "warm_start extends a model with coded fields; a continuous (without-VQ) bank's profile fields "
            "are fixed vectors, not fields that start at zero: train it with warm_start false"
        )
    base = None
    if extend:  # the same model without the extra fields, same settings and seed (userip.ctr.extend)
        base_config = dataclasses.replace(config, warm_start=False)
        base = train_ctr(
            dataset,
            model_name,
            model_config=model_config,
            config=base_config,
            save=False,
            trainer_factory=trainer_factory,
        ).model
    seed_everything(config.seed)
    model = build_model(model_name, data.feature_map, **model_config)
    fixed_masks = None
    if base is not None:
        fixed_masks = extend_model(base.cpu(), model, data["train"].x_ids[:EXTENSION_CHECK_ROWS])
    if data.frozen_embeds:  # continuous profiles (without-VQ bank): fixed rows of the field embedding
        freeze_field_rows(model, data.feature_map, data.frozen_embeds)
    log.info(
        "training %s on %d rows, fields %s (seed %d)",
        output_name(model_name, with_profiles),
        len(data["train"]),
        data.feature_map.names,
        config.seed,
    )

    # Every input is checked by now (data, bank pairing, model arguments): only now are outputs touched,
    # and then in a staging folder that replaces ``out`` only when everything below succeeded.
    with atomic_dir(out) if out is not None else contextlib.nullcontext(None) as staging:
        result = _fit_and_save(
            trainer_factory(model, config, fixed_masks),
            dataset,
            data,
            model_name,
            model_config,
            config,
            with_profiles=with_profiles,
            user_features=user_features,
            bank=bank,
            warm_started=base is not None,
            out=staging,
        )
    result.output_dir = out
    return result


def model_record(
    model_name: str,
    model_config: Mapping[str, Any],
    config: CTRTrainerConfig,
    with_profiles: bool,
    user_features: Sequence[str],
    dataset: Dataset,
    bank: ProfileBank | None,
) -> dict[str, Any]:
    """``config.json`` of a trained model: everything that made it (model and its resolved arguments, trainer
    with its seed, fields, dataset and bank identity). Serving reads it; ``userip run`` compares it as the
    model's cache key."""
    resolved_model = {**model_arguments(model_name), **model_config}
    return {
        "model": model_name.lower(),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in resolved_model.items()},
        "trainer": to_dict(config),
        "with_profiles": with_profiles,
        "user_features": list(user_features),
        "dataset_hash": dataset.content_hash,
        "bank": None
        if bank is None
        else {
            "version": bank.version,
            "dataset_hash": bank.dataset_hash,
            # serving refuses a bank whose codebooks differ (getattr: a ProfileBank need not hash)
            "codebook_hash": getattr(bank, "codebook_hash", None),
            "profiles": bank.profile_names,
        },
    }


def check_metrics(record: Any, path: Path) -> None:
    """A ``metrics.json`` that can vouch for a trained model (be reused): test AUC and Logloss present and
    finite."""
    check_record(
        record,
        path,
        {"test": dict, "test.auc": (int, float), "test.logloss": (int, float)},
        finite=("test.auc", "test.logloss"),
    )


def _fit_and_save(
    trainer: Trainer,
    dataset: Dataset,
    data: CTRData,
    model_name: str,
    model_config: Mapping[str, Any],
    config: CTRTrainerConfig,
    *,
    with_profiles: bool,
    user_features: Sequence[str],
    bank: ProfileBank | None,
    warm_started: bool,
    out: Path | None,
) -> CTRResult:
    """Train, evaluate and, with ``out``, write the model folder's files (metrics last)."""
    # ---- train
    valid = data.splits.get("valid")
    checkpoint = None if out is None else out / MODEL_FILE
    fit = trainer.fit(data["train"], valid, checkpoint_path=checkpoint, start_is_candidate=warm_started)

    # ---- evaluate
    valid_metrics = trainer.evaluate(valid) if valid is not None else None
    result = CTRResult(
        model_name=model_name.lower(),
        with_profiles=with_profiles,
        seed=config.seed,
        valid=valid_metrics,
        fit=fit,
        data=data,
        model=trainer.model,
        **score_test(
            trainer.model, data["test"], config.eval_batch_size, trainer.device, trainer.calibration
        ),
    )
    log.info("%s: valid %s, test %s", output_name(model_name, with_profiles), valid_metrics, result.test)

    # ---- save (the checkpoint already holds the chosen weights and calibration; metrics last)
    if out is not None:
        atomic_write_json(out / FEATURE_MAP_FILE, data.feature_map.to_dict())
        data.encoder.save(out / ENCODER_FILE)
        record = model_record(model_name, model_config, config, with_profiles, user_features, dataset, bank)
        atomic_write_json(out / CONFIG_FILE, record)
        atomic_write_json(out / METRICS_FILE, result.metrics())
    return result
