"""Routed model ids through the real ASGI app (fake engines): the ladder, its header, usage record and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance.errors import ServerOverloaded
from appliance.storage.sqlite import connect
from appliance.types import GenerationRequest
from tests.api.conftest import World, make_client
from tests.fakes import FakeChatEngine, manifest

ROUTES = """
[routing.auto]
candidates = ["chat-a", "chat-b"]
load_wait_s = 0.3

[[routing.auto.rules]]
tenants = ["vip"]
use = ["chat-b"]

[[routing.auto.rules]]
needs = ["tools"]
use = ["chat-b", "chat-a"]
"""


class FullEngine(FakeChatEngine):
    """A model whose waiting queue is full: every request is refused at submit, as the scheduler does."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id, reply=f"reply of {model_id}", n_ctx=4096)
        self.full = True

        self.logprob = -0.5
        """Each token's log-probability (when the request asks for them)."""

    def submit(self, request: GenerationRequest, emit: Callable[[object], None], cancel: threading.Event) -> None:
        if self.full:
            raise ServerOverloaded("The queue is full.", retry_after=3)
        super().submit(request, emit, cancel)

    def _sequence(self, request: GenerationRequest, cancel: threading.Event, prompt_tokens: int) -> Any:
        for chunk in super()._sequence(request, cancel, prompt_tokens):
            yield msgspec.structs.replace(
                chunk, logprobs=tuple(msgspec.structs.replace(t, logprob=self.logprob) for t in chunk.logprobs)
            )


class RoutedWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.a = FullEngine("chat-a")
        self.a.full = False
        self.b = FullEngine("chat-b")
        self.b.full = False
        self.engines.update({"chat-a": self.a, "chat-b": self.b})
        self.manifests += [manifest("chat-a"), manifest("chat-b")]


@pytest.fixture
def routed() -> RoutedWorld:
    return RoutedWorld()


def _client(world: World, tmp_path: Path, routes: str = ROUTES, **env: str) -> Any:
    config = tmp_path / "appliance.toml"
    config.write_text(routes)
    return make_client(world, APPLIANCE_CONFIG=str(config), APPLIANCE_DATA_DIR=str(tmp_path),
                       APPLIANCE_METRICS_ACCESS="open", **env)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}


def _wait_ready(client: Any, *models: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cards = {c["id"]: c["status"] for c in client.get("/v1/models").json()["data"]}
        if all(cards.get(m) in ("ready", "failed") for m in models):
            return
        time.sleep(0.05)


def test_routes_are_listed_with_their_candidates(routed: RoutedWorld, tmp_path: Path) -> None:
    with _client(routed, tmp_path) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert cards["auto"]["kind"] == "route"
        assert cards["auto"]["candidates"] == ["chat-a", "chat-b"]
        assert cards["chat-model"]["kind"] == "chat" and "candidates" not in cards["chat-model"]
        assert client.get("/v1/models/auto").json()["candidates"] == ["chat-a", "chat-b"]


def test_the_first_candidate_serves_and_the_header_says_so(routed: RoutedWorld, tmp_path: Path) -> None:
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a"
        assert r.json()["model"] == "chat-a"
        assert r.json()["choices"][0]["message"]["content"] == "reply of chat-a"
        # A plain model id is not routed: no header.
        assert "x-route" not in client.post("/v1/chat/completions", json=_chat(model="chat-b")).headers
        # Completions route too.
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "say", "max_tokens": 3})
        assert (r.status_code, r.headers["x-route"], r.json()["model"]) == (200, "auto>chat-a", "chat-a")


