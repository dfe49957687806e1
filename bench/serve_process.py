"""Shared by the serving benchmarks: ``userip serve`` in its own process on a free loopback port."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, by construction


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    finally:
        conn.close()


@contextlib.contextmanager
def userip_serve(
    serve_args: list[str], log: Path, env: Mapping[str, str] | None = None, start_timeout_s: float = 120
) -> Iterator[int]:
    """Run ``userip serve SERVE_ARGS --host 127.0.0.1 --port <free>`` until ``/healthz`` answers; yields the
    port, then stops the server (SIGTERM, then kill). Its output goes to ``log``."""
    port = free_port()
    cmd = [sys.executable, "-m", "userip.cli", "serve", *serve_args, "--host", HOST, "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=None if env is None else dict(env)
        )
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"userip serve exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if _healthy(port):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"userip serve did not start within {start_timeout_s:.0f} s")
                time.sleep(0.2)
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
