"""The one place errors become HTTP: OpenAI's body `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def error_body(exc: ApplianceError) -> ErrorBody:
    return ErrorBody(ErrorDetail(exc.message, exc.type, exc.param, exc.code))


def _error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers
    )


def handle_appliance_error(_: Request, exc: ApplianceError) -> Response[bytes]:
    if exc.status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__ is not None)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return _error_response(exc.status, error_body(exc), headers)


def handle_http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = exc.detail or "error"
    if status == 413:
        message = "The request body is larger than this server accepts."
    body = ErrorBody(
        ErrorDetail(
            message=message,
            type=_TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            param=None,
            code=_CODE_BY_STATUS.get(status),
        )
    )
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() in {"allow", "retry-after"}}
    return _error_response(status, body, headers)


def handle_unexpected(_: Request, exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    body = ErrorBody(ErrorDetail("The server had an internal error.", "server_error", None, "internal_error"))
    return _error_response(500, body)
