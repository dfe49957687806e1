"""The service under hostile-but-fair clients: idle and slow connections, too many of them, admin access,
server paths in messages, and model/bank pairing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from tests.serving.serving_helpers import make_bank, shifted_bank

from userip.cli import main
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.serving.app import ConcurrencyLimitMiddleware, client_safe, create_app
from userip.serving.cli import read_admin_token
from userip.serving.config import ServeConfig, is_loopback
from userip.serving.http import uvicorn_config
from userip.serving.scorer import BankReloadError, Scorer
from userip.utils.artifacts import CorruptArtifactError, save_tensors
from userip.utils.config import ConfigError

TOKEN = "s3cret-admin-token-0123456789"


@contextlib.contextmanager
def serve(app, config: ServeConfig) -> Iterator[tuple[str, int]]:  # noqa: ANN001
    """The app under the exact uvicorn settings ``userip serve`` uses, on a free loopback port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def open_idle(addr: tuple[str, int], n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=5)
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    s.settimeout(within_s)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def scorer(run_dir: Path) -> Scorer:
    return Scorer.from_run_dir(run_dir, model="dcn+profiles")


def test_idle_connections_do_not_starve_health_or_scoring(scorer: Scorer) -> None:
    """The reported attack: ~260 idle sockets made every endpoint answer 503 (uvicorn counted connections)."""
    config = ServeConfig(limit_concurrency=8, max_connections=1024)
    with serve(create_app(scorer, config), config) as addr:
        idle = open_idle(addr, 300)
        try:
            with httpx.Client(base_url=f"http://{addr[0]}:{addr[1]}", timeout=5) as c:
                c.get("/healthz")  # warm
                start = time.perf_counter()
                health = c.get("/healthz")
                score = c.post("/v1/score", json={"user_id": "user1", "item_ids": ["item1", "item2"]})
                elapsed = time.perf_counter() - start
            assert health.status_code == 200 and score.status_code == 200, (health.text, score.text)
            assert elapsed < 2.0, f"two requests took {elapsed:.2f} s with 300 idle connections open"
        finally:
            for s in idle:
                s.close()


def test_silent_and_slow_clients_are_disconnected(scorer: Scorer) -> None:
    config = ServeConfig(timeout_request_s=0.3)
    with serve(create_app(scorer, config), config) as addr:
        silent = socket.create_connection(addr)
        slow = socket.create_connection(addr)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished (slowloris)
        body_trickle = socket.create_connection(addr)
        body_trickle.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        for s in (silent, slow, body_trickle):
            assert closed_by_server(s, within_s=3.0)
            s.close()
        # A prompt client on a kept-alive connection is unaffected by the deadline between its requests.
        with httpx.Client(base_url=f"http://{addr[0]}:{addr[1]}", timeout=5) as c:
            assert c.get("/healthz").status_code == 200
            time.sleep(0.5)  # longer than timeout_request_s, shorter than timeout_keep_alive
            assert c.get("/healthz").status_code == 200


def test_connections_beyond_the_cap_are_closed_not_degrading_the_rest(scorer: Scorer) -> None:
    config = ServeConfig(max_connections=5)
    with (
        serve(create_app(scorer, config), config) as addr,
        httpx.Client(base_url=f"http://{addr[0]}:{addr[1]}", timeout=5) as c,
    ):
        assert c.get("/healthz").status_code == 200  # holds one kept-alive connection
        idle = open_idle(addr, 4)
        extra = socket.create_connection(addr)
        assert closed_by_server(extra, within_s=3.0)
        assert c.get("/healthz").status_code == 200  # its own connection still served
        for s in [*idle, extra]:
            s.close()


def test_in_flight_limit_answers_503_but_never_for_healthz() -> None:
    release = asyncio.Event()
    calls = []

    async def slow_app(scope, receive, send) -> None:  # noqa: ANN001
        calls.append(scope["path"])
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = ConcurrencyLimitMiddleware(slow_app, limit=1)
    sent: dict[str, list[dict]] = {}

    async def call(path: str) -> None:
        messages: list[dict] = []
        sent[path] = messages

        async def send(message: dict) -> None:
            messages.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        await limited({"type": "http", "path": path}, receive, send)

    async def scenario() -> None:
        first = asyncio.create_task(call("/slow"))
        await asyncio.sleep(0.01)
        await call("/v1/score")
        await call("/healthz")
        assert limited.in_flight == 1
        release.set()
        await first

    asyncio.run(scenario())
    assert sent["/v1/score"][0]["status"] == 503
    assert b"limit_concurrency=1" in sent["/v1/score"][1]["body"]
    assert sent["/healthz"][0]["status"] == 200 and sent["/slow"][0]["status"] == 200
    assert calls == ["/slow", "/healthz"] and limited.in_flight == 0


