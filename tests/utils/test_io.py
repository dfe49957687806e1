import os
import stat

import pytest

from userip.utils.io import atomic_write_text, atomic_write_with


def test_written_file_gets_the_mode_open_would_give(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "{}")
    with open(tmp_path / "plain.json", "w") as f:  # the reference: a file created the ordinary way
        f.write("{}")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.parquet"
    atomic_write_text(path, "old")

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_with(path, crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.parquet"]
