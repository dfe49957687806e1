"""Validated configuration of the HTTP scoring service (``userip serve``)."""

from __future__ import annotations

import dataclasses

from userip.utils.config import ConfigError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclasses.dataclass
class ServeConfig:
    """Where the service listens and the limits it enforces on every request.

    Limits bound the work one request can cause: a body larger than ``max_body_bytes`` is refused before it
    is parsed (413); more than ``max_items_per_request`` item IDs on ``/v1/score`` or ``max_batch_pairs``
    pairs on ``/v1/score/batch`` is refused (422); IDs longer than ``max_id_length`` characters too.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_items_per_request: int = 1000
    max_batch_pairs: int = 10_000
    max_body_bytes: int = 1 << 20
    max_id_length: int = 256
    # Concurrent connections/requests uvicorn accepts before answering 503 (back-pressure, not queueing).
    limit_concurrency: int = 256
    # torch intra-op threads: scoring batches are tiny, so one thread avoids thread hand-off costs.
    num_threads: int = 1
    # > 0: check the bank's version pointer every this many seconds and reload when it changed.
    bank_poll_s: float = 0.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"serve.host must be a non-empty string, got {self.host!r}")
        _check_int("port", self.port, 0, 65535)
        for name in (
            "max_items_per_request",
            "max_batch_pairs",
            "max_body_bytes",
            "max_id_length",
            "limit_concurrency",
            "num_threads",
        ):
            _check_int(name, getattr(self, name), 1)
        if isinstance(self.bank_poll_s, bool) or not isinstance(self.bank_poll_s, int | float):
            raise ConfigError(f"serve.bank_poll_s must be a number, got {self.bank_poll_s!r}")
        if self.bank_poll_s < 0:
            raise ConfigError(f"serve.bank_poll_s must be >= 0 (0 = no polling), got {self.bank_poll_s}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"serve.log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    if not bad and maximum is not None and value > maximum:  # type: ignore[operator]
        bad = True
    if bad:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"serve.{name} must be an integer >= {minimum}{upper}, got {value!r}")