def test_admin_reload_needs_the_bearer_token(run_dir: Path, bank_dir: Path) -> None:
    app = create_app(Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir), admin_token=TOKEN)
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = c.post("/v1/admin/reload", headers=headers)
            assert r.status_code == 401 and "Bearer" in r.json()["detail"], r.text
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/score", json={"user_id": "user1", "item_ids": ["item1"]}).status_code == 200
        r = c.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["changed"] is False


def test_admin_token_sources_and_the_loopback_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USERIP_ADMIN_TOKEN", raising=False)
    assert read_admin_token(ServeConfig()) is None  # loopback: optional
    with pytest.raises(ConfigError, match="not a loopback address"):
        read_admin_token(ServeConfig(host="0.0.0.0"))
    monkeypatch.setenv("USERIP_ADMIN_TOKEN", TOKEN)
    assert read_admin_token(ServeConfig(host="0.0.0.0")) == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file-0123456789\n")
    os.chmod(token_file, 0o600)
    assert read_admin_token(ServeConfig(admin_token_file=str(token_file))) == "from-a-file-0123456789"
    token_file.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_admin_token(ServeConfig(admin_token_file=str(token_file)))
    with pytest.raises(ConfigError, match="cannot read"):
        read_admin_token(ServeConfig(admin_token_file=str(tmp_path / "missing")))
    assert [
        is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1", "example.org")
    ] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_serve_refuses_a_public_bind_without_token(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("USERIP_ADMIN_TOKEN", raising=False)
    assert main(["serve", "--run-dir", str(run_dir), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err  # userip.cli reports the error on stderr
    assert "not a loopback address" in err and "USERIP_ADMIN_TOKEN" in err


def test_client_facing_messages_hold_no_server_paths(run_dir: Path, bank_dir: Path) -> None:
    assert client_safe(f"file {bank_dir}/versions/v.parquet: truncated") == "file v.parquet: truncated"
    assert (
        client_safe("redis redis://127.0.0.1:6379/0 prefix='x'")
        == "redis redis://127.0.0.1:6379/0 prefix='x'"
    )
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    with TestClient(create_app(scorer)) as c:
        version_file = next((bank_dir / "versions").glob("*.parquet"))
        version_file.write_bytes(version_file.read_bytes()[:100])
        r = c.post("/v1/admin/reload", params={"force": True})
        assert r.status_code == 503 and "truncated" in r.json()["detail"]
        info = c.get("/v1/model").json()
        for text in (r.text, json.dumps(info)):
            assert str(bank_dir.parent) not in text and str(run_dir) not in text, text
        assert str(bank_dir) in scorer.describe()["last_reload_error"]  # the server log keeps the full path


def test_model_refuses_a_bank_it_was_not_trained_with(run_dir: Path, bank_dir: Path, tmp_path: Path) -> None:
    """Same dataset, same codebook sizes, different codebooks: every ID would mean something else."""
    trained = FeatureBank.load(bank_dir)
    other = make_bank(Dataset.load(run_dir), seed=5)
    assert (other.codebook_sizes, other.dataset_hash) == (trained.codebook_sizes, trained.dataset_hash)
    foreign_dir = tmp_path / "foreign"
    other.write(foreign_dir)
    with pytest.raises(BankReloadError) as e:
        Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=foreign_dir)
    assert other.version in str(e.value) and trained.version in str(e.value)

    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    upserted = shifted_bank(trained)  # new users/codes, same codebooks: fits
    upserted.write(bank_dir)
    assert scorer.reload_bank().version == upserted.version
    other.write(bank_dir)
    with TestClient(create_app(scorer)) as c:
        r = c.post("/v1/admin/reload")
    assert r.status_code == 503
    assert other.version in r.json()["detail"] and trained.version in r.json()["detail"]
    assert scorer.snapshot.version == upserted.version
    assert main(["serve", "--run-dir", str(run_dir), "--bank", str(foreign_dir), "--port", "0"]) == 2


@pytest.fixture
def model_copy(run_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for part in ("data", "bank"):
        shutil.copytree(run_dir / part, run / part)
    shutil.copytree(run_dir / "ctr" / "dcn", run / "ctr" / "dcn")
    return run


def test_corrupt_or_non_finite_weights_are_refused(model_copy: Path) -> None:
    weights = model_copy / "ctr" / "dcn" / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_tensors(weights, state)  # hashed as written: the NaN check itself must refuse it
    with pytest.raises(CorruptArtifactError, match="NaN/inf"):
        Scorer.from_run_dir(model_copy, model="dcn")
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(CorruptArtifactError, match="truncated or corrupt"):
        Scorer.from_run_dir(model_copy, model="dcn")
