"""Soak test of ``userip serve`` on loopback: load with hot reloads, then 500 idle connections.

Bounded and local only: one ``userip serve`` process on 127.0.0.1 (admin token from the environment, as in
production beyond loopback), a private copy of the run's bank, and clients in this process.

1. Load: ``--clients`` keep-alive clients send ``--requests`` ``/v1/score`` requests (one user x
   ``--items`` items) while a reloader flips the bank between two versions that differ for every user
   (v2 = v1 upserted with shifted codes), publishing a version and calling ``/v1/admin/reload`` every
   ``--reload-every-s``. Each answer names its bank version; an answer whose scores are not exactly the
   library's for that version and user counts as mixed (``mixed_versions``, must be 0).
2. Idle: ``--idle`` TCP connections are opened and left silent; ``/healthz`` and ``/v1/score`` are then timed
   on fresh connections (``idle_ok=1``: every one answered 200 within ``--idle-limit-ms``, 100 by default).
   Then, after ``--timeout-request-s``, the server must have closed the silent connections (``idle_closed``).

    python bench/bench_soak.py [--run-dir RUN] [--requests 5000] [--clients 4] [--idle 500]

``--run-dir`` reuses a run with ``ctr/dcn+profiles`` (``bench_serving.build_run`` makes one in a temporary
folder otherwise, about 10 s). Ends with ``RESULT requests=... errors=... p50_ms=... p99_ms=... reloads=...
mixed_versions=... idle_conns=... idle_healthz_ms=... idle_score_ms=... idle_ok=... idle_closed=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench_serving import HOST, userip_serve


@contextlib.contextmanager
def serving(run: Path, bank: Path, token: str, timeout_request_s: float, log: Path) -> Iterator[int]:
    """``userip serve`` in its own process; yields its port. The token travels in the environment."""
    args = ["--run-dir", str(run), "--model", "dcn+profiles", "--bank", str(bank), "--log-level", "warning"]
    args += ["--timeout-request-s", str(timeout_request_s)]
    with userip_serve(args, log, env={**os.environ, "USERIP_ADMIN_TOKEN": token}) as port:
        yield port


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def expected_scores(run: Path, banks: list, users: list[str], items: list[str]) -> dict[str, dict[str, list]]:
    """The library's scores for every (bank version, user): what each HTTP answer must equal exactly."""
    from userip.serving.scorer import Scorer

    lib = Scorer.from_run_dir(run, model="dcn+profiles")
    out: dict[str, dict[str, list]] = {}
    for bank in banks:
        lib.set_bank(bank)
        out[bank.version] = {u: lib.score([u], items).probs.tolist() for u in users}
    return out


def load_phase(
    port: int, args: argparse.Namespace, bank_dir: Path, banks: list, token: str, expected
) -> dict:
    users = list(next(iter(expected.values())))
    items = args.item_ids
    latencies: list[float] = []
    errors: list[str] = []
    mixed = 0
    sent = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        nonlocal mixed, sent
        rng = np.random.default_rng(seed)
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            while not stop.is_set():
                with lock:
                    if sent >= args.requests:
                        return
                    sent += 1
                user = users[int(rng.integers(len(users)))]
                body = json.dumps({"user_id": user, "item_ids": items}).encode()
                start = time.perf_counter()
                try:
                    conn.request("POST", "/v1/score", body=body, headers={"content-type": "application/json"})
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=30)
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status != 200:
                        errors.append(f"HTTP {response.status}: {data[:200]!r}")
                        continue
                    answer = json.loads(data)
                    if answer["scores"] != expected[answer["bank_version"]][user]:
                        mixed += 1
        finally:
            conn.close()

    reloads = 0
    threads = [threading.Thread(target=client, args=(s,)) for s in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    auth = {"Authorization": f"Bearer {token}"}
    k = 0
    while any(t.is_alive() for t in threads):
        time.sleep(args.reload_every_s)
        if time.perf_counter() - start > args.max_seconds:
            stop.set()
            break
        k += 1
        banks[k % 2].write(bank_dir)
        status, data = request(port, "POST", "/v1/admin/reload", headers=auth)
        if status != 200:
            errors.append(f"reload: HTTP {status}: {data[:200]!r}")
        else:
            reloads += 1
    for t in threads:
        t.join(timeout=60)
    denied, _ = request(port, "POST", "/v1/admin/reload")  # without the token
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "rps": len(latencies) / wall,
        "reloads": reloads,
        "mixed_versions": mixed,
        "reload_without_token_status": denied,
        "first_errors": errors[:3],
    }


