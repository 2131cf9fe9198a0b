"""Ollama's API (/api/*) through the real ASGI app with fake engines: shapes, conversion, errors, gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.engines.registry import ModelRegistry
from appliance.storage.sqlite import connect
from tests.api.conftest import World, make_client
from tests.fakes import FakeChatEngine, manifest

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "stream": False}
COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


@pytest.fixture
def world() -> World:
    """The API tests' world; the chat model knows its trained context (num_ctx is checked against it)."""
    w = World()
    w.manifests[0] = manifest("chat-model", aliases=["chat-alias"], stop=["</assistant>"], context_length=4096)
    return w


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with make_client(world) as c:
        yield c


def assert_error(resp, status: int, *words: str) -> str:  # type: ignore[no-untyped-def]
    """Ollama's error shape: one key, a message string."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


def ndjson(text: str) -> list[dict]:
    lines = [line for line in text.split("\n") if line]
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objects)
    return objects


def assert_final(obj: dict, reason: str) -> None:
    assert obj["done"] is True and obj["done_reason"] == reason
    for name in COUNTERS:
        assert isinstance(obj[name], int) and obj[name] > 0, (name, obj)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _keys(client: TestClient, **tenant: object) -> tuple[str, str]:
    """An admin key (tenant ops) and a user key of tenant team-a (with `tenant` settings)."""
    assert client.post("/v1/admin/tenants", json={"name": "ops"}).status_code == 201
    admin = client.post("/v1/admin/keys", json={"tenant": "ops", "role": "admin"}).json()["key"]
    r = client.post("/v1/admin/tenants", json={"name": "team-a", **tenant}, headers=_bearer(admin))
    assert r.status_code == 201, r.text
    user = client.post("/v1/admin/keys", json={"tenant": "team-a"}, headers=_bearer(admin)).json()["key"]
    return admin, user


# -- listing and showing ---------------------------------------------------------------------------


def test_version_tags_ps_and_show(client: TestClient) -> None:
    version = client.get("/api/version").json()
    assert version["version"].count(".") == 2 and version["appliance"]
    models = client.get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == ["chat-model:latest", "embed-model:latest", "base-model:latest"]
    first = models[0]
    assert first["model"] == first["name"] and first["digest"] == "0" * 64 and first["size"] == 1
    assert first["modified_at"].endswith("Z") and first["details"]["format"] == "gguf"
    assert set(first["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    running = client.get("/api/ps").json()["models"]
    assert {m["name"] for m in running} == {"chat-model:latest", "embed-model:latest", "base-model:latest"}
    assert all("expires_at" not in m for m in running)  # no keep_alive asked for: they stay loaded
    for name in ("chat-model", "chat-model:latest", "chat-alias"):
        shown = client.post("/api/show", json={"model": name})
        assert shown.status_code == 200, shown.text
        assert shown.json()["capabilities"] == ["completion", "tools"]
    show = client.post("/api/show", json={"name": "chat-model"}).json()  # older clients send `name`
    assert "<assistant>" in show["template"] and "FROM chat-model" in show["modelfile"]
    assert 'stop                           "</assistant>"' in show["parameters"]
    assert show["aliases"] == ["chat-alias"] and show["model_info"]["gguf.context_length"] == 4096
    assert client.post("/api/show", json={"model": "embed-model"}).json()["capabilities"] == ["embedding"]
    assert_error(client.post("/api/show", json={"model": "nope"}), 404, 'model "nope" not found', "appliance models import")
    assert_error(client.post("/api/show", json={}), 400, "model is required")


def test_details_come_from_the_file_name_when_it_says() -> None:
    import msgspec

    from appliance.modelstore.manifest import ModelFile
    from appliance.api.ollama_models import model_details

    m = manifest("gemma3-270m", architecture="gemma3")
    m = msgspec.structs.replace(m, file=ModelFile(name="gemma-3-270m-q4_k_m.gguf", sha256="1" * 64, size=10))
    d = model_details(m)
    assert (d.family, d.families, d.parameter_size, d.quantization_level) == ("gemma3", ["gemma3"], "270M", "Q4_K_M")
    assert model_details(manifest("all-minilm-l6-v2", kind="embedding")).quantization_level == ""


# -- chat and generate -----------------------------------------------------------------------------


def test_chat_streams_ndjson_by_default_and_ends_with_counters(client: TestClient) -> None:
    with client.stream("POST", "/api/chat", json={**CHAT, "stream": None} | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(r.read().decode())
    parts, final = lines[:-1], lines[-1]
    assert "".join(p["message"]["content"] for p in parts) == "Hello from the fake engine."
    assert all(p["done"] is False and p["message"]["role"] == "assistant" and p["model"] == "chat-model" for p in parts)
    assert final["message"] == {"role": "assistant", "content": ""}
    assert_final(final, "stop")
    assert final["eval_count"] == 5 and final["prompt_eval_count"] == 1
    body = {k: v for k, v in CHAT.items() if k != "stream"}  # no `stream`: streamed, as Ollama does
    assert len(ndjson(client.post("/api/chat", json=body).text)) == 6


def test_chat_options_reach_the_engine_converted_once(client: TestClient, world: World) -> None:
    options = {
        "num_predict": 3, "temperature": 0.3, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "seed": 42, "stop": ["zzz"],
        "num_ctx": 2048, "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "num_gpu": 99, "mirostat": 0,  # Ollama options with no meaning here are ignored
    }
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/api/chat", json={"model": "chat-alias:latest", "messages": messages, "stream": False, "options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "chat-alias:latest"  # the name as asked for, as Ollama answers
    assert body["message"] == {"role": "assistant", "content": "Hello from the"}
    assert_final(body, "length")
    seen = world.chat.requests[-1]
    assert seen.prompt == "<system>Be brief.</system><user>Hi</user><assistant>"
    assert seen.max_tokens == 3 and seen.stop == ("zzz", "</assistant>")
    s = seen.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (0.3, 7, 0.5, 0.1, 42)
    assert (s.repeat_penalty, s.presence_penalty, s.frequency_penalty) == (1.3, 0.5, -0.5)
    # -1 means no limit; a negative seed means a random one; unset knobs keep the model's defaults
    client.post("/api/chat", json={**CHAT, "options": {"num_predict": -1, "seed": -1}})
    seen = world.chat.requests[-1]
    assert seen.max_tokens is None and seen.sampling.seed is None and seen.sampling.top_k == 40


def test_bad_options_are_400_naming_the_option(client: TestClient) -> None:
    r = client.post("/api/chat", json={**CHAT, "options": {"num_ctx": 100000}})
    assert_error(r, 400, "num_ctx", "4096")
    assert_error(client.post("/api/chat", json={**CHAT, "options": {"temperature": 9}}), 400, "options.temperature")
    assert_error(client.post("/api/chat", json={**CHAT, "options": {"num_predict": 0}}), 400, "num_predict")
    assert_error(client.post("/api/chat", json={**CHAT, "keep_alive": "soon"}), 400, "keep_alive")
    assert_error(client.post("/api/chat", json={**CHAT, "messages": [{"role": "robot", "content": "x"}]}), 400, "role")
    assert_error(client.post("/api/chat", content=b"{not json"), 400, "not valid JSON")
    assert_error(client.post("/api/chat", json={**CHAT, "think": True}), 400, "thinking")


def test_format_json_and_schema_take_the_grammar_path(client: TestClient, world: World) -> None:
    client.post("/api/chat", json={**CHAT, "format": "json"})
    assert world.chat.requests[-1].json_schema == "{}"
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    client.post("/api/generate", json={"model": "chat-model", "prompt": "age?", "format": schema, "stream": False})
    assert json.loads(world.chat.requests[-1].json_schema) == schema
    client.post("/api/chat", json={**CHAT, "format": ""})
    assert world.chat.requests[-1].json_schema is None
    assert_error(client.post("/api/chat", json={**CHAT, "format": "yaml"}), 400, "format")
    r = client.post("/api/generate", json={"model": "chat-model", "prompt": "x", "raw": True, "format": "json"})
    assert_error(r, 400, "raw=false")


def test_generate_templates_unless_raw(client: TestClient, world: World) -> None:
    r = client.post("/api/generate", json={"model": "chat-model", "prompt": "Hi", "system": "Be brief.", "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"] == "Hello from the fake engine." and body["model"] == "chat-model"
    assert_final(body, "stop")
    assert world.chat.requests[-1].prompt == "<system>Be brief.</system><user>Hi</user><assistant>"
    r = client.post("/api/generate", json={"model": "chat-model", "prompt": "<user>Hi</user>", "raw": True, "stream": False,
                                           "options": {"num_predict": 2}})
    assert r.json()["response"] == "Hello from"
    assert world.chat.requests[-1].prompt == "<user>Hi</user>" and world.chat.requests[-1].max_tokens == 2
    # A model without a chat template gets the prompt itself (system in front), unlimited unless num_predict.
    with client.stream("POST", "/api/generate", json={"model": "base-model", "prompt": "Once", "system": "Story."}) as s:
        lines = ndjson(s.read().decode())
    assert "".join(x["response"] for x in lines) == "base reply"
    assert_final(lines[-1], "stop")
    assert world.engines["base-model"].requests[-1].prompt == "Story.\n\nOnce"
    assert world.engines["base-model"].requests[-1].max_tokens is None


def test_what_cannot_be_honoured_is_refused_with_400(client: TestClient, world: World) -> None:
    image = "iVBORw0KGgo="
    r = client.post("/api/chat", json={**CHAT, "messages": [{"role": "user", "content": "what?", "images": [image]}]})
    assert_error(r, 400, "Images are not supported")
    r = client.post("/api/generate", json={"model": "chat-model", "prompt": "what?", "images": [image]})
    assert_error(r, 400, "Images are not supported")
    assert_error(client.post("/api/generate", json={"model": "chat-model", "prompt": "x", "template": "{{ .Prompt }}"}), 400, "raw=true")
    assert_error(client.post("/api/generate", json={"model": "chat-model", "prompt": "x", "context": [1, 2]}), 400, "context")
    assert_error(client.post("/api/generate", json={"model": "base-model", "prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_error(client.post("/api/chat", json={**CHAT, "model": "embed-model"}), 400, "embedding model")
    assert_error(client.post("/api/chat", json={**CHAT, "model": "nope:latest"}), 404, 'model "nope:latest" not found', "--id nope")
    assert world.chat.requests == []


def test_a_failure_mid_stream_ends_with_an_error_line(client: TestClient, world: World) -> None:
    world.chat.fail_after = 2
    with client.stream("POST", "/api/chat", json={**CHAT, "stream": True}) as r:
        lines = ndjson(r.read().decode())
    assert [x["message"]["content"] for x in lines[:-1]] == ["Hello", " from"]
    assert set(lines[-1]) == {"error"} and "secret" not in lines[-1]["error"]


def test_deterministic_answers_are_cached_like_v1(client: TestClient, world: World) -> None:
    body = {**CHAT, "options": {"temperature": 0}}
    first, second = client.post("/api/chat", json=body), client.post("/api/chat", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json()["message"] == second.json()["message"] and len(world.chat.requests) == 1
    assert client.post("/api/chat", json={**body, "options": {"temperature": 0, "top_k": 3}}).headers["x-cache"] == "miss"


# -- tools -----------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Tokyo"}}</tool_call>'


def test_tools_pass_through_and_calls_come_back_in_ollamas_shape(client: TestClient, world: World) -> None:
    world.chat.reply, world.chat.n_ctx = CALL, 4096
    body = {**CHAT, "messages": [{"role": "user", "content": "Weather in Tokyo?"}], "tools": [WEATHER]}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    message = r.json()["message"]
    assert message == {"content": "", "role": "assistant",
                       "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]}
    sent = world.chat.requests[-1]
    assert sent.tools is not None and '"const":"get_weather"' in sent.tools.call_schema
    with client.stream("POST", "/api/chat", json={**body, "stream": True}) as s:
        lines = ndjson(s.read().decode())
    assert [x["message"].get("tool_calls") for x in lines[:-1]] == [message["tool_calls"]]
    assert "<tool_call>" not in "".join(x["message"]["content"] for x in lines)
    assert_final(lines[-1], "stop")
    # the call and its result go back in the history, Ollama's way (arguments an object, tool_name)
    world.chat.reply = "It is sunny."
    history = [
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": message["tool_calls"]},
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    r = client.post("/api/chat", json={**body, "messages": history})
    assert r.json()["message"] == {"content": "It is sunny.", "role": "assistant"}
    prompt = world.chat.requests[-1].prompt
    assert '"arguments": {"city": "Tokyo"}' in prompt and "sunny, 21 C" in prompt
    bad = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "array"}}}
    assert_error(client.post("/api/chat", json={**body, "tools": [bad]}), 400, "type object")


def test_tool_history_converts_to_openais_shape() -> None:
    from appliance.protocol.ollama import Message, ToolCall, ToolCallFunction, openai_messages

    calls = [ToolCall(function=ToolCallFunction(name="f", arguments={"x": 1})),
             ToolCall(function=ToolCallFunction(name="f", arguments={"x": 2}))]
    out = openai_messages([
        Message(role="assistant", tool_calls=calls),
        Message(role="tool", content="one", tool_name="f"),
        Message(role="tool", content="two", tool_name="f"),
    ])
    assert out[0]["content"] is None and [c["function"]["arguments"] for c in out[0]["tool_calls"]] == ['{"x":1}', '{"x":2}']
    assert [(m["tool_call_id"], m["name"]) for m in out[1:]] == [("call_0_0", "f"), ("call_0_1", "f")]


# -- embeddings ------------------------------------------------------------------------------------


def test_embed_and_the_older_embeddings(client: TestClient, world: World) -> None:
    r = client.post("/api/embed", json={"model": "embed-model:latest", "input": "a b c"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "embed-model:latest" and body["embeddings"] == [[1.0, 0.0, 0.0, 0.0]]
    assert body["prompt_eval_count"] == 3 and body["total_duration"] > 0 and body["load_duration"] > 0
    assert len(client.post("/api/embed", json={"model": "embed-model", "input": ["a", "b"]}).json()["embeddings"]) == 2
    assert client.post("/api/embed", json={"model": "embed-model", "input": []}).json()["embeddings"] == []
    assert client.post("/api/embeddings", json={"model": "embed-model", "prompt": "a b"}).json() == {"embedding": [1.0, 0.0, 0.0, 0.0]}
    assert client.post("/api/embeddings", json={"model": "embed-model", "prompt": ""}).json() == {"embedding": []}
    assert world.embed.calls == [["a b c"], ["a", "b"], ["a b"]]
    assert_error(client.post("/api/embed", json={"model": "embed-model", "input": "x", "dimensions": 3}), 400, "dimensions")
    assert_error(client.post("/api/embed", json={"model": "chat-model", "input": "x"}), 400, "chat model")
    assert_error(client.post("/api/embeddings", json={"model": "nope", "prompt": "x"}), 404, "not found")


# -- keep_alive ------------------------------------------------------------------------------------


def test_keep_alive_zero_unloads_and_the_next_request_loads_again(client: TestClient, world: World) -> None:
    r = client.post("/api/chat", json={"model": "chat-model", "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["done"] is True
    assert world.chat.closed.wait(30)
    assert "chat-model:latest" not in {m["name"] for m in client.get("/api/ps").json()["models"]}
    world.engines["chat-model"] = fresh = FakeChatEngine("chat-model")
    r = client.post("/api/generate", json={"model": "chat-model", "prompt": "hi", "stream": False, "keep_alive": "0s"})
    assert r.json()["response"] == "Hello from the fake engine."
    assert fresh.closed.wait(30)  # unloaded once the answer was complete
    r = client.post("/api/chat", json={"model": "chat-model", "messages": []})  # no prompt: only loads
    assert r.json()["done_reason"] == "load"
    for path, nothing in (("/api/chat", {"messages": None}), ("/api/generate", {"prompt": None}), ("/api/embed", {"input": None})):
        r = client.post(path, json={"model": "chat-model" if "embed" not in path else "embed-model", **nothing})
        assert r.status_code == 200 and r.json().get("done_reason", "load") == "load", r.text
    assert client.get("/health").json()["models"]["chat-model"]["loads"] == 3


def test_keep_alive_durations_set_and_clear_the_deadline(client: TestClient, world: World) -> None:
    client.post("/api/chat", json={**CHAT, "keep_alive": "10m"})
    [entry] = [m for m in client.get("/api/ps").json()["models"] if m["name"] == "chat-model:latest"]
    assert 590 < _unix(entry["expires_at"]) - time.time() <= 600
    client.post("/api/chat", json={**CHAT, "keep_alive": -1})
    [entry] = [m for m in client.get("/api/ps").json()["models"] if m["name"] == "chat-model:latest"]
    assert "expires_at" not in entry
    client.post("/api/embed", json={"model": "embed-model", "input": "x", "keep_alive": 0.2})
    assert world.embed.closed.wait(30)


def _unix(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_keep_alive_parsing() -> None:
    from appliance.errors import InvalidRequest
    from appliance.protocol.ollama import keep_alive_seconds

    assert keep_alive_seconds(None) is None
    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds("300ms") == pytest.approx(0.3) and keep_alive_seconds("2.5s") == 2.5
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("0") == 0 and keep_alive_seconds(30) == 30
    assert keep_alive_seconds(-1) == float("inf") and keep_alive_seconds("-1m") == float("inf")
    assert keep_alive_seconds("-1") == float("inf")
    assert keep_alive_seconds(1e300) == float("inf") and keep_alive_seconds("99999999999h") == float("inf")
    for bad in ("", "5 minutes", "m", "5x", "1h-3m"):
        with pytest.raises(InvalidRequest):
            keep_alive_seconds(bad)


def test_registry_unload_refuses_a_model_in_use(world: World) -> None:
    registry = ModelRegistry(world.manifests, world.factory, load_timeout_s=5)
    chat = world.manifests[0]

    async def scenario() -> None:
        assert registry.unload(chat) is False  # not loaded yet
        lease = await registry.acquire(chat)
        assert registry.unload(chat) is False  # in use
        lease.release()
        assert registry.unload(chat) is True
        assert registry.status()["chat-model"]["state"] == "unloaded"
        assert world.chat.closed.wait(30)
        world.engines["chat-model"] = FakeChatEngine("chat-model")
        async with registry.use(chat) as engine:
            assert engine is world.engines["chat-model"]
        assert registry.status()["chat-model"]["loads"] == 2 and registry.status()["chat-model"]["unloads"] == 1

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


# -- model management ------------------------------------------------------------------------------


def test_pull_push_create_copy_delete_say_how_to_do_it_offline(client: TestClient) -> None:
    assert ndjson(client.post("/api/pull", json={"model": "chat-model"}).text) == [{"status": "success"}]
    assert client.post("/api/pull", json={"model": "chat-model:latest", "stream": False}).json() == {"status": "success"}
    assert_error(client.post("/api/pull", json={"model": "llama3.2"}), 404, "appliance models import", "--id llama3.2")
    assert_error(client.post("/api/push", json={"model": "me/chat-model"}), 400, "not supported")
    assert_error(client.post("/api/create", json={"model": "mario", "from": "chat-model"}), 400, "appliance models import")
    r = client.post("/api/copy", json={"source": "chat-model", "destination": "backup"})
    assert_error(r, 400, "--alias backup")
    assert_error(client.post("/api/copy", json={"source": "nope", "destination": "x"}), 404, "not found")
    assert_error(client.request("DELETE", "/api/delete", json={"model": "chat-model"}), 400, "appliance models remove chat-model")
    assert_error(client.request("DELETE", "/api/delete", json={"model": "nope"}), 404, "not found")


# -- the gateway -----------------------------------------------------------------------------------


def test_ollama_routes_need_a_key_once_keys_exist_and_are_metered(world: World, tmp_path: Path) -> None:
    with make_client(world, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        _, user = _keys(client)
        for method, path in (("GET", "/api/version"), ("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/chat")):
            refused = client.request(method, path, json=CHAT)
            # the gateway's own refusals take Ollama's shape on Ollama's routes
            assert refused.status_code == 401 and isinstance(refused.json()["error"], str), path
        assert isinstance(client.get("/v1/models").json()["error"], dict)  # OpenAI's shape stays on /v1
        assert client.get("/api/version", headers=_bearer(user)).status_code == 200
        assert client.post("/api/chat", json=CHAT, headers=_bearer(user)).status_code == 200
        with client.stream("POST", "/api/generate", json={"model": "chat-model", "prompt": "hi"}, headers=_bearer(user)) as r:
            r.read()
        client.post("/api/embed", json={"model": "embed-model", "input": ["a b", "c"]}, headers=_bearer(user))
        client.post("/api/chat", json={**CHAT, "model": "nope"}, headers=_bearer(user))
    rows = connect(tmp_path / "gateway.db").execute(
        "SELECT route, status, model, prompt_tokens, completion_tokens, embedding_tokens FROM usage "
        "WHERE tenant = 'team-a' AND route LIKE 'POST /api/%' ORDER BY seq"
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        ("POST /api/chat", 200, "chat-model", 1, 5, 0),
        ("POST /api/generate", 200, "chat-model", 1, 5, 0),
        ("POST /api/embed", 200, "embed-model", 0, 0, 3),
        ("POST /api/chat", 404, None, 0, 0, 0),
    ]


def test_a_tenants_allow_list_and_guardrails_apply(world: World) -> None:
    world.chat.reply = "Write to jane.doe@example.com today."
    with make_client(world) as client:
        admin, _ = _keys(client)
        auth = _bearer(admin)
        client.post("/v1/admin/tenants", json={"name": "narrow", "allowed_models": ["base-model"]}, headers=auth)
        narrow = client.post("/v1/admin/keys", json={"tenant": "narrow"}, headers=auth).json()["key"]
        models = client.get("/api/tags", headers=_bearer(narrow)).json()["models"]
        assert [m["name"] for m in models] == ["base-model:latest"]
        assert_error(client.post("/api/chat", json=CHAT, headers=_bearer(narrow)), 404, 'model "chat-model" not found')
        assert_error(client.post("/api/show", json={"model": "chat-model"}, headers=_bearer(narrow)), 404)
        client.post("/v1/admin/tenants", json={"name": "guarded", "guardrails": {"pii_output": "mask"}}, headers=auth)
        guarded = client.post("/v1/admin/keys", json={"tenant": "guarded"}, headers=auth).json()["key"]
        body = client.post("/api/chat", json=CHAT, headers=_bearer(guarded)).json()
        assert body["message"]["content"] == "Write to [EMAIL_1] today."
        assert {"stage": "output", "kind": "email", "action": "mask", "count": 1, "rules": []} in body["guardrails"]
        with client.stream("POST", "/api/chat", json={**CHAT, "stream": True}, headers=_bearer(guarded)) as r:
            lines = ndjson(r.read().decode())
        assert "jane.doe" not in "".join(x["message"]["content"] for x in lines)
        assert lines[-1]["guardrails"]


def test_the_openapi_description_has_the_ollama_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    chat = doc["paths"]["/api/chat"]["post"]
    assert chat["tags"] == ["Ollama"] and "application/x-ndjson" in chat["responses"]["200"]["content"]
    assert "ChatRequest" in json.dumps(chat["requestBody"]) and "/api/version" in doc["paths"]
