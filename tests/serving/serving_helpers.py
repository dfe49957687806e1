"""Helpers for the serving tests: a tiny dataset and bank, and the real service on a loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank

N_USERS, N_ITEMS, PER_USER = 40, 30, 15
PROFILES, SIZES = ("hobby", "background"), (4, 3)
BANKLESS_USER = "user7"  # in the dataset, but the bank holds no profile for it


def make_dataset(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=N_USERS)
    appeal = rng.normal(size=N_ITEMS)
    rows = []
    for u in range(N_USERS):
        items = rng.choice(N_ITEMS, PER_USER, replace=False)
        ts = np.sort(rng.integers(1_000_000_000, 1_100_000_000, PER_USER))
        split = ["train"] * 11 + ["valid"] * 2 + ["test"] * 2
        for k, i in enumerate(items):
            rating = float(np.clip(np.round(3 + taste[u] * appeal[i] + rng.normal(0, 0.5)), 1, 5))
            rows.append((u, int(i), rating, int(rating > 3), int(ts[k]), split[k]))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "label", "timestamp", "split"])
    inter = inter.astype({"rating": "float32", "label": "int8"})
    items = pd.DataFrame(
        {
            "item_id": np.arange(N_ITEMS),
            "raw_item_id": [f"item{i}" for i in range(N_ITEMS)],
            "title": [f"title {i}" for i in range(N_ITEMS)],
            "categories": [["c"] for _ in range(N_ITEMS)],
            "brand": "",
            "price": np.nan,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(N_USERS),
            "raw_user_id": [f"user{u}" for u in range(N_USERS)],
            "gender": rng.choice(["f", "m"], N_USERS),
        }
    )
    return Dataset(inter, items, users, source="test-serving")


def make_bank(ds: Dataset, seed: int = 0) -> FeatureBank:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, N_USERS) for k in SIZES], axis=1)
    codes[ds.users["raw_user_id"].tolist().index(BANKLESS_USER)] = -1
    return FeatureBank.build(
        profile_names=PROFILES,
        codebooks=[rng.normal(size=(k, 8)) for k in SIZES],
        codes=codes,
        raw_user_ids=ds.users["raw_user_id"].tolist(),
        dataset_hash=ds.content_hash,
    )


def shifted_bank(bank: FeatureBank) -> FeatureBank:
    """A new version in which every user the bank knows has a different code for every profile."""
    sizes = np.asarray(bank.codebook_sizes)
    known = bank.codes >= 0
    codes = np.where(known, (bank.codes + 1) % sizes, -1)
    users = [u for u in bank.raw_user_ids if u]
    return bank.upsert(users, codes[[bank.raw_user_ids.index(u) for u in users]], note="test: shifted codes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:  # noqa: ANN001
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in a background thread; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
