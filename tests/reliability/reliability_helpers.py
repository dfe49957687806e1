"""Helpers for the reliability corpus: the tiny profile config and artifact snapshots."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

ERROR_EXIT = 2  # what every refused command exits with (userip.cli.EXIT_ERROR)

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


def assert_named_error(rc: int | str | None, text: str, expected: Iterable[str]) -> None:
    """The one shape of a refused command: exit code 2, each expected fragment in its output, no traceback."""
    assert rc == ERROR_EXIT, text
    assert "Traceback" not in text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in {text!r}"
