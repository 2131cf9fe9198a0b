"""Forwarding one request to a peer, streaming included, with retries while nothing was sent yet.

The request goes out with its body untouched and the caller's identity signed into the cluster
headers (never the caller's API key). A peer that cannot be reached, refuses our signature,
answers 502/503 or breaks before its first event is left for the next least-loaded peer.
Once a stream has started it is relayed event by event; if the peer fails mid-stream the relay
raises PeerUnavailable after the last complete event, and the API edge turns that into an
error event: the client never sees half an event or a silently truncated answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import httpx
import msgspec

from appliance.errors import ApplianceError, PeerUnavailable
from appliance.peering.auth import sign
from appliance.peering.cluster import Cluster, ForwardPlan, PeerState, least_loaded, peer_error_message
from appliance.types import Principal

log = logging.getLogger(__name__)
_RELAYED_HEADERS = ("content-type", "retry-after")
# Overloaded, still loading or a broken proxy: another peer may do better. Not 504: a generation that
# ran past its time limit would only run that long again.
_RETRY_ON_STATUS = frozenset({502, 503})
NDJSON = "application/x-ndjson"
_EVENT_END = b"\n\n"


@dataclass
class Forwarded:
    """A peer's answer: a whole body, or server-sent events relayed as they come."""

    peer: str
    model: str
    status: int
    headers: dict[str, str]
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None


async def forward(
    cluster: Cluster, plan: ForwardPlan, *, path: str, body: bytes, principal: Principal, request_id: str,
    tried: set[str] | None = None,
) -> Forwarded:
    """Send the request to the least-loaded peer that can take it; on failure, to the next one.

    `tried`: filled with the names of the peers tried (a routed request names them in its path)."""
    tried = set() if tried is None else tried
    fallback: Forwarded | None = None
    while (choice := cluster.choose(plan, frozenset(tried))) is not None:
        peer, model = choice
        tried.add(peer.name)
        answer = await _attempt(cluster, peer, path=path, body=body, principal=principal, request_id=request_id)
        if answer is None:
            continue
        answer.model = model.id
        if answer.status not in _RETRY_ON_STATUS:
            return answer
        log.info("peer %s answered %d; trying another peer", peer.name, answer.status)
        peer.forward_failures += 1
        fallback = answer
    if fallback is not None:
        return fallback  # every peer was overloaded: pass the last one's answer (and Retry-After) on
    raise PeerUnavailable(
        f"No peer could take the request for model '{plan.model}'"
        + (f" (tried {', '.join(sorted(tried))})." if tried else "."),
        retry_after=max(1, round(cluster.settings.probe_interval_s)),
    )


async def _attempt(
    cluster: Cluster, peer: PeerState, *, path: str, body: bytes, principal: Principal, request_id: str
) -> Forwarded | None:
    """One try on one peer; None when it failed before anything could reach the client."""
    client = cluster.client
    assert client is not None, "the cluster was not started"
    epoch = peer.begin_forward()
    headers = {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "x-request-id": request_id,
        **sign(peer.secret, node=cluster.node, method="POST", path=path, principal=principal, body=body),
    }
    request = client.build_request("POST", peer.url + path, content=body, headers=headers)
    try:
        resp = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        peer.end_forward(epoch)
        _failed(cluster, peer, exc)
        return None
    relayed = {k: v for k in _RELAYED_HEADERS if (v := resp.headers.get(k)) is not None}
    media = resp.headers.get("content-type", "")
    streaming = resp.status_code == 200 and media.startswith(("text/event-stream", NDJSON))
    try:
        if streaming:
            events = _lines(resp) if media.startswith(NDJSON) else _events(resp)
            first = await anext(events)  # nothing has reached the client yet: a failure here is retried
            relay = _relay(cluster, peer, epoch, first, events, resp)
            return Forwarded(peer=peer.name, model="", status=200, headers=relayed, events=relay)
        content = await resp.aread()
    except (httpx.HTTPError, PeerUnavailable) as exc:
        await resp.aclose()
        peer.end_forward(epoch)
        _failed(cluster, peer, exc)
        return None
    await resp.aclose()
    peer.end_forward(epoch)
    if resp.status_code == 401:
        peer.refused(peer_error_message(content) or "401 Unauthorized")
        peer.forward_failures += 1
        return None
    return Forwarded(peer=peer.name, model="", status=resp.status_code, headers=relayed, body=content)


PeerReach = Literal["up", "down", "none"]
"""Whether an up peer serves a model ("up"), only peers that are down or refuse us do ("down"), or none does."""


