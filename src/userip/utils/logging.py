"""Logging to the console and to a file inside the run directory.

The file gets every record at ``level`` (INFO); the console gets those at ``console_level`` and above, so a
long command can keep its terminal to progress bars and warnings (``userip run``) while the file keeps the
details. Console records are written through ``tqdm.write``: a warning in the middle of a progress bar gets
its own line instead of breaking the bar.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderrHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stderr`` as it is at each record, not as it was when the
    handler was made: the console handler is installed once per process, and a stream swapped since (a
    caller's redirect, a test's capture) would otherwise leave it writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it: always follow sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            tqdm.write(self.format(record), file=stream)  # clears open bars, writes, redraws them
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(
    log_file: str | Path | None = None, level: int = logging.INFO, console_level: int = logging.INFO
) -> None:
    """Console handler once; a file handler per distinct ``log_file`` (appended, so reruns keep history).

    ``console_level`` is what reaches the terminal (``logging.WARNING``: warnings and errors only); every
    call sets it, so a later command in the same process gets the level it asks for.
    """
    root = logging.getLogger("userip")
    root.setLevel(level)
    console = next((h for h in root.handlers if getattr(h, "_userip_console", False)), None)
    if console is None:
        console = _CurrentStderrHandler()
        console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        console._userip_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    console.setLevel(console_level)
    if log_file is not None:
        log_file = Path(log_file).resolve()
        if not any(getattr(h, "baseFilename", None) == str(log_file) for h in root.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(fh)
