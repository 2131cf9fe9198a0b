"""answer_mode on ask through the real server, the bundled MiniLM and the bundled Gemma 3 270M base model."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import Server

MANUAL = (
    "The pump is painted blue and weighs 40 kilograms. The mechanical seal must be replaced every 4000 operating "
    "hours. Bearings are greased with lithium grease once a month. The warranty lasts two years from delivery."
)


@pytest.fixture
def col(server: Server) -> str:
    name = "answer-modes"
    httpx.delete(f"{server.url}/v1/collections/{name}")
    assert httpx.post(f"{server.url}/v1/collections", json={"name": name}).status_code == 201
    base = f"{server.url}/v1/collections/{name}/documents"
    assert httpx.post(base, json={"id": "pump", "title": "Pump manual", "text": MANUAL}, timeout=60).status_code == 200
    assert httpx.post(base, json={"id": "pool", "title": "Pool", "text": "The swimming pool closes at 8 pm every day."},
                      timeout=60).status_code == 200
    return name


def ask(server: Server, col: str, **body: object) -> dict:
    r = httpx.post(f"{server.url}/v1/collections/{col}/ask", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_extractive_answers_are_source_sentences_with_citations(server: Server, col: str) -> None:
    body = ask(server, col, question="How often must the mechanical seal be replaced?", answer_mode="extractive")
    assert body["answer_mode"] == "extractive" and body["grounded"] is True
    assert "The mechanical seal must be replaced every 4000 operating hours. [1]" in body["answer"]
    assert body["sources"][0]["document_id"] == "pump"
    assert all(c["supported"] and c["quote"] in MANUAL for c in body["citations"])
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}  # no generation


def test_auto_extracts_with_the_base_model_and_generative_still_generates(server: Server, col: str) -> None:
    auto = ask(server, col, question="What grease do the bearings use?", answer_mode="auto")
    assert auto["model"] == "gemma3-270m" and auto["answer_mode"] == "extractive"
    assert "lithium grease" in auto["answer"] and auto["grounded"] is True
    generated = ask(server, col, question="What grease do the bearings use?", answer_mode="generative", max_tokens=24)
    assert generated["answer_mode"] == "generative" and generated["usage"]["completion_tokens"] > 0


def test_streamed_extractive_answer_and_bad_mode(server: Server, col: str) -> None:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/collections/{col}/ask",
                      json={"question": "How long is the warranty?", "answer_mode": "extractive", "stream": True},
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert [e["type"] for e in events] == ["sources", "delta", "done"]
    assert events[1]["text"] == events[2]["answer"] and "two years" in events[2]["answer"]
    assert events[2]["answer_mode"] == "extractive" and events[2]["grounded"] is True
    # Nothing relevant: the same refusal as generative answers, no sentence picked at random.
    nothing = ask(server, col, question="What is the airspeed velocity of an unladen swallow?", answer_mode="extractive")
    assert nothing["sources"] == [] and "enough information" in nothing["answer"]
    r = httpx.post(f"{server.url}/v1/collections/{col}/ask", json={"question": "x", "answer_mode": "poetic"})
    assert r.status_code == 400 and "answer_mode" in r.text