def idle_phase(port: int, args: argparse.Namespace, user: str) -> dict:
    idle = []
    for _ in range(args.idle):
        s = socket.create_connection((HOST, port), timeout=10)
        idle.append(s)
    time.sleep(0.2)  # let the server accept them all
    body = json.dumps({"user_id": user, "item_ids": args.item_ids}).encode()
    health_ms, score_ms, bad = [], [], 0
    for _ in range(args.idle_probes):
        for path, method, payload, out in (
            ("/healthz", "GET", None, health_ms),
            ("/v1/score", "POST", body, score_ms),
        ):
            start = time.perf_counter()
            try:
                status, _ = request(port, method, path, payload)
            except (OSError, http.client.HTTPException):
                status = -1
            out.append((time.perf_counter() - start) * 1e3)
            bad += status != 200
    worst = max(max(health_ms), max(score_ms))
    # The server must drop silent connections once their request deadline passes.
    time.sleep(args.timeout_request_s + 1.5)
    closed = 0
    for s in idle:
        s.settimeout(0.05)
        try:
            closed += s.recv(1) == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed += 1
        s.close()
    return {
        "idle_conns": args.idle,
        "idle_healthz_ms": max(health_ms),
        "idle_score_ms": max(score_ms),
        "idle_ok": int(bad == 0 and worst <= args.idle_limit_ms),
        "idle_closed": closed,
    }


def raise_client_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a run with ctr/dcn+profiles (default: build one)")
    parser.add_argument("--requests", type=int, default=5000, help="scoring requests in the load phase")
    parser.add_argument("--clients", type=int, default=4, help="concurrent keep-alive clients")
    parser.add_argument("--items", type=int, default=20, help="items per request")
    parser.add_argument("--reload-every-s", type=float, default=0.05, help="publish + reload period")
    parser.add_argument("--max-seconds", type=float, default=300, help="upper bound on the load phase")
    parser.add_argument("--idle", type=int, default=500, help="idle connections held open in phase 2")
    parser.add_argument("--idle-probes", type=int, default=10, help="requests of each kind timed in phase 2")
    parser.add_argument("--idle-limit-ms", type=float, default=100.0, help="latency bound with idle sockets")
    parser.add_argument("--timeout-request-s", type=float, default=5.0, help="the server's request deadline")
    args = parser.parse_args(argv)
    raise_client_fd_limit(args.idle + 256)

    from bench_serving import build_run
    from userip.feature_bank import FeatureBank

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run = args.run_dir
        if run is None:
            run = tmp_path / "run"
            build_run(run)
        bank_dir = tmp_path / "bank"  # private copy: this script publishes versions into it
        shutil.copytree(run / "bank", bank_dir)
        v1 = FeatureBank.load(bank_dir)
        sizes = np.asarray(v1.codebook_sizes)
        users = [u for u in v1.raw_user_ids if u][:200]
        rows = [v1.raw_user_ids.index(u) for u in users]
        v2 = v1.upsert(users, np.where(v1.codes[rows] >= 0, (v1.codes[rows] + 1) % sizes, -1), note="soak")
        from userip.serving.scorer import Scorer

        lib = Scorer.from_run_dir(run, model="dcn+profiles", bank=bank_dir)
        args.item_ids = list(lib._item_index)[: args.items]
        expected = expected_scores(run, [v1, v2], users, args.item_ids)
        token = secrets.token_urlsafe(24)
        with serving(run, bank_dir, token, args.timeout_request_s, tmp_path / "serve.log") as port:
            load = load_phase(port, args, bank_dir, [v1, v2], token, expected)
            idle = idle_phase(port, args, users[0])
    if load["first_errors"]:
        print("first errors:", *load["first_errors"], sep="\n  ")
    print(
        f"load: {load['requests']} requests at {load['rps']:.0f}/s, {load['reloads']} reloads, "
        f"reload without token -> HTTP {load['reload_without_token_status']}"
    )
    result = {k: v for k, v in {**load, **idle}.items() if k not in ("first_errors", "rps")}
    print(
        "RESULT "
        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    ok = (
        load["errors"] == 0
        and load["mixed_versions"] == 0
        and load["reload_without_token_status"] == 401
        and idle["idle_ok"] == 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
