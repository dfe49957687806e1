"""Load what ``userip train`` saved (``RUN/ctr/<model>[+profiles]/``) into a ``Scorer``.

Read exactly as ``userip.ctr.recipe`` writes it: ``config.json`` (model name and arguments, user features,
dataset hash), ``feature_map.json``, ``encoder.json`` (vocabularies over the dataset's contiguous IDs),
``model.safetensors`` (weights and the validation calibration, ``userip.ctr.calibration``: nothing is
unpickled; checked for its recorded content hash, which it must have, for finiteness and for the model's exact
shapes), and ``metrics.json``, whose presence marks a complete run. ``config.json``'s ``bank`` section
(version, codebook hash) pairs the model with its bank (see
``Scorer._check_pairing``). Raw IDs come from the run's dataset tables (``RUN/data/users.parquet``,
``items.parquet``), read once at load; the dataset's manifest hash must equal the one the model was trained
on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from userip.ctr.calibration import split_calibration
from userip.ctr.encoding import FeatureEncoder
from userip.ctr.features import USER_FIELD, FeatureMap, FieldSource
from userip.ctr.models import build_model
from userip.ctr.recipe import CONFIG_FILE, ENCODER_FILE, FEATURE_MAP_FILE, METRICS_FILE, MODEL_FILE
from userip.data.schema import Dataset
from userip.serving.bank import bank_source
from userip.serving.redis_bank import DEFAULT_PREFIX
from userip.utils.artifacts import CorruptArtifactError, load_tensors
from userip.utils.io import read_json
from userip.utils.run_layout import RunLayout

PREFERRED_MODEL = "dcn+profiles"


class ArtifactError(FileNotFoundError):
    """The run directory lacks a complete trained model (or its dataset); the message says what to run."""


def resolve_model_dir(run_dir: Path, model: str | None) -> Path:
    """``model``: a folder name under ``RUN/ctr`` (``dcn``, ``dcn+profiles``) or a path; default: the only
    complete one, or ``dcn+profiles`` when there are several."""
    if model is not None and Path(model).is_dir() and (Path(model) / METRICS_FILE).exists():
        return Path(model)
    ctr = RunLayout(run_dir).ctr
    complete = sorted(p.name for p in ctr.glob("*") if (p / METRICS_FILE).exists()) if ctr.is_dir() else []
    if model is None:
        if len(complete) == 1:
            model = complete[0]
        elif PREFERRED_MODEL in complete:
            model = PREFERRED_MODEL
        else:
            raise ArtifactError(
                f"{ctr}: choose a model with --model; complete trained models: {complete or 'none'}"
                + ("" if complete else " (run `userip train` first)")
            )
    if model not in complete:
        raise ArtifactError(
            f"{ctr / model}: no complete trained model (missing {METRICS_FILE}); "
            f"complete ones: {complete or 'none'}"
        )
    return ctr / model


def load_model(model_dir: Path) -> tuple[Any, FeatureMap, FeatureEncoder, dict[str, Any]]:
    """(model in eval mode, feature map, encoder, config.json) of one trained CTR model folder."""
    for name in (CONFIG_FILE, FEATURE_MAP_FILE, ENCODER_FILE, MODEL_FILE):
        if not (model_dir / name).exists():
            raise ArtifactError(f"{model_dir / name}: missing; the training run is incomplete")
    config = read_json(model_dir / CONFIG_FILE)
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CorruptArtifactError(f"{model_dir / CONFIG_FILE}: not a trained model's config (no 'model')")
    try:
        feature_map = FeatureMap.from_dict(read_json(model_dir / FEATURE_MAP_FILE))
        encoder = FeatureEncoder.load(model_dir / ENCODER_FILE)
    except (KeyError, TypeError) as e:
        raise CorruptArtifactError(f"{model_dir}: unreadable feature map or encoder ({e!r})") from e
    model = build_model(config["model"], feature_map, **config.get("model_config", {}))
    weights = model_dir / MODEL_FILE
    expected = model.state_dict()
    state = load_tensors(
        weights,
        f"{config['model']} weights",
        required=expected,
        shapes={k: tuple(v.shape) for k, v in expected.items()},
    )
    # The calibration travels in the same hashed file; None: a model saved without one (older runs).
    calibration, state = split_calibration(state, str(weights))
    config["calibration"] = calibration
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # tensors the model does not have
        raise CorruptArtifactError(f"{weights}: does not fit model {config['model']!r} ({e})") from e
    return model.eval(), feature_map, encoder, config


def load_run(
    scorer_cls: Any,
    run_dir: str | Path,
    model: str | None = None,
    bank: str | Path | None = None,
    redis_prefix: str | None = None,
) -> Any:
    run_dir = Path(run_dir)
    model_dir = resolve_model_dir(run_dir, model)
    net, feature_map, encoder, config = load_model(model_dir)

    data_dir = RunLayout(run_dir).data
    try:
        manifest = Dataset.read_manifest(run_dir)
    except FileNotFoundError:
        raise ArtifactError(
            f"{data_dir}: the run's dataset is missing; the scorer needs its raw IDs"
        ) from None
    trained_on = config.get("dataset_hash")
    if trained_on is not None and manifest.get("content_hash") != trained_on:
        raise ArtifactError(
            f"{model_dir} was trained on dataset {trained_on!r} but {data_dir} holds "
            f"{manifest.get('content_hash')!r}"
        )
    user_fields = [
        f.name for f in feature_map.fields if f.source == FieldSource.USER and f.name != USER_FIELD
    ]
    users = _read_table(data_dir / "users.parquet", ["user_id", "raw_user_id", *user_fields])
    items = _read_table(data_dir / "items.parquet", ["item_id", "raw_item_id"])
    # Dataset tables are ordered by contiguous id (validated at save), so row i is user/item i.
    for table, col in ((users, "user_id"), (items, "item_id")):
        if not np.array_equal(table.column(col).to_numpy(), np.arange(table.num_rows)):
            raise ArtifactError(f"{data_dir}: {col} is not 0..N-1 in order")
    user_features = {name: users.column(name).to_numpy(zero_copy_only=False) for name in user_fields}

    source = None
    if any(f.source == FieldSource.PROFILE for f in feature_map.fields):
        source = bank_source(
            bank if bank is not None else RunLayout(run_dir).bank, redis_prefix or DEFAULT_PREFIX
        )
    name = model_dir.name
    trained_bank = config.get("bank") or {}
    info = {
        "model_dir": str(model_dir),
        "dataset_hash": trained_on,
        "trained_with_bank": trained_bank.get("version"),
        "trained_codebook_hash": trained_bank.get("codebook_hash"),
    }
    calibration = config.get("calibration")
    return scorer_cls(
        net,
        feature_map,
        encoder,
        [str(r) for r in users.column("raw_user_id").to_pylist()],
        [str(r) for r in items.column("raw_item_id").to_pylist()],
        bank=source,
        user_features=user_features,
        model_name=name,
        info=info,
        calibration=calibration,
    )


def _read_table(path: Path, columns: list[str]) -> Any:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise CorruptArtifactError(f"{path}: unreadable Parquet table (corrupt or truncated: {e})") from e
