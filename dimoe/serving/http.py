"""The HTTP plumbing of the ingress: the FastAPI app with OpenAI-style errors, the body-size limit,
request metrics and bearer-token auth.

Per-replica values (`limits`, `auth`, `metrics`) live on `app.state`, set by the ingress deployment
when it starts: the app object itself is built at import time, before any configuration is known.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dimoe.serving.errors import ApiError, RequestRejected, internal_error, unauthorized, validation_error

API_KEY_ENV = "DIMOE_API_KEY"
logger = logging.getLogger(__name__)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def create_api() -> FastAPI:
    """The ingress's FastAPI app: every error, including FastAPI's own, in OpenAI's shape."""
    api = FastAPI(title="DiMoE-VL", docs_url=None, redoc_url=None)
    # The last added runs first: count every request, then authenticate, then bound the body, so
    # that an unauthenticated caller learns nothing about the API beyond the 401.
    api.add_middleware(BodyLimit)
    api.add_middleware(RequireAuth)
    api.add_middleware(RequestMetrics)

    @api.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return error_response(exc.error)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @api.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(internal_error(f"internal error: {type(exc).__name__}"))

    return api


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions through to the handlers."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimit:
    """Refuse bodies over `app.state.limits.max_request_bytes`: by the declared length up front,
    and by counting for bodies sent without one (chunked)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = getattr(scope["app"].state, "limits", None) if scope["type"] == "http" else None
        if limits is None:
            await self.app(scope, receive, send)
            return
        limit = limits.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error_response(ApiError(413, str(BodyTooLarge(limit).detail), code="request_too_large"))(
                scope, receive, send
            )
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


class RequireAuth:
    """Check `app.state.auth` (a BearerAuth) on every path but the open ones, before the body is read."""

    OPEN_PATHS = frozenset({"/healthz"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = getattr(scope["app"].state, "auth", None) if scope["type"] == "http" else None
        if auth is not None and scope["path"] not in self.OPEN_PATHS:
            try:
                auth.check(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
            except RequestRejected as exc:
                await error_response(exc.error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Count requests per endpoint and errors per kind (from the response status) in
    `app.state.metrics` (an IngressMetrics), errors raised before a route runs included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            # Routing records the matched route in the scope; requests refused before routing, or
            # matching nothing, count as "other" (raw paths would make the tag unbounded).
            route = scope.get("route")
            metrics.request(route.path if isinstance(route, APIRoute) else "other", "http", status)


class BearerAuth:
    """Checks `Authorization: Bearer <key>` against a SHA-256 digest of the key, so that the key
    itself is not stored in the deployment's arguments. Disabled when there is no key."""

    def __init__(self, key_sha256: str | None) -> None:
        self.key_sha256 = key_sha256

    @property
    def enabled(self) -> bool:
        return self.key_sha256 is not None

    def check(self, authorization: str | None) -> None:
        if not self.enabled:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        if not hmac.compare_digest(key_digest(token.strip()), self.key_sha256):
            raise unauthorized("invalid API key")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def resolve_api_key(configured: str | None) -> str | None:
    """The configured key, else the DIMOE_API_KEY environment variable; None = no auth."""
    return configured or os.environ.get(API_KEY_ENV) or None


def api_key_digest(configured: str | None) -> str | None:
    key = resolve_api_key(configured)
    return key_digest(key) if key else None
