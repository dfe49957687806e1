"""userip.serving: online scoring with a trained CTR model and the feature bank (never the LLM).

``Scorer`` is the library call, ``create_app`` the FastAPI service (``userip serve``), ``ServeConfig`` its
limits. Heavy modules (torch, FastAPI) are imported on first use, so ``userip.serving.config`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from userip.serving.config import ServeConfig

_LAZY = {
    "Scorer": "userip.serving.scorer",
    "ScoreResult": "userip.serving.scorer",
    "EncodedBatch": "userip.serving.scorer",
    "BankReloadError": "userip.serving.scorer",
    "ScoringError": "userip.serving.scorer",
    "create_app": "userip.serving.app",
    "RedisBank": "userip.serving.redis_bank",
    "publish_bank": "userip.serving.redis_bank",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'userip.serving' has no attribute {name!r}")


__all__ = ["ServeConfig", *_LAZY]
