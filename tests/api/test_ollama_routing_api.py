"""Routed model ids and LoRA adapters on Ollama's API (/api/*), through the real ASGI app with fake engines:
the same ladder, split, shadow, X-Route header and usage route_path as /v1."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from appliance.storage.sqlite import connect
from tests.api.conftest import World
from tests.api.test_ollama_api import assert_error, assert_final, ndjson
from tests.api.test_routing_api import RoutedWorld, _client, _wait_ready
from tests.fakes import FakeChatEngine, manifest

ROUTES = """
[routing.auto]
candidates = ["chat-a", "chat-b"]
load_wait_s = 0.3

[routing.tuned]
candidates = ["chat-model:tone", "chat-b"]

[routing.canary]
split = [{model = "chat-a", weight = 1, name = "stable"}, {model = "chat-b", weight = 1, name = "new"}]
sticky = "conversation"

[routing.trial]
candidates = ["chat-a"]
shadow = {model = "chat-b", share = 1.0}
"""
ASK = [{"role": "user", "content": "hi"}]


def _world() -> RoutedWorld:
    world = RoutedWorld()
    world.manifests.append(manifest("tone", kind="adapter", base="chat-model"))
    return world


def _usage(tmp_path: Path, route: str) -> list[tuple[Any, ...]]:
    db = connect(tmp_path / "gateway.db")
    rows = db.execute("SELECT model, status, route_path, variant FROM usage WHERE route = ? ORDER BY seq", (route,))
    return [tuple(r) for r in rows.fetchall()]


def test_chat_and_generate_on_a_route_walk_its_ladder(tmp_path: Path) -> None:
    world = _world()
    world.a.full = True
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/api/chat", json={"model": "auto", "messages": ASK, "stream": False})
        assert r.status_code == 200, r.text
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b"
        body = r.json()
        assert body["model"] == "chat-b" and body["message"]["content"] == "reply of chat-b"
        assert_final(body, "stop")
        # Streamed, with the implicit tag: the same path; the lines are Ollama's NDJSON.
        r = client.post("/api/chat", json={"model": "auto:latest", "messages": ASK})
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b"
        lines = ndjson(r.text)
        assert "".join(line["message"]["content"] for line in lines) == "reply of chat-b"
        assert_final(lines[-1], "stop")
        # /api/generate: through the template, and raw (a text completion on the route)
        for raw in (False, True):
            r = client.post("/api/generate", json={"model": "auto", "prompt": "say", "raw": raw, "stream": False})
            assert r.status_code == 200, r.text
            assert r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b" and r.json()["response"] == "reply of chat-b"
        assert world.b.requests[-1].prompt == "say"  # raw: the prompt as it is
        # A plain model id is not routed: no header, the name as sent.
        r = client.post("/api/chat", json={"model": "chat-b:latest", "messages": ASK, "stream": False})
        assert "x-route" not in r.headers and r.json()["model"] == "chat-b:latest"
        metrics = client.get("/metrics").text
        assert 'appliance_route_hops_total{model="chat-a",outcome="queue_full",route="auto"} 4.0' in metrics
    assert _usage(tmp_path, "POST /api/chat")[:2] == [("chat-b", 200, "auto>chat-a(queue_full)>chat-b", None)] * 2
    assert [row[2] for row in _usage(tmp_path, "POST /api/generate")] == ["auto>chat-a(queue_full)>chat-b"] * 2


def test_every_candidate_full_is_503_with_retry_after_in_ollamas_shape(tmp_path: Path) -> None:
    world = _world()
    world.a.full = world.b.full = True
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        r = client.post("/api/chat", json={"model": "auto", "messages": ASK, "stream": False})
        assert_error(r, 503, "auto>chat-a(queue_full)>chat-b(queue_full)")
        assert r.headers["retry-after"] == "3" and r.headers["x-route"] == "auto>chat-a(queue_full)>chat-b(queue_full)"
        world.a.full = world.b.full = False
        assert client.post("/api/chat", json={"model": "auto", "messages": ASK, "stream": False}).status_code == 200
    assert _usage(tmp_path, "POST /api/chat")[0] == ("auto", 503, "auto>chat-a(queue_full)>chat-b(queue_full)", None)


def test_split_variant_and_shadow_work_on_ollama_routes(tmp_path: Path) -> None:
    world = _world()
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        seen = {}
        for i in range(12):
            messages = [{"role": "user", "content": f"question {i}"}]
            r = client.post("/api/chat", json={"model": "canary", "messages": messages, "stream": False})
            assert r.status_code == 200, r.text
            variant = r.headers["x-route-variant"]
            assert variant in ("stable", "new")
            assert r.json()["model"] == {"stable": "chat-a", "new": "chat-b"}[variant]
            seen[variant] = True
            # sticky by conversation: the same opening lands on the same variant
            again = client.post("/api/chat", json={"model": "canary", "messages": messages, "stream": False})
            assert again.headers["x-route-variant"] == variant
        assert set(seen) == {"stable", "new"}
        r = client.post("/api/generate", json={"model": "trial", "prompt": "shadow me", "stream": False})
        assert r.status_code == 200 and r.headers["x-route"] == "trial>chat-a"
        deadline = time.monotonic() + 5
        db = connect(tmp_path / "gateway.db")
        while time.monotonic() < deadline:
            row = db.execute("SELECT model, served_model, outcome, output, served_output FROM shadow").fetchone()
            if row is not None:
                break
            time.sleep(0.05)
    assert tuple(row) == ("chat-b", "chat-a", "ok", "reply of chat-b", "reply of chat-a")
    variants = {row[3] for row in _usage(tmp_path, "POST /api/chat")}
    assert variants == {"stable", "new"}


def test_tags_show_and_the_allow_list_know_routes_and_adapters(tmp_path: Path) -> None:
    world = _world()
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        tags = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
        for route in ("auto", "tuned", "canary", "trial"):
            assert tags[f"{route}:latest"]["details"]["format"] == "route" and tags[f"{route}:latest"]["size"] == 0
        assert tags["chat-model:tone"]["details"]["parent_model"] == "chat-model"
        assert "tone:latest" not in tags and "tone" not in tags
        shown = client.post("/api/show", json={"model": "auto:latest"}).json()
        assert shown["model_info"]["route.candidates"] == ["chat-a", "chat-b"]
        assert shown["capabilities"] == ["completion", "tools"] and shown["details"]["format"] == "route"
        assert "candidate chat-b" in shown["modelfile"]
        assert client.post("/api/show", json={"model": "chat-model:tone"}).status_code == 200

        # A tenant allowed only chat-b sees routes through chat-b only, and cannot reach chat-a through one.
        admin = client.post("/v1/admin/keys", json={"tenant": "default", "role": "admin"})
        auth = {"Authorization": f"Bearer {admin.json()['key']}"}
        assert client.post("/v1/admin/tenants", json={"name": "narrow", "allowed_models": ["chat-b"]},
                           headers=auth).status_code == 201
        user = {"Authorization": "Bearer " + client.post(
            "/v1/admin/keys", json={"tenant": "narrow"}, headers=auth).json()["key"]}
        names = {m["name"] for m in client.get("/api/tags", headers=user).json()["models"]}
        assert names == {"chat-b:latest", "auto:latest", "tuned:latest", "canary:latest"}
        assert client.post("/api/show", json={"model": "auto"}, headers=user).json()["model_info"][
            "route.candidates"] == ["chat-b"]
        r = client.post("/api/chat", json={"model": "auto", "messages": ASK, "stream": False}, headers=user)
        assert r.status_code == 200 and r.headers["x-route"] == "auto>chat-b"
        assert_error(client.post("/api/chat", json={"model": "trial", "messages": ASK}, headers=user), 404,
                     'model "trial" not found')
        assert_error(client.post("/api/show", json={"model": "trial"}, headers=user), 404, 'model "trial" not found')


def test_an_adapter_is_reached_by_its_ollama_name_and_on_a_route(tmp_path: Path) -> None:
    world = _world()
    with _client(world, tmp_path, ROUTES) as client:
        _wait_ready(client, "chat-a", "chat-b")
        for name in ("chat-model:tone", "chat-model:tone:latest"):
            r = client.post("/api/chat", json={"model": name, "messages": ASK, "stream": False, "keep_alive": "1h"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name and world.chat.requests[-1].adapter.id == "tone"
        ps = {m["name"]: m for m in client.get("/api/ps").json()["models"]}
        assert ps["chat-model:latest"]["expires_at"]  # the adapter's keep_alive is its base model's
        # keep_alive 0 on the adapter unloads the base model's engine
        r = client.post("/api/generate", json={"model": "chat-model:tone", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"
        assert world.chat.closed.wait(30)
        assert "chat-model:latest" not in {m["name"] for m in client.get("/api/ps").json()["models"]}
        world.engines["chat-model"] = world.chat = FakeChatEngine("chat-model")
        # the plain model and `:latest` are not taken for adapters
        r = client.post("/api/chat", json={"model": "chat-model:latest", "messages": ASK, "stream": False})
        assert r.status_code == 200 and world.chat.requests[-1].adapter is None
        assert_error(client.post("/api/chat", json={"model": "chat-model:nope", "messages": ASK}), 404, "chat-model:nope")
        # a route whose first candidate is an adapter
        r = client.post("/api/chat", json={"model": "tuned", "messages": ASK, "stream": False})
        assert r.status_code == 200 and r.headers["x-route"] == "tuned>chat-model:tone"
        assert r.json()["model"] == "chat-model:tone" and world.chat.requests[-1].adapter.id == "tone"
        line = json.loads(client.post("/api/chat", json={"model": "tuned", "messages": []}).text.splitlines()[-1])
        assert line["done_reason"] == "load"
