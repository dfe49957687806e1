"""Benchmark (paper Table 6): online inference time per 10,000 instances, DCN alone vs UserIP + DCN.

Paper (their hardware): DCN 0.93 s, UserIP + DCN 1.21 s (1.30x), KAR + DCN 4.78 s per 10,000 instances. Here:

* DCN alone: fields (user_id, item_id). UserIP + DCN: fields (user_id, item_id, hobby, background), with the
  feature-bank lookup on every request. Both are real artifacts: a dataset at MovieLens-100K scale (943 users,
  1,682 items, 100,000 rows; synthetic ratings: accuracy is not measured here), a bank written by
  ``FeatureBank.write``, and DCNs (embedding 8, 3 cross layers, MLP (16, 16)) saved by ``userip.ctr.recipe``.
* In-process: ``Scorer.score`` on requests of one user x 100 items (100 requests = 10,000 instances), DCN and
  UserIP + DCN interleaved request by request so machine load hits both alike; median over rounds. Also
  reported: the model's forward pass alone on pre-encoded ids (what the two extra fields cost), one
  10,000-pair batch call, and the bank lookup's share of UserIP + DCN's time (timed on the same requests).
* Through HTTP: both models served by ``userip serve`` (uvicorn, one process each, 127.0.0.1), one client
  sending requests of 100 items alternately to both: closed-loop for time per 10,000 instances, then paced
  at a bounded request rate for p50/p99 latency.

    python bench/bench_serving.py [--run-dir RUN] [--rounds 15] [--rate 40] [--latency-requests 300]

``--run-dir`` reuses a run that has ``ctr/dcn`` and ``ctr/dcn+profiles``; by default one is built in a
temporary folder (about 10 s). Ends with ``RESULT dcn_s_per_10k=... userip_dcn_s_per_10k=...
ratio_inprocess=... lookup_share=... http_ratio=... http_p50_ms=... http_p99_ms=... rate_rps=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ITEMS_PER_REQUEST = 100
INSTANCES = 10_000
PAPER = {"dcn": 0.93, "userip_dcn": 1.21, "kar_dcn": 4.78}


# ---------------------------------------------------------------------------------------------------- setup
def build_run(run: Path, seed: int = 0) -> None:
    """Dataset (ML-100K scale), bank (K = 4, 3) and both DCNs, written by the project's own save paths."""
    from userip.ctr.recipe import train_ctr
    from userip.ctr.trainer import CTRTrainerConfig
    from userip.data.schema import Dataset
    from userip.feature_bank import FeatureBank

    rng = np.random.default_rng(seed)
    n_users, n_items, n_rows = 943, 1682, 100_000
    users = rng.integers(0, n_users, n_rows)
    users[:n_users] = np.arange(n_users)  # everyone appears
    items = rng.integers(0, n_items, n_rows)
    items[:n_items] = np.arange(n_items)
    rating = rng.integers(1, 6, n_rows).astype(np.float32)
    inter = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "rating": rating,
            "label": (rating > 3).astype(np.int8),
            "timestamp": rng.integers(0, 10**9, n_rows),
            "split": rng.choice(["train", "valid", "test"], n_rows, p=[0.8, 0.1, 0.1]),
        }
    )
    item_table = pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "raw_item_id": [str(i + 1) for i in range(n_items)],
            "title": "",
            "categories": [[] for _ in range(n_items)],
            "brand": "",
            "price": np.nan,
        }
    )
    user_table = pd.DataFrame(
        {"user_id": np.arange(n_users), "raw_user_id": [str(u + 1) for u in range(n_users)]}
    )
    ds = Dataset(inter, item_table, user_table, source="bench-serving")
    ds.save(run / "data")
    sizes = (4, 3)
    FeatureBank.build(
        profile_names=("hobby", "background"),
        codebooks=[rng.normal(size=(k, 64)) for k in sizes],
        codes=np.stack([rng.integers(0, k, n_users) for k in sizes], axis=1),
        raw_user_ids=user_table["raw_user_id"].tolist(),
        dataset_hash=ds.content_hash,
    ).write(run / "bank")
    cfg = CTRTrainerConfig(max_epochs=1, batch_size=4096)
    train_ctr(run, "dcn", config=cfg)
    train_ctr(run, "dcn", with_profiles=True, config=cfg)


