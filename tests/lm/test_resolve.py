"""``--lm`` values (``userip.lm.resolve``): ``none`` is a built-in that names no model."""

from __future__ import annotations

import pytest

from userip.lm.resolve import BUILT_IN_LMS, NO_LM_SPEC, is_no_lm, lm_as_recorded, resolve_lm
from userip.utils.config import ConfigError


def test_none_is_a_built_in_that_no_command_can_load(tmp_path, monkeypatch):
    assert NO_LM_SPEC == "none" and NO_LM_SPEC in BUILT_IN_LMS
    assert is_no_lm("none") and is_no_lm(" none ") and not is_no_lm("offline") and not is_no_lm(None)
    with pytest.raises(ConfigError, match="no LM to load"):
        resolve_lm("none")
    with pytest.raises(ConfigError, match="'none'"):  # the error for a bad value lists it
        resolve_lm("not a model!")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").mkdir()  # a folder of that name is never what a run records
    assert lm_as_recorded("none", tmp_path / "run") == "none"
    assert lm_as_recorded(str(tmp_path / "run" / "lm" / "x"), tmp_path / "run") == str(
        tmp_path / "run" / "lm" / "x"
    )
