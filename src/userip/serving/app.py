"""HTTP service over a ``Scorer``: FastAPI app factory (served by uvicorn from ``userip serve``).

Endpoints (JSON; every error is ``{"detail": "<message>"}`` with a 4xx status, and the server keeps serving):

    POST /v1/score          {"user_id": "u1", "item_ids": ["i1", "i2"]} -> probabilities in item order
    POST /v1/score/batch    {"user_ids": [...], "item_ids": [...]} (parallel lists) -> one score per pair
    GET  /healthz           liveness
    GET  /v1/model          model name, fields, bank version, dataset hash, last reload error
    POST /v1/admin/reload   load the bank's current version without a restart (old one keeps serving on
                            error); with an admin token configured it needs ``Authorization: Bearer <token>``

Client-facing messages never show server paths (``client_safe``: an absolute path becomes its last component);
the full message goes to the server log. Requests in flight are bounded (``ConcurrencyLimitMiddleware``,
``/healthz`` exempt); slow and idle connections are handled below the app (``userip.serving.http``).

Scoring handlers are ``async`` and run inline on the event loop: a request is a few hundred microseconds of
CPU, so a thread-pool hop would cost about as much as the work. Reload runs in the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import signal
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from userip.serving.config import ServeConfig
from userip.serving.redis_bank import RedisBankError
from userip.serving.scorer import BankReloadError, Scorer, ScoringError
from userip.utils.logging import get_logger

log = get_logger(__name__)

# Raw IDs: strings or non-negative integers (JSON floats, bools and null are refused, not coerced).
RawId = Annotated[StrictStr, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)]
BankVersion = str | int | None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: RawId
    item_ids: list[RawId]


class ScoreResponse(BaseModel):
    scores: list[float]
    unknown_user: bool
    unknown_items: list[str]
    model: str
    bank_version: BankVersion


class BatchScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[RawId]
    item_ids: list[RawId]


class BatchScoreResponse(BaseModel):
    scores: list[float]
    unknown_users: list[str]  # distinct, in order of first appearance
    unknown_items: list[str]
    model: str
    bank_version: BankVersion


class ReloadResponse(BaseModel):
    changed: bool
    previous_version: BankVersion
    bank_version: BankVersion


class _ClientError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


HEALTH_PATH = "/healthz"
# Module level: FastAPI resolves the (string) annotations of dependencies against module globals.
_BEARER = HTTPBearer(auto_error=False)
# An absolute path (not the path part of a URL such as redis://host:6379/0): "/" at the start of a token.
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"`,;:()\[\]{}<>/]+/)*([^\s'\"`,;:()\[\]{}<>/]*)")


def client_safe(text: str) -> str:
    """``text`` with every absolute server path reduced to its last component (what a client may see)."""
    return _ABS_PATH.sub(lambda m: m.group(1) or ".", text)


def create_app(scorer: Scorer, config: ServeConfig | None = None, admin_token: str | None = None) -> FastAPI:
    """The service for one scorer; limits come from ``config``. ``admin_token``: the bearer token
    ``/v1/admin/reload`` requires (None: no authentication, for a loopback-only service)."""
    cfg = config or ServeConfig()

    async def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if admin_token is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, admin_token.encode()):  # constant time: no timing oracle
            raise _ClientError(
                401,
                "admin endpoints need the header 'Authorization: Bearer <admin token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        poller = None
        if cfg.bank_poll_s > 0 and scorer.uses_bank:
            poller = asyncio.create_task(_poll_bank(scorer, cfg.bank_poll_s))
        if scorer.uses_bank:
            # `kill -HUP <pid>` reloads the bank; only possible when uvicorn runs in the main thread.
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                asyncio.get_running_loop().add_signal_handler(
                    signal.SIGHUP, lambda: asyncio.ensure_future(_reload_quietly(scorer))
                )
        yield
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    app = FastAPI(
        title="userip scoring service",
        description="CTR scores from a trained model and a feature bank of inferred user profiles.",
        lifespan=lifespan,
    )
    app.state.scorer = scorer
    app.state.config = cfg

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = errors[0].get("ctx") or {}
            return _error(400, f"malformed JSON body: {ctx.get('error', 'decode error')}")
        return _error(422, "invalid request: " + "; ".join(_describe(e) for e in errors[:10]))

    @app.exception_handler(_ClientError)
    async def _client_error(request: Request, exc: _ClientError) -> JSONResponse:
        return _error(exc.status, exc.detail, exc.headers)

    @app.exception_handler(ScoringError)
    async def _scoring_error(request: Request, exc: ScoringError) -> JSONResponse:
        return _error(422, client_safe(str(exc)))

    @app.exception_handler(BankReloadError)
    @app.exception_handler(RedisBankError)
    async def _bank_error(request: Request, exc: Exception) -> JSONResponse:
        # The bank backend, not the request, is at fault: 503 tells a load balancer to try elsewhere.
        # The log keeps the full message; the client gets it without server paths.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(503, client_safe(str(exc)))

    @app.get(HEALTH_PATH)
    async def healthz() -> dict[str, Any]:
        snap = scorer.snapshot
        return {"status": "ok", "bank_version": None if snap is None else snap.version}

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return {k: client_safe(v) if isinstance(v, str) else v for k, v in scorer.describe().items()}

    # Scoring handlers build their JSON directly (``response_model`` documents the schema): re-validating
    # a response the handler just built would cost about as much as the model's forward pass.
    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> Response:
        _check_ids("item_ids", req.item_ids, cfg.max_items_per_request, "max_items_per_request", cfg)
        _check_ids("user_id", [req.user_id], 1, "", cfg)
        result = scorer.score([req.user_id], req.item_ids)
        return _json(
            {
                "scores": result.probs.tolist(),
                "unknown_user": bool(result.unknown_user[0]),
                "unknown_items": _flagged(req.item_ids, result.unknown_item),
                "model": scorer.model_name,
                "bank_version": result.bank_version,
            }
        )

    @app.post("/v1/score/batch", response_model=BatchScoreResponse)
    async def score_batch(req: BatchScoreRequest) -> Response:
        if len(req.user_ids) != len(req.item_ids):
            raise _ClientError(
                422,
                f"user_ids has {len(req.user_ids)} entries but item_ids has {len(req.item_ids)}",
            )
        _check_ids("item_ids", req.item_ids, cfg.max_batch_pairs, "max_batch_pairs", cfg)
        _check_ids("user_ids", req.user_ids, cfg.max_batch_pairs, "max_batch_pairs", cfg)
        result = scorer.score(req.user_ids, req.item_ids)
        return _json(
            {
                "scores": result.probs.tolist(),
                "unknown_users": _flagged(req.user_ids, result.unknown_user),
                "unknown_items": _flagged(req.item_ids, result.unknown_item),
                "model": scorer.model_name,
                "bank_version": result.bank_version,
            }
        )

    @app.post("/v1/admin/reload", dependencies=[Depends(require_admin)])
    async def reload(force: bool = False) -> ReloadResponse:
        if not scorer.uses_bank:
            raise _ClientError(409, f"model {scorer.model_name!r} uses no feature bank; nothing to reload")
        result = await run_in_threadpool(scorer.reload_bank, force)  # file I/O off the event loop
        return ReloadResponse(
            changed=result.changed, previous_version=result.previous_version, bank_version=result.version
        )

    # Outermost (added last): refuse oversized bodies before FastAPI parses them; inside it, the in-flight
    # bound, so a refused body never holds a slot.
    app.add_middleware(ConcurrencyLimitMiddleware, limit=cfg.limit_concurrency)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    return app


def _check_ids(name: str, ids: list[Any], limit: int, limit_name: str, cfg: ServeConfig) -> None:
    if len(ids) > limit:
        raise _ClientError(422, f"{name} has {len(ids)} entries; the limit is {limit} ({limit_name})")
    if not ids and limit_name:
        raise _ClientError(422, f"{name} must not be empty")
    if max((len(v) for v in ids if type(v) is str), default=0) > cfg.max_id_length:
        i, v = next((i, v) for i, v in enumerate(ids) if type(v) is str and len(v) > cfg.max_id_length)
        raise _ClientError(422, f"{name}[{i}] is {len(v)} characters long; the limit is {cfg.max_id_length}")


def _flagged(ids: list[Any], mask: Any) -> list[str]:
    """Distinct raw IDs (as strings) whose mask entry is set, in order of first appearance."""
    if not mask.any():
        return []
    return list(dict.fromkeys(str(v) for v, m in zip(ids, mask.tolist()) if m))


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    return f"{loc}: {err.get('msg', 'invalid')}"


def _json(payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


async def _poll_bank(scorer: Scorer, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await _reload_quietly(scorer)


async def _reload_quietly(scorer: Scorer) -> None:
    # Errors are logged and recorded by the scorer (see /v1/model); the old bank keeps serving.
    with contextlib.suppress(BankReloadError):
        await run_in_threadpool(scorer.reload_bank)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in flight; more are answered 503 at once (``Retry-After: 1``).

    Counts requests, not connections (an idle keep-alive socket costs nothing here), and never refuses
    ``/healthz``: a busy server is alive, and a load balancer must be able to tell. One event loop runs
    every request, so a plain counter is exact.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = (HEALTH_PATH,)) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            detail = f"server busy: {self.in_flight} requests in flight (limit_concurrency={self.limit})"
            await send_json_error(send, 503, detail, [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def send_json_error(
    send: Send, status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A ``{"detail": ...}`` JSON error answered straight from ASGI middleware (before FastAPI runs)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads the request body (bounded) before the app sees it; answers 413 past ``max_bytes``.

    Covers both a declared ``Content-Length`` (refused without reading) and chunked bodies (refused as soon
    as the running total passes the limit); the buffered body is then replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for disconnect like the real receive

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_json_error(send, 413, f"request body exceeds {self.max_bytes} bytes (max_body_bytes)")
