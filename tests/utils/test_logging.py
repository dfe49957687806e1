from __future__ import annotations

import io
import logging
import sys

from userip.utils.logging import setup_logging


def test_console_handler_follows_the_current_stderr(monkeypatch):
    setup_logging()  # installs the console handler once per process (maybe in an earlier test)
    log = logging.getLogger("userip.test_logging")
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.info("one")
    assert "one" in first.getvalue()
    first.close()  # e.g. a finished capture: later records must not go to the closed stream
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("two")
    assert "two" in second.getvalue() and "Logging error" not in second.getvalue()
