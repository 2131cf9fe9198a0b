"""The HTTP edge's shared pieces: one JSON response helper, one SSE framing (with its error event),
and the admin guard. Controllers use these instead of writing bytes by hand."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from litestar import Response
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from appliance.api.errors import error_body
from appliance.api.gateway import context_of
from appliance.errors import ApplianceError, EngineError, PermissionDenied

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        content=msgspec.json.encode(obj), status_code=status, media_type="application/json", headers=headers
    )


def sse_event(obj: object, kind: str | None = None) -> bytes:
    """One server-sent event: `data: <json>`, after `event: <kind>` when the stream names its events."""
    data = b"data: " + msgspec.json.encode(obj) + b"\n\n"
    return data if kind is None else b"event: " + kind.encode() + b"\n" + data


def sse_error(exc: ApplianceError) -> bytes:
    return sse_event(error_body(exc))


async def sse(
    events: AsyncIterator[bytes], *, done: bool = True, on_error: Callable[[ApplianceError], bytes] = sse_error,
    close: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """Frame a stream of events: `[DONE]` at the end (unless `done` is False), and a failure after the
    stream began becomes a final error event (`on_error` shapes it), never a dropped socket."""
    try:
        async for event in events:
            yield event
        if done:
            yield _DONE
    except ApplianceError as exc:
        yield on_error(exc)
    except Exception:
        log.exception("stream failed")
        yield on_error(EngineError("The stream failed inside the server."))
    finally:
        if close is not None:
            await close()


def requires_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard for admin routes: declared on the controller, checked before any handler runs."""
    principal = context_of(connection.scope).principal
    if principal is None or not principal.is_admin:
        raise PermissionDenied("This route needs an admin key.")
