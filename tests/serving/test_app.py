"""The real service (uvicorn on a free 127.0.0.1 port, HTTP via httpx): answers, bad input, hot reload."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.serving.serving_helpers import BANKLESS_USER, serve_in_thread, shifted_bank

from userip.feature_bank import FeatureBank
from userip.serving.app import create_app
from userip.serving.config import ServeConfig
from userip.serving.scorer import Scorer

ITEMS = [f"item{i}" for i in range(30)]


@pytest.fixture(scope="module")
def scorer(run_dir: Path) -> Scorer:
    return Scorer.from_run_dir(run_dir, model="dcn+profiles")


@pytest.fixture(scope="module")
def service(scorer: Scorer):
    cfg = ServeConfig(max_items_per_request=50, max_batch_pairs=200, max_body_bytes=4096, max_id_length=20)
    with serve_in_thread(create_app(scorer, cfg)) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client


def test_health_and_model_info(service: httpx.Client, scorer: Scorer) -> None:
    assert service.get("/healthz").json() == {"status": "ok", "bank_version": scorer.snapshot.version}
    info = service.get("/v1/model").json()
    assert info["model"] == "dcn+profiles"
    assert info["fields"] == ["user_id", "item_id", "hobby", "background"]
    assert info["bank_version"] == scorer.snapshot.version
    assert info["dataset_hash"] == scorer.snapshot.dataset_hash


def test_score_equals_library_call(service: httpx.Client, scorer: Scorer) -> None:
    items = ["item3", "item1", "no-such-item", 4, "item3"]
    r = service.post("/v1/score", json={"user_id": "user5", "item_ids": items})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = scorer.score(["user5"], items)
    assert np.array_equal(np.asarray(body["scores"], dtype=np.float32), expected.probs)  # bit-exact
    assert body["unknown_user"] is False
    assert body["unknown_items"] == ["no-such-item", "4"]
    assert body["bank_version"] == scorer.snapshot.version and body["model"] == "dcn+profiles"
    for user in ("stranger", BANKLESS_USER):
        assert service.post("/v1/score", json={"user_id": user, "item_ids": ["item0"]}).json()["unknown_user"]


def test_batch_equals_library_call(service: httpx.Client, scorer: Scorer) -> None:
    rng = np.random.default_rng(0)
    users = [f"user{u}" for u in rng.integers(0, 45, 120)]  # users 40..44 are unknown
    items = [ITEMS[i] for i in rng.integers(0, 30, 120)]
    r = service.post("/v1/score/batch", json={"user_ids": users, "item_ids": items})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = scorer.score(users, items)
    assert np.array_equal(np.asarray(body["scores"], dtype=np.float32), expected.probs)
    assert set(body["unknown_users"]) == {u for u in users if int(u[4:]) >= 40 or u == BANKLESS_USER}
    assert body["unknown_items"] == []


@pytest.mark.parametrize(
    ("path", "payload", "status", "message"),
    [
        ("/v1/score", b'{"user_id": "user1", "item_ids": [', 400, "malformed JSON"),
        ("/v1/score", b"[1, 2]", 422, "valid dictionary"),
        ("/v1/score", {"item_ids": ["item1"]}, 422, "user_id: Field required"),
        ("/v1/score", {"user_id": "user1"}, 422, "item_ids: Field required"),
        (
            "/v1/score",
            {"user_id": "user1", "item_ids": "item1"},
            422,
            "item_ids: Input should be a valid list",
        ),
        ("/v1/score", {"user_id": 1.5, "item_ids": ["item1"]}, 422, "user_id"),
        ("/v1/score", {"user_id": None, "item_ids": ["item1"]}, 422, "user_id"),
        ("/v1/score", {"user_id": True, "item_ids": ["item1"]}, 422, "user_id"),
        ("/v1/score", {"user_id": "user1", "item_ids": [-3]}, 422, "greater than or equal to 0"),
        ("/v1/score", {"user_id": "user1", "item_ids": [["item1"]]}, 422, "item_ids.0"),
        ("/v1/score", {"user_id": "", "item_ids": ["item1"]}, 422, "at least 1 character"),
        ("/v1/score", {"user_id": "user1", "item_ids": []}, 422, "item_ids must not be empty"),
        (
            "/v1/score",
            {"user_id": "user1", "item_ids": ["item1"] * 51},
            422,
            "limit is 50 (max_items_per_request)",
        ),
        (
            "/v1/score",
            {"user_id": "u" * 21, "item_ids": ["item1"]},
            422,
            "21 characters long; the limit is 20",
        ),
        ("/v1/score", {"user_id": "user1", "item_ids": ["item1"], "extra": 1}, 422, "extra: Extra inputs"),
        ("/v1/score", {"user_id": "user1", "item_ids": ["item1"] * 800}, 413, "exceeds 4096 bytes"),
        ("/v1/score/batch", {"user_ids": ["user1"], "item_ids": ["item1", "item2"]}, 422, "1 entries but"),
        ("/v1/score/batch", {"user_ids": ["user1"] * 201, "item_ids": ["i"] * 201}, 422, "max_batch_pairs"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(
    service: httpx.Client, scorer: Scorer, path: str, payload: object, status: int, message: str
) -> None:
    if isinstance(payload, bytes):
        r = service.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = service.post(path, json=payload)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()
    # ... and the server keeps serving.
    ok = service.post("/v1/score", json={"user_id": "user1", "item_ids": ["item1"]})
    assert ok.status_code == 200 and ok.json()["scores"] == scorer.score(["user1"], ["item1"]).probs.tolist()


def test_chunked_body_over_the_limit_is_refused(service: httpx.Client) -> None:
    def chunks():
        yield b'{"user_id": "user1", "item_ids": ['
        for _ in range(600):
            yield b'"item1",'
        yield b'"item1"]}'

    r = service.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    assert service.get("/healthz").status_code == 200


def test_reload_without_a_bank_is_refused(run_dir: Path) -> None:
    app = create_app(Scorer.from_run_dir(run_dir, model="dcn"))
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/admin/reload")
        assert r.status_code == 409 and "uses no feature bank" in r.json()["detail"]
        body = httpx.post(f"{url}/v1/score", json={"user_id": "user1", "item_ids": ["item1"]}).json()
        assert body["bank_version"] is None


def test_reload_under_concurrent_requests_never_mixes_versions(
    run_dir: Path, bank_dir: Path, tmp_path: Path
) -> None:
    """Clients hammer the service while the bank flips between two versions that differ for every user.

    Every answer must name one bank version and carry exactly that version's library scores."""
    v1 = FeatureBank.load(bank_dir)
    v2 = shifted_bank(v1)
    users = [f"user{u}" for u in range(40) if f"user{u}" != BANKLESS_USER]
    lib = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    expected = {}  # the library's answers for each exact version
    for bank in (v1, v2):
        lib.set_bank(bank)
        expected[bank.version] = {u: lib.score([u], ITEMS).probs.tolist() for u in users}
    assert all(expected[v1.version][u] != expected[v2.version][u] for u in users)  # versions distinguishable

    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    answers: list[tuple[str, object, list[float]]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set() and len(answers) < 3000:
                user = users[int(rng.integers(len(users)))]
                r = c.post("/v1/score", json={"user_id": user, "item_ids": ITEMS})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                body = r.json()
                answers.append((user, body["bank_version"], body["scores"]))

    with serve_in_thread(create_app(scorer)) as url, httpx.Client(base_url=url, timeout=10) as admin:
        threads = [threading.Thread(target=client_loop, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        seen = []
        for k in range(6):  # v1 -> v2 -> v1 -> ...: each publish is a new file version, then a reload
            time.sleep(0.15)
            (v2 if k % 2 == 0 else v1).write(bank_dir)
            r = admin.post("/v1/admin/reload")
            assert r.status_code == 200, r.text
            seen.append(r.json()["bank_version"])
        time.sleep(0.15)
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert not errors, errors[:3]
    print(f"{len(answers)} answers across {len(seen)} reloads")
    assert seen == [v2.version, v1.version] * 3
    assert len(answers) >= 30, f"only {len(answers)} answers during the reloads"
    versions = {v for _, v, _ in answers}
    assert versions == {v1.version, v2.version}, f"{len(answers)} answers saw versions {versions}"
    for user, version, scores in answers:
        assert scores == expected[version][user], f"{user}: scores are not those of bank version {version}"


def test_failed_reload_keeps_serving_the_old_bank(run_dir: Path, bank_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    old = scorer.snapshot.version
    with serve_in_thread(create_app(scorer)) as url, httpx.Client(base_url=url, timeout=10) as c:
        version_file = next((bank_dir / "versions").glob("*.parquet"))
        version_file.write_bytes(version_file.read_bytes()[:100])  # truncated in place
        (bank_dir / "CURRENT.json").touch()  # and the pointer "changed"
        r = c.post("/v1/admin/reload", params={"force": True})
        assert r.status_code == 503
        assert (
            f"still serving bank version '{old}'" in r.json()["detail"] and "truncated" in r.json()["detail"]
        )
        score = c.post("/v1/score", json={"user_id": "user1", "item_ids": ["item1"]})
        assert score.status_code == 200 and score.json()["bank_version"] == old
        assert "truncated" in c.get("/v1/model").json()["last_reload_error"]


def test_polling_picks_up_a_new_version(run_dir: Path, bank_dir: Path) -> None:
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=bank_dir)
    new = shifted_bank(FeatureBank.load(bank_dir))
    with serve_in_thread(create_app(scorer, ServeConfig(bank_poll_s=0.05))) as url:
        new.write(bank_dir)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/healthz").json()["bank_version"] != new.version:
            assert time.monotonic() < deadline, "the poller did not load the new bank version"
            time.sleep(0.05)
