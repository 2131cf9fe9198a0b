"""/v1/responses through the real ASGI app with the fake chat engine."""

from __future__ import annotations

import json

from tests.api.conftest import World, make_client


def test_text_in_text_out(world: World) -> None:
    with make_client(world) as client:
        resp = client.post("/v1/responses", json={"model": "chat-model", "input": "hi", "instructions": "Be brief."})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0] == {"text": "Hello from the fake engine.", "annotations": [], "type": "output_text"}
    assert body["usage"]["output_tokens"] == 5 and body["instructions"] == "Be brief."
    prompt = world.chat.requests[-1].prompt
    assert "<system>Be brief.</system>" in prompt and "<user>hi</user>" in prompt


def test_message_list_input_and_max_output_tokens(world: World) -> None:
    with make_client(world) as client:
        resp = client.post("/v1/responses", json={"model": "chat-model", "max_output_tokens": 2, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "answer"}]},
            {"type": "message", "role": "user", "content": "second"},
        ]})
    body = resp.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert "<assistant>answer</assistant><user>second</user>" in world.chat.requests[-1].prompt


def test_streamed_events(world: World) -> None:
    with make_client(world) as client:
        resp = client.post("/v1/responses", json={"model": "chat-model", "input": "hi", "stream": True})
    lines = resp.text.split("\n\n")
    events = [json.loads(block.split("data: ", 1)[1]) for block in lines if "data: " in block]
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello from the fake engine." == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert all(block.startswith("event: ") for block in lines if block.strip())


def test_unsupported_fields_are_400(world: World) -> None:
    with make_client(world) as client:
        prev = client.post("/v1/responses", json={"model": "chat-model", "input": "hi", "previous_response_id": "resp_1"})
        assert prev.status_code == 400 and prev.json()["error"]["param"] == "previous_response_id"
        tools = client.post("/v1/responses", json={"model": "chat-model", "input": "hi", "tools": [{"type": "web_search"}]})
        assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
        empty = client.post("/v1/responses", json={"model": "chat-model", "input": []})
        assert empty.status_code == 400
        missing = client.post("/v1/responses", json={"model": "nope", "input": "hi"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
