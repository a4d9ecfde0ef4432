"""Errors a request can get, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

A user mistake is a 4xx naming the field and the fix; only a fault of the server is a 5xx. The same
`ApiError` travels from the decoder to the ingress inside a `DecodeOutcome` (a plain value, so it
pickles) and becomes an HTTP response or a gRPC status there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

# HTTP status → (OpenAI's error type, the `kind` tag of the error metric, gRPC status). The types
# are OpenAI's own: its 401 is an `invalid_request_error` with code `invalid_api_key`, and its
# overload a 503 `server_error`.
_STATUS: dict[int, tuple[str, str, grpc.StatusCode]] = {
    400: ("invalid_request_error", "invalid_request", grpc.StatusCode.INVALID_ARGUMENT),
    401: ("invalid_request_error", "auth", grpc.StatusCode.UNAUTHENTICATED),  # code invalid_api_key
    404: ("invalid_request_error", "not_found", grpc.StatusCode.NOT_FOUND),
    405: ("invalid_request_error", "not_found", grpc.StatusCode.UNIMPLEMENTED),
    413: ("invalid_request_error", "too_large", grpc.StatusCode.RESOURCE_EXHAUSTED),
    503: ("server_error", "overloaded", grpc.StatusCode.UNAVAILABLE),
    500: ("server_error", "internal", grpc.StatusCode.INTERNAL),
}


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def type(self) -> str:
        return _status_row(self.status)[0]

    @property
    def kind(self) -> str:
        return error_kind(self.status)

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return _status_row(self.status)[2]

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status == 503:
            return {"Retry-After": "1"}
        return {}


def _status_row(status: int) -> tuple[str, str, grpc.StatusCode]:
    return _STATUS.get(status) or _STATUS[500 if status >= 500 else 400]


def error_kind(status: int) -> str:
    """The low-cardinality `kind` tag of an error response's metric."""
    return _status_row(status)[1]


class RequestRejected(Exception):
    """Raised where a request is found unusable; carries the error to send back."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error

    def __reduce__(self) -> tuple[type, tuple[ApiError]]:
        # Pickled when it crosses processes; the default would rebuild it from the message alone.
        return type(self), (self.error,)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestRejected:
    return RequestRejected(ApiError(400, message, param, code))


def unauthorized(message: str) -> RequestRejected:
    return RequestRejected(ApiError(401, message, code="invalid_api_key"))


def overloaded(message: str) -> RequestRejected:
    return RequestRejected(ApiError(503, message, code="overloaded"))


def internal_error(message: str) -> ApiError:
    return ApiError(500, message, code="internal_error")


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """The first of pydantic's `errors()` for a body that failed validation, naming the field."""
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        message, code = f"the request body is not valid JSON: {detail}", "invalid_json"
    elif first["type"] == "extra_forbidden":
        message, code = f"unknown field `{param}`", "unknown_field"
    elif first["type"] == "missing":
        message, code = f"missing required field `{param}`", "missing_field"
    elif param is None and (named := re.match(r"Value error, (\w+): (.*)", first["msg"], re.DOTALL)):
        # A check across fields (schemas.py's model validators) names its field first.
        param, message, code = named[1], f"`{named[1]}`: {named[2]}", "unsupported_value"
    elif param is None:
        message, code = f"the request body must be a JSON object: {first['msg']}", "invalid_body"
    else:
        message, code = f"`{param}`: {first['msg']}", "invalid_value"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(400, message, param, code)
