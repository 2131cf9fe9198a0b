"""Federation at the HTTP edge: the state route peers probe, and forwarding from the OpenAI handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.response import Stream

from appliance.api.http import SSE_HEADERS, sse_error
from appliance.errors import ApplianceError, EngineError, ModelNotFound, PermissionDenied
from appliance.peering.auth import CLUSTER_HEADERS
from appliance.peering.cluster import STATE_PATH, Cluster
from appliance.peering.forward import NDJSON, Forwarded, RouteForwarder, forward, is_final_event
from appliance.policy.gateway import RequestContext
from appliance.protocol.cluster import NodeState

log = logging.getLogger(__name__)
SERVED_BY = "x-appliance-served-by"


_STATE = {"response": NodeState, "security": [{"bearer": []}], "summary": "This node's state, for peers (cluster signature) and admin keys"}


@get(STATE_PATH, opt=_STATE)
async def cluster_state(request: Request, cluster: Cluster, ctx: RequestContext) -> Response[bytes]:
    """This node's name, health, models and load. For peers (cluster signature) and admins.

    The gateway leaves this route to the handler, so the probes of every peer are neither
    rate-limited nor metered; the signature (or an admin key) is checked here instead.
    """
    headers = {k.lower(): v for k, v in request.headers.items()}
    if cluster.verifier is not None and any(h in headers for h in CLUSTER_HEADERS):
        cluster.verifier.verify(headers, request.method, request.url.path)
    elif not ctx.authenticate(headers.get("authorization")).is_admin:
        raise PermissionDenied("The cluster state is for peers and admin keys.")
    return Response(msgspec.json.encode(cluster.node_state()), media_type="application/json")


async def forward_if_needed(
    cluster: Cluster, ctx: RequestContext, request: Request, body: bytes, model: str
) -> Response[bytes] | Stream | None:
    """A peer's answer when this request should be served elsewhere (see Cluster.plan); else None."""
    plan = cluster.plan(ctx.principal, model)
    if plan is None:
        return None
    assert ctx.principal is not None
    allowed = ctx.tenant.allowed_models
    choice = cluster.choose(plan, frozenset())
    if allowed is not None and choice is not None and choice[1].id not in allowed:
        raise ModelNotFound(f"The model '{choice[1].id}' does not exist.", param="model")
    forwards = ctx.gateway.metrics.forwards
    try:
        answer = await forward(
            cluster, plan, path=request.url.path, body=body, principal=ctx.principal, request_id=ctx.request_id
        )
    except ApplianceError:
        forwards.labels(peer="", outcome="unavailable").inc()
        raise
    return peer_response(answer, ctx)


def route_peers(cluster: Cluster, ctx: RequestContext, request: Request, body: bytes) -> RouteForwarder | None:
    """The way to the peers for a routed request (services/routing.py): None without peers, and for a
    request a peer forwarded here (never forwarded again)."""
    principal = ctx.principal
    if not cluster.enabled or not cluster.peers or principal is None or principal.forwarded_by is not None:
        return None
    return RouteForwarder(cluster, path=request.url.path, body=body, principal=principal, request_id=ctx.request_id,
                          allowed=ctx.tenant.allowed_models)


def peer_response(answer: Forwarded, ctx: RequestContext) -> Response[bytes] | Stream:
    """A peer's answer relayed to the client; this node records the forward (the peer meters the tokens)."""
    forwards = ctx.gateway.metrics.forwards
    forwards.labels(peer=answer.peer, outcome="ok" if answer.status < 400 else "error").inc()
    # The serving node meters the tokens; this node records that it forwarded the request, and where.
    ctx.forwarded(answer.peer, answer.model)
    headers = {**answer.headers, SERVED_BY: answer.peer}
    media_type = headers.pop("content-type", "application/json")
    if answer.events is not None:
        events = _relayed_events(answer.events, ctx, ndjson=media_type.startswith(NDJSON))
        stream_headers = SSE_HEADERS if media_type.startswith("text/event-stream") else {"Cache-Control": "no-cache"}
        return Stream(events, media_type=media_type, headers={**stream_headers, **headers})
    return Response(answer.body, status_code=answer.status, media_type=media_type, headers=headers)


async def _relayed_events(events: AsyncIterator[bytes], ctx: RequestContext, *, ndjson: bool) -> AsyncIterator[bytes]:
    """The peer's events; a failure mid-stream becomes a final error event, never a dropped socket.

    The forward is recorded before the last event goes out: a client that hangs up once it has
    read `[DONE]` must not turn it into a cancelled request.
    """
    error: ApplianceError | None = None
    try:
        async for event in events:
            if is_final_event(event):
                ctx.complete()
            yield event
    except ApplianceError as exc:
        error = exc
    except Exception:
        log.exception("relaying a peer's stream failed")
        error = EngineError("The forwarded stream failed.")
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if error is not None:
        ctx.gateway.metrics.forwards.labels(peer=ctx.usage.peer or "", outcome="broken_stream").inc()
        ctx.complete("error")
        if ndjson:  # Ollama's stream: an error line
            yield msgspec.json.encode({"error": error.message}) + b"\n"
        else:
            yield sse_error(error)


def cluster_model_list(cluster: Cluster, cards: list[Any], allowed: list[str] | None) -> dict[str, Any]:
    """/v1/models?scope=cluster: this node's cards and the peers', each with `location` (node names)."""
    data = []
    for card in cards:
        item = msgspec.to_builtins(card)
        item["location"] = [cluster.node, *cluster.where(item["id"])]
        data.append(item)
    local = {item["id"] for item in data}
    for model_id, m in cluster.peer_models().items():
        if model_id in local or (allowed is not None and model_id not in allowed):
            continue
        data.append({
            "id": m.id, "created": m.created, "owned_by": "appliance", "kind": m.kind, "format": m.format,
            "aliases": m.aliases, "context_length": m.context_length, "trained_context_length": None,
            "status": m.status, "object": "model",
            "location": cluster.where(model_id),
        })
    return {"data": data, "object": "list"}