def test_a_full_queue_moves_the_request_to_the_next_candidate(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.full = True
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b"
        assert r.json()["model"] == "chat-b"
        with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as s:
            assert s.headers["x-route"] == "auto>chat-a(queue_full)>chat-b"
            events = s.read().decode()
            assert '"model":"chat-b"' in events and "chat-b" in events
        text = client.get("/metrics").text
        assert 'appliance_route_hops_total{model="chat-a",outcome="queue_full",route="auto"} 2.0' in text
        assert 'appliance_route_hops_total{model="chat-b",outcome="served",route="auto"} 2.0' in text
        assert 'appliance_routed_requests_total{result="fallback",route="auto"} 2.0' in text
    db = connect(tmp_path / "gateway.db")
    rows = db.execute("SELECT model, outcome, route_path FROM usage WHERE route = 'POST /v1/chat/completions'").fetchall()
    assert [tuple(r) for r in rows] == [("chat-b", "ok", "auto>chat-a(queue_full)>chat-b")] * 2


def test_a_model_that_failed_to_load_is_passed_over(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.engines["chat-a"] = RuntimeError("the GGUF file is truncated")
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/chat/completions", json=_chat())
        assert (r.status_code, r.headers["x-route"]) == (200, "auto>chat-a(failed)>chat-b")


def test_a_model_loading_past_the_wait_is_passed_over(routed: RoutedWorld, tmp_path: Path) -> None:
    loaded = threading.Event()

    def slow(m: Any) -> Any:
        if m.id == "chat-a":
            loaded.wait(10)
        return RoutedWorld.factory(routed, m)

    routed.factory = slow  # type: ignore[method-assign]
    # chat-b first in the registry, so it loads before chat-a blocks the loader thread.
    routed.manifests = [m for m in routed.manifests if m.id != "chat-a"] + [manifest("chat-a")]
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-b")
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json=_chat())
        assert (r.status_code, r.headers["x-route"]) == (200, "auto>chat-a(loading)>chat-b")
        assert time.monotonic() - started < 5  # waited load_wait_s (0.3 s), not models.load_timeout_s
        loaded.set()


def test_when_every_candidate_fails_a_cached_answer_then_503(routed: RoutedWorld, tmp_path: Path) -> None:
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        body = _chat(temperature=0)
        assert client.post("/v1/chat/completions", json=body).headers["x-cache"] == "miss"
        routed.a.full = routed.b.full = True
        # The answer cached for chat-a is found at the first hop, as for any cached request.
        r = client.post("/v1/chat/completions", json=body)
        assert (r.headers["x-route"], r.headers["x-cache"]) == ("auto>chat-a", "hit")
        # A client that bypasses the cache still gets it rather than a 503, once every model failed.
        r = client.post("/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"})
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b(queue_full)>cache:chat-a"
        assert r.headers["x-cache"] == "hit"
        assert r.json()["choices"][0]["message"]["content"] == "reply of chat-a"
        # Nothing cached for this one: 503 in OpenAI's shape, with Retry-After and the path.
        r = client.post("/v1/chat/completions", json=_chat(temperature=0.7))
        assert r.status_code == 503
        assert r.headers["retry-after"] == "3"
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b(queue_full)"
        error = r.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("route_unavailable", "server_error", "model")
        assert "auto>chat-a(queue_full)>chat-b(queue_full)" in error["message"]
        assert 'appliance_routed_requests_total{result="unavailable",route="auto"} 1.0' in client.get("/metrics").text
    db = connect(tmp_path / "gateway.db")
    last = db.execute("SELECT model, status, outcome, route_path, prompt_tokens FROM usage ORDER BY seq DESC LIMIT 1").fetchone()
    assert tuple(last) == ("auto", 503, "error", "auto>chat-a(queue_full)>chat-b(queue_full)", 0)


def test_a_prompt_too_long_for_a_candidate_goes_to_one_it_fits(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.n_ctx, routed.b.n_ctx = 16, 64
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        words = " ".join(["word"] * 10)
        r = client.post("/v1/chat/completions", json=_chat(messages=[{"role": "user", "content": words}], max_tokens=8))
        assert (r.status_code, r.headers["x-route"]) == (200, "auto>chat-a(context)>chat-b")
        # Too long for every candidate: the caller's error (400), not a 503.
        words = " ".join(["word"] * 100)
        r = client.post("/v1/chat/completions", json=_chat(messages=[{"role": "user", "content": words}]))
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_rules_by_tenant_and_by_need(routed: RoutedWorld, tmp_path: Path) -> None:
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        r = client.post("/v1/chat/completions", json=_chat(tools=[tool]))
        assert r.headers["x-route"] == "auto>chat-b"
        admin = client.post("/v1/admin/tenants", json={"name": "vip"})
        assert admin.status_code == 201
        key = client.post("/v1/admin/keys", json={"tenant": "vip", "role": "admin"}).json()["key"]
        r = client.post("/v1/chat/completions", json=_chat(), headers={"Authorization": f"Bearer {key}"})
        assert r.headers["x-route"] == "auto>chat-b"


def test_a_tenant_sees_and_uses_only_its_allowed_candidates(routed: RoutedWorld, tmp_path: Path) -> None:
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        admin = client.post("/v1/admin/tenants", json={"name": "ops"})
        key = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}
        assert admin.status_code == 201
        assert client.post("/v1/admin/tenants", json={"name": "lim", "allowed_models": ["chat-b"]}, headers=auth).status_code == 201
        user = client.post("/v1/admin/keys", json={"tenant": "lim"}, headers=auth).json()["key"]
        lim = {"Authorization": f"Bearer {user}"}
        cards = {c["id"]: c for c in client.get("/v1/models", headers=lim).json()["data"]}
        assert cards["auto"]["candidates"] == ["chat-b"]
        assert client.post("/v1/chat/completions", json=_chat(), headers=lim).headers["x-route"] == "auto>chat-b"
        assert client.post("/v1/admin/tenants", json={"name": "none", "allowed_models": ["chat-model"]}, headers=auth).status_code == 201
        nobody = {"Authorization": f"Bearer {client.post('/v1/admin/keys', json={'tenant': 'none'}, headers=auth).json()['key']}"}
        assert "auto" not in {c["id"] for c in client.get("/v1/models", headers=nobody).json()["data"]}
        r = client.post("/v1/chat/completions", json=_chat(), headers=nobody)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