def make_requests(scorer, num: int, seed: int = 1) -> list[tuple[str, list[str]]]:  # noqa: ANN001
    """``num`` requests of one known user x 100 distinct known items (raw IDs)."""
    rng = np.random.default_rng(seed)
    users, items = list(scorer._user_row), list(scorer._item_index)
    return [
        (
            users[int(rng.integers(len(users)))],
            [items[i] for i in rng.choice(len(items), ITEMS_PER_REQUEST, False)],
        )
        for _ in range(num)
    ]


# ---------------------------------------------------------------------------------------------------- timing
def interleaved(
    fns: dict[str, Callable[[int], object]], num_requests: int, rounds: int
) -> dict[str, list[float]]:
    """Per round, the seconds each of two fns takes over requests 0..num_requests-1 (= per 10,000 instances).

    Interleaved per request in ABBA order: both see the same moment-to-moment load (which on a shared machine
    moves far more between sweeps than between adjacent calls), and each is preceded by itself and by the
    other equally often, so cache warmth left by the previous call favours neither."""
    (a, fa), (b, fb) = fns.items()
    out: dict[str, list[float]] = {a: [], b: []}
    for _ in range(rounds):
        sums = {a: 0.0, b: 0.0}
        for k in range(num_requests):
            for name, fn in ((a, fa), (b, fb)) if k % 2 == 0 else ((b, fb), (a, fa)):
                start = time.perf_counter()
                fn(k)
                sums[name] += time.perf_counter() - start
        out[a].append(sums[a])
        out[b].append(sums[b])
    return out