class RouteForwarder:
    """One routed request's way to the peers (services/routing.py walks the ladder): whether a peer serves a
    candidate, and the forward itself, the body's `model` replaced by the candidate's name. Built by the API
    edge for the routes that forward (chat and completions, OpenAI's and Ollama's)."""

    def __init__(
        self, cluster: Cluster, *, path: str, body: bytes, principal: Principal, request_id: str,
        allowed: list[str] | None,
    ) -> None:
        self._cluster = cluster
        self._path = path
        self._body = body
        self._principal = principal
        self._request_id = request_id
        self._allowed = allowed

    def allows(self, model: str) -> bool:
        """Whether the caller's tenant may use `model` (its allowed_models), wherever it is served."""
        return self._allowed is None or model in self._allowed

    def reach(self, model: str) -> PeerReach:
        if least_loaded(self._cluster.peers, model) is not None:
            return "up"
        return "down" if self.known_by(model) else "none"

    def known_by(self, model: str) -> list[str]:
        """The peers that reported serving `model` in their last good probe, up or not."""
        return [p.name for p in self._cluster.peers if p.resolve(model) is not None]

    async def forward(self, model: str, tried: set[str]) -> Forwarded:
        """The request, naming `model`, on the least-loaded up peer that serves it (the next on failure).
        Raises PeerUnavailable when none could be reached; `tried` gets the names of the peers tried."""
        body = renamed(self._body, model)
        return await forward(
            self._cluster, ForwardPlan(model=model), path=self._path, body=body, principal=self._principal,
            request_id=self._request_id, tried=tried,
        )


def renamed(body: bytes, model: str) -> bytes:
    """A JSON request body with its `model` replaced (a routed id becomes the candidate a peer serves)."""
    value = msgspec.json.decode(body)
    value["model"] = model
    return msgspec.json.encode(value)


def _failed(cluster: Cluster, peer: PeerState, exc: BaseException) -> None:
    message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    log.warning("forwarding to peer %s failed before the answer started (%s)", peer.name, message)
    peer.forward_failures += 1
    peer.failed(message, limit=cluster.settings.down_after_failures)


async def _pieces(resp: httpx.Response, end_mark: bytes, is_final: Callable[[bytes], bool]) -> AsyncIterator[bytes]:
    """Whole pieces of a relayed stream, each ending in `end_mark` (SSE events: a blank line; NDJSON: a newline);
    PeerUnavailable if the stream breaks, or ends before a piece `is_final` says completes it."""
    buffer = b""
    finished = False
    try:
        async for data in resp.aiter_raw():
            buffer += data
            while (end := buffer.find(end_mark)) >= 0:
                piece, buffer = buffer[: end + len(end_mark)], buffer[end + len(end_mark):]
                if piece.strip():
                    finished = is_final(piece)
                    yield piece
    except httpx.HTTPError as exc:
        raise PeerUnavailable(f"The peer serving this request failed mid-stream ({type(exc).__name__}).") from None
    if not finished:
        raise PeerUnavailable("The peer serving this request closed the stream before it was complete.")


def _events(resp: httpx.Response) -> AsyncIterator[bytes]:
    """Whole SSE events; complete with `[DONE]` or an error event."""
    return _pieces(resp, _EVENT_END, lambda event: event.startswith((b"data: [DONE]", b'data: {"error"')))


def _lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """Whole NDJSON lines (Ollama's streams); complete once a line says `"done": true` or is an error."""
    return _pieces(resp, b"\n", _final_line)


def _final_line(line: bytes) -> bool:
    try:
        value = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return False
    return isinstance(value, dict) and (value.get("done") is True or "error" in value)


def is_final_event(event: bytes) -> bool:
    """The last event of a relayed stream: SSE's `[DONE]`, or NDJSON's `"done": true` line."""
    return event.startswith(b"data: [DONE]") or (event.startswith(b"{") and _final_line(event))


async def _relay(
    cluster: Cluster, peer: PeerState, epoch: int, first: bytes, events: AsyncIterator[bytes], resp: httpx.Response
) -> AsyncIterator[bytes]:
    try:
        yield first
        async for event in events:
            yield event
    except PeerUnavailable as exc:
        log.warning("peer %s failed mid-stream: %s", peer.name, exc.message)
        peer.forward_failures += 1
        peer.failed(exc.message, limit=cluster.settings.down_after_failures)
        raise
    finally:
        peer.end_forward(epoch)
        await events.aclose()  # type: ignore[attr-defined]
        await resp.aclose()
