"""Validated configuration of the HTTP scoring service (``userip serve``)."""

from __future__ import annotations

import dataclasses
import ipaddress

from userip.utils.config import ConfigError, check_fields

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclasses.dataclass
class ServeConfig:
    """Where the service listens and the limits it enforces on every request.

    Limits bound the work one request can cause: a body larger than ``max_body_bytes`` is refused before it
    is parsed (413); more than ``max_items_per_request`` item IDs on ``/v1/score`` or ``max_batch_pairs``
    pairs on ``/v1/score/batch`` is refused (422); IDs longer than ``max_id_length`` characters too.

    Slow and idle clients cannot starve the service: a connection must deliver each request (headers and
    body) within ``timeout_request_s`` of its first byte (or of connecting), an idle keep-alive connection
    is closed after ``timeout_keep_alive`` seconds, headers are capped at ``max_header_bytes``, connections
    beyond ``max_connections`` are closed on accept, and ``limit_concurrency`` bounds requests *in flight*
    (not open connections) with ``/healthz`` exempt, so idle sockets never turn the health check into 503.

    ``POST /v1/admin/reload`` needs ``Authorization: Bearer <token>`` when a token is configured: read from
    the file ``admin_token_file`` or else the environment variable named by ``admin_token_env`` (never from
    the command line, where ``ps`` shows it). Binding beyond loopback without a token is refused.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_items_per_request: int = 1000
    max_batch_pairs: int = 10_000
    max_body_bytes: int = 1 << 20
    max_id_length: int = 256
    # Requests in flight before answering 503 (back-pressure, not queueing); /healthz is never refused.
    limit_concurrency: int = 256
    # Open connections beyond this are closed on accept (each costs a file descriptor).
    max_connections: int = 1024
    # Seconds a client has to send a whole request from its first byte (or from connecting): slowloris guard.
    timeout_request_s: float = 10.0
    # Seconds an idle keep-alive connection stays open after a response (uvicorn's timeout_keep_alive).
    timeout_keep_alive: int = 5
    # Bytes of request line + headers h11 buffers before refusing the request (h11_max_incomplete_event_size).
    max_header_bytes: int = 16 * 1024
    # Where the admin bearer token comes from (the token itself is never in a config or on a command line).
    admin_token_env: str = "USERIP_ADMIN_TOKEN"
    admin_token_file: str | None = None
    # torch intra-op threads: scoring batches are tiny, so one thread avoids thread hand-off costs.
    num_threads: int = 1
    # > 0: check the bank's version pointer every this many seconds and reload when it changed.
    bank_poll_s: float = 0.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_fields(
            self,
            words=("host", "admin_token_env"),
            int_ranges={"port": (0, 65535)},
            positive_ints=(
                "max_items_per_request",
                "max_batch_pairs",
                "max_body_bytes",
                "max_id_length",
                "limit_concurrency",
                "num_threads",
                "max_connections",
                "timeout_keep_alive",
                "max_header_bytes",
            ),
            positive_numbers=("timeout_request_s",),
            nonnegative_numbers=("bank_poll_s",),  # 0 = no polling
            choices={"log_level": LOG_LEVELS},
            where="serve",
        )
        if self.admin_token_file is not None and (
            not isinstance(self.admin_token_file, str) or not self.admin_token_file
        ):
            raise ConfigError(f"serve.admin_token_file must be a path, got {self.admin_token_file!r}")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False
