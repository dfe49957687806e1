"""Corrupt / truncated / missing banks give clear errors; a killed write leaves the old bank readable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from userip.feature_bank import FeatureBank, FeatureBankError


def _current_file(bank_dir):
    pointer = json.loads((bank_dir / "CURRENT.json").read_text())
    return bank_dir / pointer["file"]


def test_truncated_file_is_refused(bank, tmp_path):
    bank.write(tmp_path / "bank")
    file = _current_file(tmp_path / "bank")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureBankError, match="truncated or corrupt"):
        FeatureBank.load(tmp_path / "bank")
    with pytest.raises(FeatureBankError, match="corrupt or truncated Parquet"):
        FeatureBank.load(file)  # loading the file directly: the Parquet footer is gone


def test_corrupt_file_is_refused(bank, tmp_path):
    bank.write(tmp_path / "bank")
    file = _current_file(tmp_path / "bank")
    data = bytearray(file.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, one byte flipped
    file.write_bytes(bytes(data))
    with pytest.raises(FeatureBankError, match="corrupt"):
        FeatureBank.load(tmp_path / "bank")


def test_missing_bank_and_bad_pointer(tmp_path):
    with pytest.raises(FeatureBankError, match="no CURRENT.json"):
        FeatureBank.load(tmp_path)
    (tmp_path / "CURRENT.json").write_text("{not json")
    with pytest.raises(FeatureBankError, match="unreadable bank pointer"):
        FeatureBank.load(tmp_path)
    (tmp_path / "not_a_bank.parquet").write_bytes(b"PAR1 nothing")
    with pytest.raises(FeatureBankError, match="not a readable feature bank"):
        FeatureBank.load(tmp_path / "not_a_bank.parquet")


# A child process writes a new version and is killed (os._exit: no cleanup, no finally) at a chosen point.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow.parquet as pq
    from tests.feature_bank.conftest import make_bank
    import userip.feature_bank.embedded as embedded

    where, bank_dir = sys.argv[1], sys.argv[2]
    if where == "during_parquet":
        def dying_write(table, path):
            with open(path, "wb") as f:
                f.write(b"PAR1" + b"x" * 100)  # half a file on disk
            os._exit(9)
        embedded.pq.write_table = dying_write
    else:  # the new version file is complete, the pointer switch never happens
        def dying_pointer(path, obj):
            os._exit(9)
        embedded.atomic_write_json = dying_pointer
    make_bank(seed=1).write(bank_dir)
    """
)


@pytest.mark.parametrize("where", ["during_parquet", "before_pointer"])
def test_killed_write_leaves_the_old_bank(bank, tmp_path, where):
    bank_dir = tmp_path / "bank"
    bank.write(bank_dir)
    repo_root = str(Path(__file__).resolve().parents[2])  # so the child can import tests.feature_bank
    env = {**os.environ, "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, where, str(bank_dir)], env=env, timeout=60)
    assert proc.returncode == 9
    loaded = FeatureBank.load(bank_dir)
    assert loaded.version == bank.version
    assert np.array_equal(loaded.codes, bank.codes)
