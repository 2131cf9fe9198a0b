"""One slot, a queue of one: cancellation frees the slot, overflow gets 503 + Retry-After."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server

LONG = {"model": "gemma3-270m", "prompt": "List every number:", "max_tokens": 3000, "temperature": 0.8}


@pytest.fixture(scope="module")
def tight(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("tight")
    srv = start_server(
        fresh_data_dir(data_dir, base / "data"),
        base / "server.log",
        env={"APPLIANCE_PARALLEL": "1", "APPLIANCE_MAX_QUEUE": "1"},
    )
    yield srv
    stop_server(srv)


def engine_stats(server: Server) -> dict:
    return httpx.get(f"{server.url}/health").json()["models"]["gemma3-270m"]["engine"]


def test_client_disconnect_frees_the_only_slot(tight: Server) -> None:
    with httpx.stream("POST", f"{tight.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as resp:
        got = [line for line, _ in zip(resp.iter_lines(), range(6)) if line.startswith("data: ")]
        assert got
    # With one slot, this request can only run once the abandoned 3000-token generation is gone.
    started = time.monotonic()
    client = tight.client()
    resp = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert time.monotonic() - started < 20
    assert engine_stats(tight)["cancelled"] >= 1
    assert engine_stats(tight)["busy_slots"] == 0


def test_overflow_gets_503_with_retry_after(tight: Server) -> None:
    body = {**LONG, "max_tokens": 200}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{tight.url}/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and 503 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    assert engine_stats(tight)["rejected"]["queue_full"] >= 1
    # ...and the server keeps serving.
    ok = tight.client().completions.create(model="gemma3-270m", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_openai_client_sees_overload_as_a_retryable_error(tight: Server) -> None:
    client = tight.client()

    def call(_: int) -> str:
        try:
            client.completions.create(**{**LONG, "max_tokens": 150})
            return "ok"
        except openai.InternalServerError as exc:
            return str(exc.status_code)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert "503" in results and "ok" in results
