"""CTR model zoo: ``build_model(name, feature_map, **kwargs)`` over the ``MODELS`` registry.

Every model maps ``x_ids`` (B, num_fields) LongTensor -> logits (B,) (no sigmoid; the loss is applied outside)
and exposes ``embedding_parameters()`` for embedding-only L2 regularisation. See docs/ctr_models.md.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from userip.ctr.features import FeatureMap, Field
from userip.ctr.models.afm import AFM
from userip.ctr.models.afn import AFN
from userip.ctr.models.autoint import AutoInt
from userip.ctr.models.base import CTRModel
from userip.ctr.models.dcn import DCN
from userip.ctr.models.dcnv2 import DCNv2
from userip.ctr.models.deepfm import DeepFM
from userip.ctr.models.difm import DIFM
from userip.ctr.models.ffm import FFM
from userip.ctr.models.fibinet import FiBiNet
from userip.ctr.models.fm import FM
from userip.ctr.models.lr import LR
from userip.ctr.models.onn import ONN
from userip.ctr.models.pnn import PNN
from userip.utils.config import ConfigError

MODELS: dict[str, type[CTRModel]] = {
    "lr": LR,
    "fm": FM,
    "ffm": FFM,
    "afm": AFM,
    "fibinet": FiBiNet,
    "difm": DIFM,
    "afn": AFN,
    "deepfm": DeepFM,
    "autoint": AutoInt,
    "onn": ONN,
    "pnn": PNN,
    "dcn": DCN,
    "dcnv2": DCNv2,
}


def model_arguments(name: str) -> dict[str, Any]:
    """Accepted keyword arguments of model ``name`` with their defaults (everything but ``feature_map``)."""
    params = inspect.signature(_model_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "feature_map")}


def build_model(name: str, feature_map: FeatureMap, **kwargs: Any) -> nn.Module:
    """Instantiate model ``name`` (case-insensitive ``MODELS`` key); unknown kwargs raise ``ConfigError``."""
    cls = _model_class(name)
    accepted = model_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r}: unknown argument(s) {unknown}; accepted: {sorted(accepted)}")
    return cls(feature_map, **kwargs)


# A small stand-in feature map (a user, an item and two more fields) to build a model on when its config is
# checked before any data exists.
_PROBE_FEATURE_MAP = FeatureMap(tuple(Field(f"probe{i}", 4) for i in range(4)))


def check_model_config(name: str, kwargs: Any, where: str) -> None:
    """Refuse a bad model config before any work: ``kwargs`` must be a mapping of model ``name``'s
    arguments whose values build the model (types and ranges as its constructor checks them). Built once on a
    tiny stand-in feature map, so a wrong key or value is a ``ConfigError`` naming ``where`` and the model,
    not a failure after data, LM and bank were built."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: expected a mapping of {name}'s arguments, got {type(kwargs).__name__}")
    try:
        build_model(name, _PROBE_FEATURE_MAP, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:  # the constructor's own checks, or a wrong type
        raise ConfigError(f"{where}: model {name!r} refuses these arguments {kwargs}: {e}") from None


def model_section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Keyword arguments for model ``name`` from a model config mapping.

    A mapping keyed by registry names (like ``configs/ctr_models.yaml``) yields the ``name`` section; any
    other mapping is taken as the keyword arguments themselves.
    """
    _model_class(name)  # unknown names fail here, listing the accepted ones
    key = name.lower()
    if config and set(config) <= set(MODELS):
        if key not in config:
            raise ConfigError(f"model config has sections {sorted(config)} but none for model {name!r}")
        return dict(config[key] or {})
    return dict(config)


def _model_class(name: str) -> type[CTRModel]:
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown CTR model {name!r}; accepted names: {sorted(MODELS)}")
    return MODELS[key]


__all__ = [
    "MODELS",
    "CTRModel",
    "build_model",
    "check_model_config",
    "model_arguments",
    "model_section",
    *(cls.__name__ for cls in MODELS.values()),
]
