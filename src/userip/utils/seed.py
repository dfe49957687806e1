"""Deterministic seeding of python, numpy and torch."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    """Seed every global RNG and return a fresh numpy Generator for local use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 -- third-party code may still use the legacy global RNG
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