def in_process(run: Path, rounds: int) -> dict[str, float]:
    from userip.serving.scorer import Scorer

    dcn = Scorer.from_run_dir(run, model="dcn")
    uip = Scorer.from_run_dir(run, model="dcn+profiles")
    requests = make_requests(uip, INSTANCES // ITEMS_PER_REQUEST)
    # The lookup is timed inside UserIP + DCN's own calls (same cache state as in serving).
    timed_bank = TimedBank(uip.snapshot.bank)
    uip.set_bank(timed_bank)
    # Pre-encoded ids for the model-only comparison (same requests, same batch shape).
    x_dcn = [dcn.encode([u], its).x_ids for u, its in requests]
    x_uip = [uip.encode([u], its).x_ids for u, its in requests]
    for u, its in requests:  # warm-up
        dcn.score([u], its), uip.score([u], its)
    timed_bank.seconds.clear()
    t = interleaved(
        {
            "dcn": lambda k: dcn.score([requests[k][0]], requests[k][1]),
            "uip": lambda k: uip.score([requests[k][0]], requests[k][1]),
        },
        len(requests),
        rounds,
    )
    fwd = interleaved(
        {"dcn": lambda k: dcn.predict_ids(x_dcn[k]), "uip": lambda k: uip.predict_ids(x_uip[k])},
        len(requests),
        rounds,
    )
    t.update({"fwd_dcn": fwd["dcn"], "fwd_uip": fwd["uip"]})
    # Per round: the lookup seconds spent inside that round's UserIP + DCN calls, and their share.
    lookups = (
        np.asarray(timed_bank.seconds[: rounds * len(requests)]).reshape(rounds, len(requests)).sum(axis=1)
    )
    share = statistics.median(lookups / np.asarray(t["uip"]))
    # Table 6's unit taken literally: one call scoring 10,000 (user, item) pairs.
    flat_users = [u for u, its in requests for _ in its]
    flat_items = [i for _, its in requests for i in its]
    batch = interleaved(
        {
            "dcn": lambda k: dcn.score(flat_users, flat_items),
            "uip": lambda k: uip.score(flat_users, flat_items),
        },
        1,
        rounds,
    )
    med = {k: statistics.median(v) for k, v in t.items()}
    med_batch = {k: statistics.median(v) for k, v in batch.items()}
    return {
        "dcn_s_per_10k": med["dcn"],
        "userip_dcn_s_per_10k": med["uip"],
        "ratio_inprocess": med["uip"] / med["dcn"],
        "lookup_s_per_10k": float(np.median(lookups)),
        "lookup_share": share,
        "model_only_ratio": med["fwd_uip"] / med["fwd_dcn"],
        "fwd_dcn_s_per_10k": med["fwd_dcn"],
        "fwd_uip_s_per_10k": med["fwd_uip"],
        "batch_dcn_s_per_10k": med_batch["dcn"],
        "batch_uip_s_per_10k": med_batch["uip"],
        "batch_ratio": med_batch["uip"] / med_batch["dcn"],
    }


class TimedBank:
    """Wraps a bank: the same answers, plus the seconds each ``lookup_raw`` call took."""

    def __init__(self, bank) -> None:  # noqa: ANN001
        self.bank = bank
        self.profile_names, self.codebook_sizes = bank.profile_names, bank.codebook_sizes
        self.dataset_hash, self.version = bank.dataset_hash, bank.version
        self.seconds: list[float] = []

    def lookup_raw(self, raw_user_ids):  # noqa: ANN001, ANN201
        start = time.perf_counter()
        out = self.bank.lookup_raw(raw_user_ids)
        self.seconds.append(time.perf_counter() - start)
        return out


# ---------------------------------------------------------------------------------------------------- HTTP
# `userip serve` in a subprocess: also used by bench/bench_soak.py.
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


@contextlib.contextmanager
def serving(run: Path, model: str, log_dir: Path) -> Iterator[str]:
    """``userip serve`` in its own process on a free 127.0.0.1 port; yields the base URL."""
    args = ["--run-dir", str(run), "--model", model, "--num-threads", "1", "--log-level", "warning"]
    with userip_serve(args, log_dir / f"serve-{model}.log") as port:
        yield f"http://{HOST}:{port}"


class Client:
    """Keep-alive HTTP/1.1 client on one connection (stdlib ``http.client``: a few tens of microseconds per
    request, where httpx's own per-request CPU would be a large part of what is measured)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, path: str, body: bytes) -> bytes:
        self.conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {data[:200]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def through_http(run: Path, rounds: int, rate: float, latency_requests: int) -> dict[str, float]:
    from userip.serving.scorer import Scorer

    lib = Scorer.from_run_dir(run, model="dcn+profiles")
    requests = make_requests(lib, INSTANCES // ITEMS_PER_REQUEST)
    bodies = [json.dumps({"user_id": u, "item_ids": its}).encode() for u, its in requests]
    with (
        tempfile.TemporaryDirectory() as logs,
        serving(run, "dcn", Path(logs)) as url_dcn,
        serving(run, "dcn+profiles", Path(logs)) as url_uip,
    ):
        clients = {"dcn": Client(url_dcn), "uip": Client(url_uip)}
        try:
            for c in clients.values():  # warm-up (connections, first-call costs)
                for body in bodies[:20]:
                    c.post("/v1/score", body)
            got = json.loads(clients["uip"].post("/v1/score", bodies[0]))["scores"]
            expected = lib.score([requests[0][0]], requests[0][1]).probs
            assert np.array_equal(np.asarray(got, dtype=np.float32), expected), (
                "HTTP scores differ from library"
            )

            t = interleaved(
                {name: (lambda k, c=c: c.post("/v1/score", bodies[k])) for name, c in clients.items()},
                len(bodies),
                rounds,
            )

            # Paced: one request every 1/rate s, alternating servers (each gets rate/2), latency per request.
            lat: dict[str, list[float]] = {"dcn": [], "uip": []}
            interval, next_send = 1.0 / rate, time.perf_counter()
            for k in range(2 * latency_requests):
                name = "dcn" if k % 2 == 0 else "uip"
                next_send += interval
                start = time.perf_counter()
                clients[name].post("/v1/score", bodies[k % len(bodies)])
                lat[name].append(time.perf_counter() - start)
                time.sleep(max(0.0, next_send - time.perf_counter()))
        finally:
            for c in clients.values():
                c.close()
    med = {k: statistics.median(v) for k, v in t.items()}
    ms = {k: np.asarray(v) * 1e3 for k, v in lat.items()}
    return {
        "http_dcn_s_per_10k": med["dcn"],
        "http_userip_dcn_s_per_10k": med["uip"],
        "http_ratio": med["uip"] / med["dcn"],
        "http_p50_ms": float(np.percentile(ms["uip"], 50)),
        "http_p99_ms": float(np.percentile(ms["uip"], 99)),
        "http_dcn_p50_ms": float(np.percentile(ms["dcn"], 50)),
        "http_dcn_p99_ms": float(np.percentile(ms["dcn"], 99)),
        "rate_rps": rate,
        "latency_requests_per_model": latency_requests,
    }


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="existing run with ctr/dcn and ctr/dcn+profiles")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement")
    parser.add_argument("--http-rounds", type=int, default=20, help="interleaved closed-loop HTTP rounds")
    parser.add_argument("--rate", type=float, default=40.0, help="paced requests per second (both servers)")
    parser.add_argument(
        "--latency-requests", type=int, default=300, help="paced requests per model (bounded)"
    )
    parser.add_argument("--no-http", action="store_true", help="in-process measurements only")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 500 or not 0 < args.latency_requests <= 5000:
        parser.error("--rate must be in (0, 500] and --latency-requests in (0, 5000] (bounded load)")
    torch.set_num_threads(1)  # as `userip serve` does: per-request batches are tiny

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        run = args.run_dir
        if run is None:
            run = Path(tmp) / "run"
            start = time.perf_counter()
            build_run(run)
            print(f"built run (dataset, bank, 2 DCNs) in {time.perf_counter() - start:.1f} s: {run}")
        res = in_process(run, args.rounds)
        if not args.no_http:
            res.update(through_http(run, args.http_rounds, args.rate, args.latency_requests))

    print(
        f"\nTable 6: inference time per {INSTANCES:,} instances "
        f"({ITEMS_PER_REQUEST} items per request, 1 thread)"
    )
    print(f"{'':34}{'DCN':>10}{'UserIP+DCN':>12}{'ratio':>8}")
    print(
        f"{'paper (their hardware)':34}{PAPER['dcn']:>9.2f}s{PAPER['userip_dcn']:>11.2f}s{1.21 / 0.93:>8.2f}"
    )
    rows = [
        ("in-process, per request", "dcn_s_per_10k", "userip_dcn_s_per_10k"),
        ("in-process, one 10k batch", "batch_dcn_s_per_10k", "batch_uip_s_per_10k"),
        ("model forward only (per request)", "fwd_dcn_s_per_10k", "fwd_uip_s_per_10k"),
        ("HTTP loopback, per request", "http_dcn_s_per_10k", "http_userip_dcn_s_per_10k"),
    ]
    for label, a, b in rows:
        if a in res:
            print(f"{label:34}{res[a]:>9.4f}s{res[b]:>11.4f}s{res[b] / res[a]:>8.3f}")
    print(
        f"bank lookup: {res['lookup_s_per_10k'] * 1e3:.2f} ms per 10k instances "
        f"= {100 * res['lookup_share']:.2f}% of UserIP+DCN (target < 5%)"
    )
    if "http_p50_ms" in res:
        print(
            f"HTTP latency, 1 user x {ITEMS_PER_REQUEST} items, paced {res['rate_rps']:g} req/s over both "
            f"servers ({res['latency_requests_per_model']} requests each): "
            f"UserIP+DCN p50 {res['http_p50_ms']:.2f} ms, "
            f"p99 {res['http_p99_ms']:.2f} ms; DCN p50 {res['http_dcn_p50_ms']:.2f} ms, "
            f"p99 {res['http_dcn_p99_ms']:.2f} ms"
        )
    keys = ["dcn_s_per_10k", "userip_dcn_s_per_10k", "ratio_inprocess", "lookup_share", "model_only_ratio"]
    keys += ["batch_ratio", "http_ratio", "http_p50_ms", "http_p99_ms", "rate_rps"]
    print(
        "RESULT " + " ".join(f"{k}={res[k]:.4g}" for k in keys if k in res) + f" cpu_count={os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
