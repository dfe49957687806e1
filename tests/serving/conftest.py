"""Fixtures: a tiny real run directory (dataset, feature bank, trained DCNs) and a real redis-server."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.serving.serving_helpers import free_port, make_bank, make_dataset

from userip.ctr.recipe import train_ctr
from userip.ctr.trainer import CTRTrainerConfig


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN/data, RUN/bank, RUN/ctr/dcn and RUN/ctr/dcn+profiles, written by the project's own save paths."""
    run = tmp_path_factory.mktemp("serving-run")
    ds = make_dataset()
    ds.save(run / "data")
    make_bank(ds).write(run / "bank")
    cfg = CTRTrainerConfig(lr=0.02, batch_size=128, max_epochs=3, patience=3)
    train_ctr(run, "dcn", config=cfg)
    train_ctr(run, "dcn", with_profiles=True, config=cfg)
    train_ctr(
        run,
        "dcn",
        with_profiles=True,
        user_features=("gender",),
        config=cfg,
        output_dir=run / "ctr" / "gender",
    )
    return run


@pytest.fixture
def bank_dir(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the run's bank folder, for tests that publish new versions."""
    target = tmp_path / "bank"
    shutil.copytree(run_dir / "bank", target)
    return target


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (Debian package redis-server); skip if not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (apt-get install -y redis-server); Redis backend not tested"
        )
    import redis

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
