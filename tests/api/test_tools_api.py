"""Tool calling through the real ASGI app, with a fake engine that answers with calls."""

from __future__ import annotations

import json

from tests.api.conftest import World, make_client
from tests.unit.test_tools import ADD

CALLS = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> <tool_call>{"name": "add", "arguments": {"a": 5, "b": 6}}</tool_call>'


def _world(world: World, reply: str) -> World:
    world.chat.reply = reply
    world.chat.n_ctx = 4096  # the fallback preamble lists the tools
    return world


def _body(**kw: object) -> dict:
    return {"model": "chat-model", "messages": [{"role": "user", "content": "1+2?"}], "tools": [ADD], **kw}


def test_calls_come_back_as_tool_calls(world: World) -> None:
    with make_client(_world(world, CALLS)) as client:
        resp = client.post("/v1/chat/completions", json=_body())
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "add", {"a": 1, "b": 2}), ("function", "add", {"a": 5, "b": 6})]
    sent = world.chat.requests[-1]
    assert sent.tools is not None and sent.json_schema is None and not sent.tools.required
    # the fallback format reached the prompt: Gemma-like templates know no tools
    assert '"name": "add"' in sent.prompt and "<tool_call>" in sent.prompt


def test_streamed_calls_are_tool_call_deltas(world: World) -> None:
    with make_client(_world(world, CALLS)) as client:
        resp = client.post("/v1/chat/completions", json=_body(stream=True))
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 1] and all(c["id"].startswith("call_") for c in calls)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}, {"a": 5, "b": 6}]
    assert not any(d.get("content") for d in deltas)  # no markup leaks as text
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_answer_stays_text(world: World) -> None:
    with make_client(_world(world, "No tool needed: it is 3.")) as client:
        resp = client.post("/v1/chat/completions", json=_body())
    choice = resp.json()["choices"][0]
    assert choice["message"] == {"content": "No tool needed: it is 3.", "role": "assistant"}
    assert choice["finish_reason"] == "stop"


def test_tool_history_round_trip(world: World) -> None:
    _world(world, "The sum is 3.")
    history = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "3"},
    ]
    with make_client(world) as client:
        resp = client.post("/v1/chat/completions", json=_body(messages=history))
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "The sum is 3."
    prompt = world.chat.requests[-1].prompt
    assert '<tool_response name="add">\n3\n</tool_response>' in prompt


def test_bad_tool_requests_are_400(world: World) -> None:
    with make_client(_world(world, "ok")) as client:
        missing = client.post("/v1/chat/completions", json=_body(tool_choice={"type": "function", "function": {"name": "nope"}}))
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "tool_choice"
        bad = client.post("/v1/chat/completions", json=_body(tools=[{"type": "function", "function": {"name": "a b"}}]))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools[0].function.name"
        assert client.post("/v1/chat/completions", json=_body(tools="nope")).status_code == 400
        # the server keeps serving
        assert client.post("/v1/chat/completions", json=_body(tool_choice="none")).status_code == 200