def test_an_unknown_candidate_stops_the_app_from_starting(routed: RoutedWorld, tmp_path: Path) -> None:
    from appliance.errors import SettingsError

    with pytest.raises(SettingsError, match="candidate 'missing'"):
        _client(routed, tmp_path, routes='[routing.auto]\ncandidates = ["chat-a", "missing"]\n')


CASCADE = """
[routing.auto]
candidates = ["chat-a", "chat-b"]
mode = "cascade"
cascade_min_logprob = -0.4
"""


def _usage_row(tmp_path: Path) -> tuple[Any, ...]:
    db = connect(tmp_path / "gateway.db")
    row = db.execute(
        "SELECT model, prompt_tokens, completion_tokens, route_path FROM usage"
        " WHERE route = 'POST /v1/chat/completions' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return tuple(row)


def test_cascade_asks_the_next_candidate_when_the_answer_is_doubtful(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.logprob, routed.b.logprob = -0.9, -0.2
    with _client(routed, tmp_path, routes=CASCADE) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a(low_confidence)>chat-b"
        body = r.json()
        assert body["model"] == "chat-b" and body["choices"][0]["message"]["content"] == "reply of chat-b"
        assert body["choices"][0]["logprobs"] is None  # computed for the judgement, not shown unasked
        assert body["usage"]["completion_tokens"] == 3
        # Both answers were computed: the record bills both (3 words each, a 1-word prompt each).
        assert _usage_row(tmp_path) == ("chat-b", 2, 6, "auto>chat-a(low_confidence)>chat-b")
        # A confident first answer stops there.
        routed.a.logprob = -0.1
        r = client.post("/v1/chat/completions", json=_chat(max_tokens=2))
        assert (r.headers["x-route"], r.json()["model"]) == ("auto>chat-a", "chat-a")


def test_cascade_returns_the_better_of_two_doubtful_answers(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.logprob, routed.b.logprob = -0.5, -0.9
    with _client(routed, tmp_path, routes=CASCADE) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/chat/completions", json=_chat())
        assert r.headers["x-route"] == "auto>chat-a>chat-b(worse)"
        assert r.json()["choices"][0]["message"]["content"] == "reply of chat-a"
        assert _usage_row(tmp_path) == ("chat-a", 2, 6, "auto>chat-a>chat-b(worse)")
        # The next candidate fails before any output: the answer set aside stands, billed alone.
        routed.b.full = True
        r = client.post("/v1/chat/completions", json=_chat(max_tokens=2))
        assert r.headers["x-route"] == "auto>chat-a>chat-b(queue_full)"
        assert r.json()["choices"][0]["message"]["content"] == "reply of"
        assert _usage_row(tmp_path) == ("chat-a", 1, 2, "auto>chat-a>chat-b(queue_full)")
        # A streamed answer cannot be taken back: cascade mode routes it like fallback mode.
        routed.b.full = False
        with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as stream:
            assert stream.headers["x-route"] == "auto>chat-a"


def test_a_grounded_chat_on_a_route_falls_to_the_next_candidate(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.full = True
    routed.b.reply = "Llamas eat grass and hay every day. [1]"
    with _client(routed, tmp_path, APPLIANCE_EMBEDDING_MODEL="embed-model") as client:
        _wait_ready(client, "chat-a", "chat-b", "embed-model")
        assert client.post("/v1/collections", json={"name": "docs"}).status_code == 201
        text = "Llamas live in the Andes. Llamas eat grass and hay every day."
        assert client.post("/v1/collections/docs/documents", json={"text": text, "id": "llamas"}).status_code == 200
        r = client.post("/v1/chat/completions", json=_chat(
            collection="docs", messages=[{"role": "user", "content": "What do llamas eat?"}], max_tokens=16,
        ))
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b"
        assert r.json()["model"] == "chat-b"
        assert r.json()["citations"]


def test_the_responses_api_takes_a_routed_model_id(routed: RoutedWorld, tmp_path: Path) -> None:
    routed.a.full = True
    with _client(routed, tmp_path) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/v1/responses", json={"model": "auto", "input": "hi"})
        assert r.status_code == 200, r.text
        assert (r.headers["x-route"], r.json()["model"]) == ("auto>chat-a(queue_full)>chat-b", "chat-b")
