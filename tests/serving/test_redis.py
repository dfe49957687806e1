"""Redis bank backend against a real redis-server: same answers as the file bank, versioned switch, reload."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.serving.serving_helpers import BANKLESS_USER, serve_in_thread, shifted_bank

from userip.feature_bank import FeatureBank
from userip.serving.app import create_app
from userip.serving.redis_bank import RedisBank, RedisBankError, current_version, publish_bank
from userip.serving.scorer import BankReloadError, Scorer

USERS = [f"user{u}" for u in range(42)] + ["", "nobody"]


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:8]}"  # tests share one server: separate key spaces


def test_redis_bank_answers_like_the_file_bank(run_dir: Path, redis_url: str, prefix: str) -> None:
    bank = FeatureBank.load(run_dir / "bank")
    assert publish_bank(bank, redis_url, prefix) == bank.version
    remote = RedisBank.open(redis_url, prefix)
    assert (remote.version, remote.profile_names, remote.codebook_sizes, remote.dataset_hash) == (
        bank.version,
        bank.profile_names,
        bank.codebook_sizes,
        bank.dataset_hash,
    )
    for got, want in zip(remote.lookup_raw(USERS), bank.lookup_raw(USERS)):
        np.testing.assert_array_equal(got, want)
    codes, known = remote.lookup_raw([BANKLESS_USER])
    assert not known[0] and (codes == -1).all()

    rng = np.random.default_rng(1)
    users = [USERS[i] for i in rng.integers(0, len(USERS), 200)]
    items = [f"item{i}" for i in rng.integers(0, 32, 200)]
    by_file = Scorer.from_run_dir(run_dir, model="dcn+profiles").score(users, items)
    by_redis = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=redis_url, redis_prefix=prefix)
    result = by_redis.score(users, items)
    np.testing.assert_array_equal(result.probs, by_file.probs)
    np.testing.assert_array_equal(result.unknown_user, by_file.unknown_user)
    assert result.bank_version == by_file.bank_version


def test_redis_publish_switch_reload_and_retention(run_dir: Path, redis_url: str, prefix: str) -> None:
    v1 = FeatureBank.load(run_dir / "bank")
    v2 = shifted_bank(v1)
    publish_bank(v1, redis_url, prefix)
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=redis_url, redis_prefix=prefix)
    with serve_in_thread(create_app(scorer)) as url, httpx.Client(base_url=url, timeout=10) as c:
        first = c.post("/v1/score", json={"user_id": "user2", "item_ids": ["item1", "item2"]}).json()
        assert first["bank_version"] == v1.version

        publish_bank(v2, redis_url, prefix, keep_versions=2)
        assert current_version(redis_url, prefix) == v2.version
        # Pinned: the server keeps answering from v1 until it reloads.
        assert c.post("/v1/score", json={"user_id": "user2", "item_ids": ["item1"]}).json()[
            "bank_version"
        ] == (v1.version)
        r = c.post("/v1/admin/reload").json()
        assert (r["changed"], r["previous_version"], r["bank_version"]) == (True, v1.version, v2.version)
        second = c.post("/v1/score", json={"user_id": "user2", "item_ids": ["item1", "item2"]}).json()
        assert second["bank_version"] == v2.version and second["scores"] != first["scores"]
        expected = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=redis_url, redis_prefix=prefix)
        assert second["scores"] == expected.score(["user2"], ["item1", "item2"]).probs.tolist()

    # Retention: a third version with keep_versions=1 deletes the others; a server pinned to a deleted
    # version fails loudly instead of answering "unknown" for everyone, and a reload recovers.
    v3 = shifted_bank(v2)
    publish_bank(v3, redis_url, prefix, keep_versions=1)
    with pytest.raises(RedisBankError, match="was removed from Redis"):
        scorer.score(["user2"], ["item1"])
    assert scorer.reload_bank().version == v3.version
    assert scorer.score(["user2"], ["item1"]).bank_version == v3.version


def test_redis_reload_failure_keeps_the_pinned_version(run_dir: Path, redis_url: str, prefix: str) -> None:
    import redis

    bank = FeatureBank.load(run_dir / "bank")
    publish_bank(bank, redis_url, prefix)
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles", bank=redis_url, redis_prefix=prefix)
    redis.Redis.from_url(redis_url).set(f"{prefix}:current", "no-such-version")
    with pytest.raises(BankReloadError, match="no meta key"):
        scorer.reload_bank()
    assert scorer.score(["user2"], ["item1"]).bank_version == bank.version
    with pytest.raises(RedisBankError, match="no bank published"):
        RedisBank.open(redis_url, prefix + ":empty")
