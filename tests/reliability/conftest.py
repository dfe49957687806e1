"""A tiny but real run directory built through the command line (prepare -> profile -> train), shared by the
reliability corpus. Each case damages a private copy and checks the error path on it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.reliability.reliability_helpers import PROFILE_YAML

from userip.cli import main


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("reliability")
        run = root / "run"
        config = root / "profile.yaml"
        config.write_text(PROFILE_YAML)
        prepare = [
            "prepare",
            "--source",
            "synthetic",
            "--num-users",
            "60",
            "--num-items",
            "24",
            "--out",
            str(run),
        ]
        assert main(prepare) == 0
        assert main(["profile", "--run-dir", str(run), "--config", str(config)]) == 0
        assert (
            main(["train", "--model", "dcn", "--run-dir", str(run), "--with-profiles", "--epochs", "1"]) == 0
        )
        yield run
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (logs left out: every command appends to them)."""
    target = tmp_path / "run"
    shutil.copytree(base_run, target, ignore=shutil.ignore_patterns("logs"))
    return target


@pytest.fixture(autouse=True)
def _never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `userip serve` case that wrongly gets past its checks must fail fast, not serve forever."""
    import uvicorn

    def refuse(self, sockets=None) -> None:  # noqa: ANN001
        raise AssertionError("userip serve started: the damaged artifact was not refused")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)
