"""Helpers for the reliability corpus: the tiny profile config and artifact snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Small enough for seconds on one core; every stage still runs for real (offline LM, Algorithm 1, DCN).
PROFILE_YAML = """\
offline_lm: {max_steps: 5, hidden_size: 32, num_layers: 1}
train: {num_epochs: 1, batch_size: 16, progress: false, checkpoint_every: 2}
quantization: {kmeans_init_samples: 32}
"""


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except logs: what "earlier artifacts untouched" compares."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(folder).parts
    }
