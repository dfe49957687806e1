"""A multi-part bank (what the distributed profile stage writes) read by serving, CTR training and Redis the
same as the one-file bank of the same rows; a part that is missing, altered or out of place is refused."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from tests.serving.serving_helpers import N_USERS

from userip.ctr.recipe import train_ctr
from userip.ctr.trainer import CTRTrainerConfig
from userip.feature_bank import FeatureBank, FeatureBankError
from userip.serving.redis_bank import RedisBank, publish_bank
from userip.serving.scorer import Scorer
from userip.utils.io import atomic_write_json, read_json

BOUNDS = [0, 13, 27, N_USERS]
USERS = [f"user{u}" for u in range(N_USERS)] + ["nobody"]


@pytest.fixture
def multi_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the serving run whose bank's current version is written as 3 parts."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    FeatureBank.load(run / "bank").write_parts(run / "bank", BOUNDS)
    return run


def test_multi_part_bank_loads_as_the_one_file_bank(run_dir: Path, multi_run: Path) -> None:
    one, multi = FeatureBank.load(run_dir / "bank"), FeatureBank.load(multi_run / "bank")
    assert len(read_json(multi_run / "bank" / "CURRENT.json")["parts"]) == 3
    assert multi.version == one.version and multi.manifest == one.manifest
    np.testing.assert_array_equal(multi.codes, one.codes)
    assert multi.raw_user_ids == one.raw_user_ids
    for got, want in zip(multi.lookup_raw(USERS), one.lookup_raw(USERS)):
        np.testing.assert_array_equal(got, want)


def test_serving_and_ctr_training_read_a_multi_part_bank(run_dir: Path, multi_run: Path) -> None:
    rng = np.random.default_rng(0)
    users = [USERS[i] for i in rng.integers(0, len(USERS), 100)]
    items = [f"item{i}" for i in rng.integers(0, 30, 100)]
    want = Scorer.from_run_dir(run_dir, model="dcn+profiles").score(users, items)
    got = Scorer.from_run_dir(multi_run, model="dcn+profiles").score(users, items)
    np.testing.assert_array_equal(got.probs, want.probs)
    assert got.bank_version == want.bank_version
    cfg = CTRTrainerConfig(lr=0.02, batch_size=128, max_epochs=1, patience=1)
    one = train_ctr(run_dir, "dcn", with_profiles=True, config=cfg, output_dir=multi_run / "ctr" / "one")
    multi = train_ctr(
        multi_run, "dcn", with_profiles=True, config=cfg, output_dir=multi_run / "ctr" / "multi"
    )
    assert multi.metrics()["test"] == one.metrics()["test"]


def test_redis_publishes_a_multi_part_bank(run_dir: Path, multi_run: Path, redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    bank = FeatureBank.load(multi_run / "bank")
    assert publish_bank(bank, redis_url, prefix) == bank.version
    remote = RedisBank.open(redis_url, prefix)
    for got, want in zip(remote.lookup_raw(USERS), FeatureBank.load(run_dir / "bank").lookup_raw(USERS)):
        np.testing.assert_array_equal(got, want)


def test_a_missing_altered_or_misplaced_part_is_refused(multi_run: Path) -> None:
    bank_dir = multi_run / "bank"
    pointer = read_json(bank_dir / "CURRENT.json")
    second = bank_dir / pointer["parts"][1]["file"]
    saved = second.read_bytes()
    second.write_bytes(saved[:-10])
    with pytest.raises(FeatureBankError, match="truncated or corrupt"):
        FeatureBank.load(bank_dir)
    second.write_bytes(saved)
    swapped = {**pointer, "parts": [pointer["parts"][1], pointer["parts"][0], pointer["parts"][2]]}
    atomic_write_json(bank_dir / "CURRENT.json", swapped)
    with pytest.raises(FeatureBankError, match="names it as part 0 of 3"):
        FeatureBank.load(bank_dir)
    atomic_write_json(bank_dir / "CURRENT.json", {**pointer, "parts": pointer["parts"][:2]})
    with pytest.raises(FeatureBankError, match="part 0 of 3"):
        FeatureBank.load(bank_dir)
    second.unlink()
    atomic_write_json(bank_dir / "CURRENT.json", pointer)
    with pytest.raises(FeatureBankError, match="is missing"):
        FeatureBank.load(bank_dir)
