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


def test_quiet_console_keeps_warnings_and_the_file_keeps_everything(monkeypatch, tmp_path):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    log_file = tmp_path / "logs" / "run.log"
    setup_logging(log_file, console_level=logging.WARNING)
    try:
        log = logging.getLogger("userip.test_logging")
        log.info("detail")
        log.warning("careful")
        log.error("broken")
        assert "detail" not in err.getvalue()
        assert "WARNING userip.test_logging: careful" in err.getvalue()
        assert "ERROR userip.test_logging: broken" in err.getvalue()
        for handler in logging.getLogger("userip").handlers:
            handler.flush()
        text = log_file.read_text()
        assert "detail" in text and "careful" in text and "broken" in text
    finally:
        setup_logging()  # the console back to INFO for later tests in this process


def test_a_record_during_a_progress_bar_gets_its_own_line(monkeypatch):
    from tqdm import tqdm

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    setup_logging()
    with tqdm(total=3, desc="stage", file=sys.stderr) as bar:
        bar.update()
        logging.getLogger("userip.test_logging").warning("mid-bar")
    lines = err.getvalue().replace("\r", "\n").split("\n")
    assert any(line.endswith("WARNING userip.test_logging: mid-bar") for line in lines)
    assert not any("stage" in line and "mid-bar" in line for line in lines)
