"""The gateway at the edge: an ASGI middleware around every route.

It gives each request an id (X-Request-Id), authenticates it (every route but /health and the
static page), hands the per-request context to the handlers, and when the request ends writes
its usage record (if the handler has not already), counts it in /metrics and logs one JSON line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import error_body
from appliance.errors import ApplianceError, AuthenticationFailed, PermissionDenied
from appliance.observability.logs import request_id_var
from appliance.peering.auth import H_BODY
from appliance.policy.gateway import Gateway, RequestContext, error_status
from appliance.protocol.ollama import OllamaError
from appliance.types import Principal

log = logging.getLogger("appliance.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
# The cluster state route checks the cluster signature (or an admin key) itself: peers probe it every
# few seconds, and those probes are neither rate-limited nor metered. The API description and its docs
# page are the same on every appliance of a version and hold no data.
OLLAMA_PREFIX = "/api/"
PUBLIC_ROUTES = frozenset({"/health", "/", "/v1/cluster/state", "/openapi.json", "/docs"})
METRICS_ROUTE = "/metrics"
_LOOPBACK = ("127.", "::1", "localhost")

PeerAuth = Callable[[dict[str, str], str, str], Principal | None]
"""(headers, method, path) -> the forwarded caller when a valid cluster signature is present."""


def is_loopback_client(scope: Scope) -> bool:
    client = scope.get("client")
    return bool(client) and str(client[0]).startswith(_LOOPBACK)


def context_of(scope: Scope) -> RequestContext:
    return scope["state"]["ctx"]


def gateway_middleware(gateway: Gateway, peer_auth: PeerAuth | None = None) -> Callable[[ASGIApp], ASGIApp]:
    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            given = headers.get("x-request-id", "")
            request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
            route = scope.get("path_template") or scope["path"]
            ctx = gateway.context(request_id, route, scope["method"])
            ctx.conversation_id = headers.get("x-conversation-id", "")[:256] or None
            scope.setdefault("state", {})["ctx"] = ctx
            token = request_id_var.set(request_id)
            status = 0

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
                    if ctx.usage.route_path is not None:  # a routed model id: the hops it took (services/routing.py)
                        message["headers"].append((b"x-route", ctx.usage.route_path.encode()))
                    if ctx.usage.variant is not None:  # a split's variant (canary / A/B)
                        message["headers"].append((b"x-route-variant", ctx.usage.variant.encode()))
                elif message["type"] == "http.response.body" and status and not ctx.usage.recorded:
                    # The one place a request is settled: durable before the bytes that end the answer.
                    if ctx.usage.ready_to_settle or not message.get("more_body", False):
                        await asyncio.to_thread(ctx.usage.settle, status)  # an fsync'd write: off the loop
                await send(message)

            try:
                if route in PUBLIC_ROUTES:
                    ctx.usage.metered = False
                elif route == METRICS_ROUTE:
                    ctx.usage.metered = False
                    _authorize_metrics(gateway, ctx, scope, headers)
                else:
                    principal = peer_auth(headers, scope["method"], scope["path"]) if peer_auth else None
                    if principal is not None:
                        ctx.act_as(principal)
                        receive = _body_checked(receive, headers.get(H_BODY, ""))
                    else:
                        ctx.authenticate(headers.get("authorization"))
                    ctx.admit_request()
            except ApplianceError as exc:
                await _send_error(send_with_id, exc, ollama=scope["path"].startswith(OLLAMA_PREFIX))
                _finish(gateway, ctx, exc.status)
                request_id_var.reset(token)
                return
            try:
                await app(scope, receive, send_with_id)
            except BaseException as exc:
                status = status or error_status(exc)
                raise
            finally:
                if not ctx.usage.recorded:
                    # No final body was sent: the client went away mid-stream, or the handler failed. Settled
                    # here on the loop: awaiting in this `finally` could itself be cancelled, losing the record.
                    ctx.usage.settle(status or 499, outcome="cancelled" if status and status < 400 else None)
                _finish(gateway, ctx, status or 499)
                request_id_var.reset(token)

        return middleware

    return factory


def _body_checked(receive: Receive, expected: str) -> Receive:
    """A peer signed the body's digest: the body must match it, or the request fails with 401 when read."""
    digest = hashlib.sha256()

    async def checked() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            digest.update(message.get("body", b""))
            if not message.get("more_body", False) and not hmac.compare_digest(digest.hexdigest(), expected):
                raise AuthenticationFailed("The request body does not match its cluster signature.")
        return message

    return checked


def _authorize_metrics(gateway: Gateway, ctx: RequestContext, scope: Scope, headers: dict[str, str]) -> None:
    access = gateway.settings.metrics_access
    if access == "open" or (is_loopback_client(scope) and access in ("loopback", "key")):
        return
    if access == "loopback":
        raise PermissionDenied("/metrics is served to loopback clients only (gateway.metrics_access).")
    ctx.authenticate(headers.get("authorization"))


def _finish(gateway: Gateway, ctx: RequestContext, status: int) -> None:
    if not ctx.usage.recorded:
        ctx.usage.settle(status)
    tenant = ctx.principal.tenant if ctx.principal else ""
    route = f"{ctx.method} {ctx.route}"
    elapsed = time.monotonic() - ctx.started
    gateway.metrics.requests.labels(route=route, status=str(status), tenant=tenant).inc()
    gateway.metrics.latency.labels(route=route).observe(elapsed)
    # Health probes (load balancers, peers) would drown the log: they go at debug level.
    level = logging.DEBUG if ctx.route in PUBLIC_ROUTES else logging.INFO
    log.log(level, "request", extra={"fields": {**ctx.usage.summary(), "status": status, "ms": round(elapsed * 1000, 1)}})


async def _send_error(send: Send, exc: ApplianceError, *, ollama: bool = False) -> None:
    """The refusal in OpenAI's error shape, or Ollama's `{"error": "..."}` on Ollama's routes."""
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if isinstance(exc, AuthenticationFailed):
        headers.append((b"www-authenticate", b'Bearer realm="appliance"'))
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    body = OllamaError(exc.message) if ollama else error_body(exc)
    await send({"type": "http.response.body", "body": msgspec.json.encode(body)})

