"""`userip serve` as a real process: serves on loopback, reloads the bank on SIGHUP, stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from tests.serving.serving_helpers import free_port, shifted_bank

from userip.cli import main
from userip.feature_bank import FeatureBank
from userip.serving.scorer import Scorer


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # `userip serve` sets it process-wide


@pytest.mark.slow  # a fresh interpreter importing torch: ~5-30 s on a busy 2-core machine
def test_serve_command_end_to_end(run_dir: Path, bank_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "userip.cli", "serve", "--run-dir", str(run_dir), "--bank", str(bank_dir)]
    cmd += ["--port", str(port), "--max-items-per-request", "5", "--log-level", "warning"]
    log = (tmp_path / "serve.out").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.out").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "userip serve did not come up"
            time.sleep(0.2)
        body = httpx.post(f"{url}/v1/score", json={"user_id": "user1", "item_ids": ["item1", "item2"]}).json()
        expected = Scorer.from_run_dir(run_dir, bank=bank_dir).score(["user1"], ["item1", "item2"])
        assert body["scores"] == expected.probs.tolist() and body["model"] == "dcn+profiles"
        too_many = httpx.post(f"{url}/v1/score", json={"user_id": "user1", "item_ids": ["item1"] * 6})
        assert too_many.status_code == 422 and "limit is 5" in too_many.json()["detail"]

        new = shifted_bank(FeatureBank.load(bank_dir))
        new.write(bank_dir)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["bank_version"] != new.version:
            assert time.monotonic() < deadline, "SIGHUP did not reload the bank"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log.close()


def test_serve_command_wires_config_into_uvicorn(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from userip.serving.app import ConcurrencyLimitMiddleware
    from userip.serving.http import GuardedH11Protocol

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(config=self.config))
    argv = ["serve", "--run-dir", str(run_dir), "--model", "dcn", "--port", "0", "--limit-concurrency", "7"]
    argv += ["--timeout-request-s", "2.5", "--max-connections", "300", "--timeout-keep-alive", "3"]
    assert main(argv) == 0
    config = seen["config"]
    assert (config.host, config.port, config.timeout_keep_alive) == ("127.0.0.1", 0, 3)
    # uvicorn's own limit counts idle connections (the starvation bug): off; the app bounds requests instead.
    assert config.limit_concurrency is None
    assert issubclass(config.http, GuardedH11Protocol)
    assert (config.http.timeout_request_s, config.http.max_connections) == (2.5, 300)
    app = config.app
    assert app.state.scorer.model_name == "dcn"
    limits = [m.kwargs["limit"] for m in app.user_middleware if m.cls is ConcurrencyLimitMiddleware]
    assert limits == [7]


def test_serve_command_rejects_bad_config(run_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("serve:\n  max_items_per_request: -1\n")
    assert main(["serve", "--run-dir", str(run_dir), "--config", str(config)]) == 2
    assert main(["serve", "--run-dir", str(run_dir), "--model", "no-such-model"]) == 2


def test_publish_to_redis_command(run_dir: Path, redis_url: str) -> None:
    from userip.serving.redis_bank import current_version

    prefix = "test:cli-publish"
    argv = ["serve", "--run-dir", str(run_dir), "--publish-to-redis", redis_url, "--redis-prefix", prefix]
    assert main(argv) == 0
    assert current_version(redis_url, prefix) == FeatureBank.load(run_dir / "bank").version


def test_serve_set_reaches_the_config_and_a_bad_key_exits_2(tmp_path: Path, capsys) -> None:
    from userip.cli import build_parser
    from userip.serving.cli import build_config

    config = tmp_path / "serve.yaml"
    config.write_text("serve:\n  max_connections: 300\n  port: 9000\n")
    args = build_parser(only="serve").parse_args(
        ["serve", "--run-dir", str(tmp_path), "--config", str(config), "--port", "9001",
         "--set", "timeout_request_s=2.5", "--set", "port=9002"]
    )  # fmt: skip
    served = build_config(args)
    assert (served.max_connections, served.timeout_request_s, served.port) == (300, 2.5, 9002)
    assert main(["serve", "--run-dir", str(tmp_path), "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "userip serve: error: ConfigError:" in err and "no_such_key" in err and "Traceback" not in err
