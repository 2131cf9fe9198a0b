"""Cluster peers as route candidates, and routed ids on Ollama's API: two real server processes on loopback.

node-a serves smollm2-135m with one slot and a queue of one; node-b serves smollm2-135m and gemma3-270m.
node-a's routes: `auto` (smollm2, then gemma, which only node-b has), `remote` (gemma first) and `ghost`
(a name no node serves, then smollm2). The tests run in order; the last one stops node-b.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import pytest
import tomli_w
from openai import OpenAI

from tests.e2e.conftest import Server, start_server, stop_server
from tests.e2e.test_federation import data_dir_with, peer, wait_for
from tests.e2e.test_routing import Occupied, chat_models  # noqa: F401  (chat_models: a fixture)

pytestmark = pytest.mark.e2e
SECRET = "routing-peers-test-secret-0123456789abcdef"
ASK = [{"role": "user", "content": "Name a colour."}]
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


class Pair:
    a: Server
    b: Server
    a_data: Path
    b_data: Path


def _start(base: Path, models_from: Path, name: str, models: tuple[str, ...], tree: dict) -> tuple[Server, Path]:
    data = data_dir_with(models_from, base / name, *models)
    config = base / f"{name}.toml"
    config.write_text(tomli_w.dumps(tree))
    server = start_server(data, base / f"{name}.log", "--config", str(config), env={"APPLIANCE_CLUSTER_SECRET": SECRET})
    return server, data


@pytest.fixture(scope="module")
def pair(chat_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:  # noqa: F811
    base = tmp_path_factory.mktemp("routing-peers")
    p = Pair()
    p.b, p.b_data = _start(base, chat_models, "node-b", (SMOL, GEMMA),
                           {"models": {"parallel": 2, "n_ctx": 1024}, "cluster": {"node_name": "node-b"}})
    try:
        p.a, p.a_data = _start(base, chat_models, "node-a", (SMOL,), {
            "models": {"parallel": 1, "max_queue": 1, "n_ctx": 1024},
            "cluster": {"node_name": "node-a", "peers": [{"name": "node-b", "url": p.b.url}],
                        "probe_interval_s": 0.5, "probe_timeout_s": 1.0, "down_after_failures": 2},
            "routing": {
                "auto": {"candidates": [SMOL, GEMMA], "cached_fallback": False},
                "remote": {"candidates": [GEMMA, SMOL]},
                "ghost": {"candidates": ["nowhere", SMOL]},
            },
        })
    except BaseException:
        stop_server(p.b)
        raise
    try:
        wait_for(lambda: peer(p.a, "node-b")["state"] == "up", "node-b up")
        # node-b's models are ready before the tests time anything
        for model in (SMOL, GEMMA):
            assert httpx.post(f"{p.b.url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1},
                              timeout=120).status_code == 200
        yield p
    finally:
        stop_server(p.a)
        stop_server(p.b)
    assert "Traceback" not in p.a.log.read_text(), "node-a logged an unexpected traceback"


def _client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _usage(data: Path, where: str) -> list[tuple]:
    with sqlite3.connect(data / "gateway.db") as db:
        return db.execute(f"SELECT model, outcome, peer, route_path, route FROM usage WHERE {where} ORDER BY seq").fetchall()


def test_a_candidate_only_a_peer_serves_is_forwarded_with_its_hop_visible(pair: Pair) -> None:
    raw = _client(pair.a).chat.completions.with_raw_response.create(model="remote", messages=ASK, max_tokens=8,
                                                                     temperature=0)
    assert raw.headers["x-route"] == f"remote>{GEMMA}@node-b"
    assert raw.headers["x-appliance-served-by"] == "node-b"
    reply = raw.parse()
    assert reply.model == GEMMA and reply.choices[0].message.content and reply.usage.completion_tokens > 0
    # streamed: the same path, the peer's events relayed
    with _client(pair.a).chat.completions.with_streaming_response.create(
        model="remote", messages=ASK, max_tokens=6, stream=True
    ) as stream:
        assert stream.headers["x-route"] == f"remote>{GEMMA}@node-b"
        chunks = list(stream.parse())
    assert {c.model for c in chunks} == {GEMMA} and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rows = _usage(pair.a_data, "route_path LIKE 'remote>%'")
    assert rows == [(GEMMA, "forwarded", "node-b", f"remote>{GEMMA}@node-b", "POST /v1/chat/completions")] * 2
    # node-b metered the tokens, as forwarded by node-a (under the candidate's name)
    served = _usage(pair.b_data, f"peer = 'node-a' AND model = '{GEMMA}'")
    assert len(served) == 2 and all(r[1] == "ok" for r in served)
    metrics = httpx.get(f"{pair.a.url}/metrics").text
    assert f'appliance_route_hops_total{{model="{GEMMA}@node-b",outcome="served",route="remote"}} 2.0' in metrics


def test_a_name_no_peer_serves_is_passed_over_as_unknown(pair: Pair) -> None:
    raw = _client(pair.a).chat.completions.with_raw_response.create(model="ghost", messages=ASK, max_tokens=4)
    assert raw.headers["x-route"] == f"ghost>nowhere(unknown)>{SMOL}"
    assert raw.parse().model == SMOL and "x-appliance-served-by" not in raw.headers


def test_a_saturated_local_model_goes_to_the_peer_serving_it_before_the_next_candidate(pair: Pair) -> None:
    hold = Occupied(pair.a, SMOL)
    try:
        raw = _client(pair.a).chat.completions.with_raw_response.create(model="auto", messages=ASK, max_tokens=8)
        path = f"auto>{SMOL}(queue_full)>{SMOL}@node-b"
        assert raw.headers["x-route"] == path and raw.headers["x-appliance-served-by"] == "node-b"
        assert raw.parse().model == SMOL
        # Ollama's /api/chat on the route: the same ladder, the peer's NDJSON relayed line by line
        with httpx.stream("POST", f"{pair.a.url}/api/chat", timeout=120, json={
            "model": "auto", "messages": ASK, "options": {"num_predict": 4}}) as resp:
            assert resp.status_code == 200 and resp.headers["x-route"] == path
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in resp.iter_lines() if line]
        assert lines[-1]["done"] is True and lines[-1]["model"] == SMOL
        # and through the official ollama client
        reply = ollama.Client(host=pair.a.url, timeout=120).generate(model="auto:latest", prompt="Paris is",
                                                                      options={"num_predict": 4})
        assert reply.done and reply.model == SMOL and reply.response
    finally:
        hold.release()
    rows = _usage(pair.a_data, "route_path LIKE 'auto>%'")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(SMOL, "forwarded", "node-b", path)] * 3
    assert [r[4] for r in rows] == ["POST /v1/chat/completions", "POST /api/chat", "POST /api/generate"]


def test_the_ollama_client_lists_shows_and_uses_routes(pair: Pair) -> None:
    oc = ollama.Client(host=pair.a.url, timeout=120)
    listed = {m.model: m for m in oc.list().models}
    assert {"auto:latest", "remote:latest", "ghost:latest", f"{SMOL}:latest"} <= set(listed)
    assert listed["auto:latest"].details.format == "route"  # type: ignore[union-attr]
    shown = oc.show("remote")
    assert shown.modelinfo["route.candidates"] == [SMOL] and shown.modelinfo["route.peer_candidates"] == [GEMMA]
    reply = oc.chat(model="auto", messages=ASK, options={"num_predict": 6, "temperature": 0})
    assert reply.done and reply.model == SMOL and reply.message.content and reply.eval_count
    parts = list(oc.chat(model="auto", messages=ASK, stream=True, options={"num_predict": 4}))
    assert parts[-1].done and parts[-1].model == SMOL
    resp = httpx.post(f"{pair.a.url}/api/generate", json={"model": "auto", "prompt": "hi", "stream": False,
                                                          "options": {"num_predict": 2}}, timeout=120)
    assert resp.headers["x-route"] == f"auto>{SMOL}" and "x-appliance-served-by" not in resp.headers
    with pytest.raises(ollama.ResponseError) as caught:
        oc.chat(model="no-such-route", messages=ASK)
    assert caught.value.status_code == 404


def test_a_peer_that_is_down_is_passed_over(pair: Pair) -> None:
    stop_server(pair.b)
    wait_for(lambda: peer(pair.a, "node-b")["state"] == "down", "node-b down")
    raw = _client(pair.a).chat.completions.with_raw_response.create(model="remote", messages=ASK, max_tokens=4)
    assert raw.headers["x-route"] == f"remote>{GEMMA}@node-b(peer_unavailable)>{SMOL}"
    assert raw.parse().model == SMOL
    hold = Occupied(pair.a, SMOL)
    try:
        resp = httpx.post(f"{pair.a.url}/api/chat", timeout=60, json={
            "model": "auto", "messages": ASK, "stream": False, "options": {"temperature": 0.7}})
    finally:
        hold.release()
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert resp.headers["x-route"] == f"auto>{SMOL}(queue_full)>{GEMMA}@node-b(peer_unavailable)"
    assert "auto>" in resp.json()["error"]
