"""The real ASGI app with fake engines: wire shapes, conversion, and every error path."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from litestar.testing import TestClient

from tests.api.conftest import World, make_client


def assert_error(resp, status: int, type_: str, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


def test_models_list_and_get(client: TestClient) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["chat-model", "embed-model", "base-model"]
    assert data["data"][0]["object"] == "model"
    assert client.get("/v1/models/chat-alias").json()["id"] == "chat-model"
    assert_error(client.get("/v1/models/nope"), 404, "invalid_request_error", "model_not_found")


def test_chat_completion_converts_request_once(client: TestClient, world: World) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "chat-alias",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
            ],
            "max_tokens": 3,
            "temperature": 0,
            "seed": 7,
            "stop": "zzz",
            "some_future_field": {"ignored": True},
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "chat-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    seen = world.chat.requests[-1]
    assert seen.prompt == "<system>Be brief.</system><user>Hi!</user><assistant>"
    assert seen.max_tokens == 3
    assert seen.sampling.temperature == 0
    assert seen.sampling.seed == 7
    assert seen.stop == ("zzz", "</assistant>")


def test_chat_stream_shape_and_usage(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "chat-model",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello from the fake engine."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_stream_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "chat-model", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
    )
    chunks = [json.loads(e) for e in sse_events(resp.text)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


def test_text_completion_and_echo(client: TestClient, world: World) -> None:
    resp = client.post("/v1/completions", json={"model": "base-model", "prompt": "Once", "echo": True})
    body = resp.json()
    assert resp.status_code == 200, resp.text
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Oncebase reply"
    assert world.engines["base-model"].requests[-1].prompt == "Once"


def test_text_completion_stream(client: TestClient) -> None:
    resp = client.post(
        "/v1/completions",
        json={"model": "chat-model", "prompt": ["Once"], "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello from the fake engine."
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_chat_on_completion_only_model_is_refused(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "base-model", "messages": [{"role": "user", "content": "x"}]})
    assert_error(resp, 400, "invalid_request_error", "model_not_supported", "model")


def test_embeddings_float_and_base64(client: TestClient, world: World) -> None:
    resp = client.post("/v1/embeddings", json={"model": "embed-model", "input": ["a b", "c"]})
    body = resp.json()
    assert resp.status_code == 200, resp.text
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == [1.0, 0.0, 0.0, 0.0]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    resp = client.post("/v1/embeddings", json={"model": "embed-model", "input": "x", "encoding_format": "base64"})
    raw = base64.b64decode(resp.json()["data"][0]["embedding"])
    assert struct.unpack("<4f", raw) == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/chat/completions", {"model": "chat-model"}, None),
        ("/v1/chat/completions", {"model": "chat-model", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),  # above the documented maximum of 8
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
        ("/v1/chat/completions", {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "seed": 2**70}, "seed"),
        ("/v1/completions", {"model": "chat-model", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "chat-model", "prompt": [1, 2, 3]}, "prompt[0]"),
        ("/v1/embeddings", {"model": "embed-model", "input": ""}, "input"),
        ("/v1/embeddings", {"model": "embed-model", "input": []}, "input"),
        ("/v1/embeddings", {"model": "embed-model", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"model": "embed-model", "input": "x", "dimensions": 3}, "dimensions"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(client: TestClient, path: str, payload: dict, param: str | None) -> None:
    assert_error(client.post(path, json=payload), 400, "invalid_request_error", param=param)
    # ...and the server keeps serving.
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1,2]", b"\xff\xfe", b'{"model": "chat-model", "messages": [}'])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(resp, 400, "invalid_request_error")


def test_unknown_model_is_404_model_not_found(client: TestClient) -> None:
    for path, payload in [
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
        ("/v1/embeddings", {"model": "gpt-4", "input": "x"}),
    ]:
        assert_error(client.post(path, json=payload), 404, "invalid_request_error", "model_not_found", "model")


def test_embedding_model_on_chat_route_is_400(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "embed-model", "messages": [{"role": "user", "content": "x"}]})
    assert_error(resp, 400, "invalid_request_error", "model_not_supported")


def test_context_length_exceeded(client: TestClient) -> None:
    long = "word " * 100
    resp = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": [{"role": "user", "content": long}]})
    assert_error(resp, 400, "invalid_request_error", "context_length_exceeded")
    resp = client.post("/v1/completions", json={"model": "chat-model", "prompt": long, "stream": True})
    assert_error(resp, 400, "invalid_request_error", "context_length_exceeded")


def test_body_over_limit_is_413(world: World) -> None:
    with make_client(world, APPLIANCE_MAX_BODY_BYTES="2048") as client:
        resp = client.post("/v1/completions", json={"model": "chat-model", "prompt": "x" * 5000})
        assert_error(resp, 413, "invalid_request_error", "payload_too_large")
        assert client.post("/v1/completions", json={"model": "chat-model", "prompt": "ok"}).status_code == 200


def test_engine_failure_is_500_without_details_and_server_survives(client: TestClient, world: World) -> None:
    world.chat.fail_after = 0
    resp = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": [{"role": "user", "content": "x"}]})
    err = assert_error(resp, 500, "server_error")
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert err["code"] == "engine_error"
    world.chat.fail_after = None
    ok = client.post("/v1/chat/completions", json={"model": "chat-model", "messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200


def test_engine_failure_mid_stream_ends_with_error_event(client: TestClient, world: World) -> None:
    world.chat.fail_after = 2
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    events = sse_events(resp.text)
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error"
    assert "secret" not in resp.text


def test_unknown_route_and_method_are_openai_shaped(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404, "invalid_request_error")
    assert_error(client.get("/v1/chat/completions"), 405, "invalid_request_error")


def test_health_and_version(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"
    assert set(resp.json()["models"]) == {"chat-model", "embed-model", "base-model"}
    assert client.get("/version").json()["version"]
