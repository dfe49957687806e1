"""uvicorn settings that keep the service answerable under slow, idle and numerous clients.

uvicorn alone has two gaps (0.54, h11): a connection that never sends a complete request is never timed out
(its keep-alive timer starts only after a response), and ``limit_concurrency`` counts *open connections*, so a
few hundred idle sockets turn every request, ``/healthz`` included, into 503. Here:

* ``guarded_protocol``: uvicorn's h11 protocol plus a request timer (a request's headers and body must arrive
  within ``timeout_request_s`` of its first byte, or of connecting) and a cap on open connections (extra ones
  are closed on accept instead of degrading everyone's requests). Header size is h11's own limit
  (``max_header_bytes``) and idle keep-alive is uvicorn's ``timeout_keep_alive``.
* ``uvicorn_config``: those settings with uvicorn's connection-counting ``limit_concurrency`` off; in-flight
  requests are bounded by ``ConcurrencyLimitMiddleware`` in the app instead, which exempts ``/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from userip.serving.config import ServeConfig
from userip.utils.logging import get_logger

log = get_logger(__name__)


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with a per-request deadline and a connection cap (set by ``guarded_protocol``)."""

    timeout_request_s: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._request_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("%d open connections (max_connections): closing a new one", len(self.connections) - 1)
            transport.close()
            return
        self._arm()  # a client that connects and sends nothing is timed out too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_incomplete():
            if self._request_timer is None:
                self._arm()
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined next request already partly buffered gets its own deadline.
        if not self.transport.is_closing() and self.conn.trailing_data[0] and self._request_timer is None:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_incomplete(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _arm(self) -> None:
        self._disarm()
        self._request_timer = self.loop.call_later(self.timeout_request_s, self._on_request_timeout)

    def _disarm(self) -> None:
        timer = getattr(self, "_request_timer", None)
        if timer is not None:
            timer.cancel()
            self._request_timer = None

    def _on_request_timeout(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or not self._request_incomplete():
            return
        # No complete request within the deadline: h11 cannot answer a request it never parsed, so close.
        # A handler waiting for the rest of the body sees a disconnect and stops.
        log.debug("closing a connection that sent no complete request in %.1f s", self.timeout_request_s)
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(config: ServeConfig) -> type[GuardedH11Protocol]:
    """A protocol class carrying ``config``'s request timeout and connection cap (uvicorn instantiates it)."""
    return type(
        "ServeH11Protocol",
        (GuardedH11Protocol,),
        {"timeout_request_s": float(config.timeout_request_s), "max_connections": config.max_connections},
    )


def uvicorn_config(app: Any, config: ServeConfig, **overrides: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` ``userip serve`` runs with (tests and benchmarks use the same)."""
    settings: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "access_log": False,  # one log line per request would cost more than scoring it
        "lifespan": "on",
        "http": guarded_protocol(config),
        "limit_concurrency": None,  # counts idle connections too; ConcurrencyLimitMiddleware replaces it
        "timeout_keep_alive": config.timeout_keep_alive,
        "h11_max_incomplete_event_size": config.max_header_bytes,
        "backlog": max(2048, config.max_connections),
    }
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def raise_fd_limit(max_connections: int, spare: int = 256) -> int:
    """Raise the soft open-files limit so ``max_connections`` sockets fit (never above the hard limit);
    returns the soft limit in force. Without it, accept() fails with EMFILE before the cap is reached."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return soft


__all__ = ["GuardedH11Protocol", "guarded_protocol", "raise_fd_limit", "uvicorn_config"]
