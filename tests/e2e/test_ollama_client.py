"""The official `ollama` client, and raw NDJSON, against the real server process and the bundled models."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import ollama
import pytest
from openai import OpenAI

from appliance.modelstore.catalog import catalog_manifests
from tests.e2e.conftest import Server

GREEDY_PROMPT = "The capital of France is"
# Gemma 3 270M Q4_K_M, greedy, 20 tokens: the same text test_openai_client.py pins for /v1/completions.
GREEDY_TEXT = " the capital of the country of France. It is the largest city in France. It is the capital"
COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture
def ol(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def test_list_and_show(ol: ollama.Client) -> None:
    listed = {m.model: m for m in ol.list().models}
    # classifiers (the injection guards) are not Ollama models: only what generate, chat or embed can use
    assert set(listed) == {"gemma3-270m:latest", "smollm2-135m:latest", "all-minilm-l6-v2:latest"}
    digests = {m.id: m.file.sha256 for m in catalog_manifests()}
    gemma = listed["gemma3-270m:latest"]
    assert gemma.digest == digests["gemma3-270m"] and gemma.size == 253113024
    assert gemma.details is not None
    assert (gemma.details.format, gemma.details.family) == ("gguf", "gemma3")
    assert (gemma.details.quantization_level, gemma.details.parameter_size) == ("Q4_K_M", "270M")
    assert listed["all-minilm-l6-v2:latest"].details.format == "onnx"  # type: ignore[union-attr]
    shown = ol.show("gemma3")
    assert shown.capabilities == ["completion", "tools"]
    assert "<start_of_turn>" in (shown.template or "")
    assert shown.modelinfo is not None and shown.modelinfo["gemma3.context_length"] == 4096
    assert ol.show("minilm:latest").capabilities == ["embedding"]
    running = {m.model for m in ol.ps().models}
    assert "gemma3-270m:latest" in running


def test_raw_generate_is_the_same_greedy_text_as_v1(ol: ollama.Client) -> None:
    r = ol.generate(model="gemma3-270m", prompt=GREEDY_PROMPT, raw=True, options={"temperature": 0, "num_predict": 20})
    assert r.response == GREEDY_TEXT
    assert r.done and r.done_reason == "length"
    assert (r.prompt_eval_count, r.eval_count) == (6, 20)
    for name in COUNTERS:
        assert isinstance(r[name], int) and r[name] > 0, name


def test_generate_goes_through_the_chat_template(ol: ollama.Client, client: OpenAI) -> None:
    r = ol.generate(model="gemma3:latest", prompt="What is the capital of Italy?", options=GREEDY)
    same = client.chat.completions.create(
        model="gemma3", messages=[{"role": "user", "content": "What is the capital of Italy?"}], max_tokens=24, temperature=0
    )
    assert r.response == same.choices[0].message.content
    assert "<end_of_turn>" not in r.response


def test_chat_stream_equals_non_stream(ol: ollama.Client) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of Italy?"}]
    # Streamed first: the non-streamed twin may then come from the response cache (temperature 0).
    parts = list(ol.chat(model="gemma3", messages=messages, options=GREEDY, stream=True))
    full = ol.chat(model="gemma3", messages=messages, options=GREEDY)
    text = "".join(p.message.content or "" for p in parts)
    assert text and text == full.message.content
    assert full.message.role == "assistant"
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == full.eval_count and parts[-1].prompt_eval_count == full.prompt_eval_count
    assert parts[-1].done_reason == full.done_reason
    assert len(parts) > 3  # it really streamed


def test_format_json_and_schema(ol: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    messages = [{"role": "user", "content": "Give the largest city of France and its population as JSON."}]
    r = ol.chat(model="gemma3", messages=messages, format=schema, options={"temperature": 0, "num_predict": 60})
    data = json.loads(r.message.content or "")
    assert set(data) == {"city", "population"} and isinstance(data["population"], int)
    r = ol.generate(model="gemma3", prompt="A JSON object describing a cat:", format="json", options={"temperature": 0, "num_predict": 120})
    assert r.response.startswith("{")  # the grammar opens an object; a small model may not close it in time
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)


def test_embed_and_embeddings(ol: ollama.Client, client: OpenAI) -> None:
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly tax filing deadlines."]
    r = ol.embed(model="all-minilm-l6-v2", input=texts)
    v = np.array(r.embeddings)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert r.prompt_eval_count and r.prompt_eval_count > 0
    openai_vectors = [d.embedding for d in client.embeddings.create(model="all-minilm-l6-v2", input=texts).data]
    assert np.allclose(v, openai_vectors, atol=1e-6)  # one service behind both APIs
    single = ol.embed(model="minilm", input=texts[0]).embeddings
    assert np.allclose(single[0], v[0], atol=1e-5)
    old = ol.embeddings(model="minilm:latest", prompt=texts[0]).embedding
    assert np.allclose(old, v[0], atol=1e-5)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_answer_is_whole_text_or_calls_and_results_go_back(ol: ollama.Client) -> None:
    ask = [{"role": "user", "content": "What is the weather in Tokyo? Use the get_weather tool."}]
    r = ol.chat(model="gemma3", messages=ask, tools=[WEATHER], options={"temperature": 0, "num_predict": 40})
    # Ollama has no tool_choice: the 270M base model picks; whichever it picks, the shape is whole
    calls = r.message.tool_calls or []
    assert bool(calls) != bool(r.message.content)
    for call in calls:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    assert "<tool_call>" not in (r.message.content or "")
    history = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "Sunny, 21 degrees Celsius", "tool_name": "get_weather"},
    ]
    answer = ol.chat(model="gemma3", messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 80})
    assert answer.done and answer.prompt_eval_count and answer.prompt_eval_count > 40  # the call and result reached it
    # a call cut off by num_predict is dropped (as on /v1); otherwise there is text or a whole call
    assert answer.done_reason == "length" or answer.message.content or answer.message.tool_calls


def test_errors_in_ollamas_shape(ol: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        ol.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert 'model "llama3.2" not found' in info.value.error and "appliance models import" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        ol.chat(model="gemma3", messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG\r\n\x1a\n"]}])
    assert info.value.status_code == 400 and "Images are not supported" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        ol.embed(model="gemma3", input="a chat model cannot embed")
    assert info.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as info:
        ol.pull("llama3.2")
    assert info.value.status_code == 404 and "appliance models import" in info.value.error
    assert ol.pull("gemma3").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        ol.delete("gemma3")
    assert "appliance models remove gemma3-270m" in info.value.error


def test_raw_ndjson_lines_and_counters(server: Server) -> None:
    body = {"model": "gemma3", "messages": [{"role": "user", "content": "Name a colour."}], "options": GREEDY}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [line for line in r.iter_lines() if line]
    objects = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objects) and len(objects) > 2
    assert all(o["done"] is False and o["message"]["role"] == "assistant" for o in objects[:-1])
    final = objects[-1]
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    for name in COUNTERS:
        assert isinstance(final[name], int) and final[name] > 0, name
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["created_at"].endswith("Z")
    one = httpx.post(f"{server.url}/api/generate", json={"model": "gemma3", "prompt": "Hi", "stream": False, "options": GREEDY}, timeout=120)
    assert one.headers["content-type"].startswith("application/json"), one.text
    assert one.json().get("done") is True, one.text


def test_keep_alive_zero_unloads_and_the_next_request_reloads(ol: ollama.Client, server: Server) -> None:
    assert ol.embed(model="minilm", input="x", keep_alive=0).embeddings
    deadline = time.monotonic() + 10
    while "all-minilm-l6-v2:latest" in {m.model for m in ol.ps().models} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "all-minilm-l6-v2:latest" not in {m.model for m in ol.ps().models}
    assert httpx.get(f"{server.url}/health").json()["models"]["all-minilm-l6-v2"]["state"] == "unloaded"
    assert len(ol.embed(model="minilm", input="x", keep_alive="5m").embeddings[0]) == 384  # loads it again
    [entry] = [m for m in ol.ps().models if m.model == "all-minilm-l6-v2:latest"]
    assert entry.expires_at is not None
    ol.embed(model="minilm", input="x", keep_alive=-1)  # forever: the deadline goes
    [entry] = [m for m in ol.ps().models if m.model == "all-minilm-l6-v2:latest"]
    assert entry.expires_at is None
