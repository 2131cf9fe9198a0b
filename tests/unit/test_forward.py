"""Forwarding against fake peers (httpx.MockTransport): retries, fallbacks, refusals, broken streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from appliance.errors import PeerUnavailable
from appliance.peering.auth import SignatureVerifier
from appliance.peering.cluster import Cluster, ForwardPlan
from appliance.peering.forward import Forwarded, forward
from tests.unit.test_peering import CALLER, SECRET, _Registry, cluster_with, model, peer

PATH = "/v1/chat/completions"
OK_SSE = b'data: {"choices":[{"index":0}]}\n\ndata: [DONE]\n\n'


def run(cluster: Cluster, handler: Callable[[httpx.Request], httpx.Response]) -> Forwarded:
    async def go() -> Forwarded:
        cluster.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        try:
            return await forward(cluster, ForwardPlan(model="gemma"), path=PATH, body=b"{}", principal=CALLER,
                                 request_id="req-12345678")
        finally:
            await cluster.client.aclose()

    return asyncio.run(go())


def two_peers() -> Cluster:
    return cluster_with(_Registry(), peer("b", model("gemma")), peer("c", model("gemma", busy=1)))


def by_host(**answers: Callable[[httpx.Request], httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: answers[request.url.host](request)


def test_the_request_reaches_the_peer_signed_for_the_caller_without_the_callers_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    got = run(two_peers(), answer)
    assert (got.peer, got.model, got.status, got.body) == ("b", "gemma", 200, b'{"ok":true}')
    request = seen[0]
    assert request.url == "http://b:8080/v1/chat/completions" and request.content == b"{}"
    assert "authorization" not in request.headers and request.headers["x-request-id"] == "req-12345678"
    verifier = SignatureVerifier(lambda node: SECRET, paths=frozenset({PATH}))
    principal = verifier(dict(request.headers), "POST", PATH)
    assert principal is not None and principal.tenant == CALLER.tenant and principal.forwarded_by == "a"


def test_an_unreachable_or_overloaded_peer_is_replaced_by_the_next() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    cluster = two_peers()
    got = run(cluster, by_host(b=refuse, c=lambda r: httpx.Response(200, json={})))
    assert got.peer == "c" and cluster.peers[0].forward_failures == 1 and cluster.peers[0].failures == 1

    cluster = two_peers()
    busy = httpx.Response(503, json={"error": {"message": "full"}}, headers={"retry-after": "1"})
    got = run(cluster, by_host(b=lambda r: busy, c=lambda r: httpx.Response(200, json={})))
    assert got.peer == "c" and cluster.peers[0].up  # overloaded is not dead


def test_when_every_peer_is_overloaded_the_last_answer_is_passed_on() -> None:
    got = run(two_peers(), lambda r: httpx.Response(503, json={"error": {}}, headers={"retry-after": "3"}))
    assert got.status == 503 and got.headers["retry-after"] == "3"


def test_a_peer_refusing_our_signature_is_marked_unauthorised() -> None:
    cluster = two_peers()
    refused = httpx.Response(401, json={"error": {"message": "Invalid cluster signature"}})
    got = run(cluster, by_host(b=lambda r: refused, c=lambda r: httpx.Response(200, json={})))
    assert got.peer == "c" and cluster.peers[0].status == "unauthorised"
    with pytest.raises(PeerUnavailable):
        run(cluster_with(_Registry(), peer("b", model("gemma"))), lambda r: refused)


def test_a_stream_is_relayed_whole_events_and_a_truncated_one_raises_after_the_last_whole_event() -> None:
    async def collect(cluster: Cluster, body: bytes) -> tuple[list[bytes], Exception | None]:
        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 7):  # events split across reads, as TCP may deliver them
                yield body[i : i + 7]

        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=pieces(), headers={"content-type": "text/event-stream"})

        cluster.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        got = await forward(cluster, ForwardPlan(model="gemma"), path=PATH, body=b"{}", principal=CALLER, request_id="r" * 8)
        events, error = [], None
        assert got.events is not None
        try:
            async for event in got.events:
                events.append(event)
        except PeerUnavailable as exc:
            error = exc
        await cluster.client.aclose()
        return events, error

    events, error = asyncio.run(collect(two_peers(), OK_SSE))
    assert events == [b'data: {"choices":[{"index":0}]}\n\n', b"data: [DONE]\n\n"] and error is None
    cluster = two_peers()
    events, error = asyncio.run(collect(cluster, b'data: {"choices":[]}\n\ndata: {"cho'))
    assert events == [b'data: {"choices":[]}\n\n'] and isinstance(error, PeerUnavailable)
    assert cluster.peers[0].forward_failures == 1
    assert cluster.peers[0].started_since_probe == 0  # the finished forward no longer counts as load
