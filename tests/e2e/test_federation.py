"""Federation on three real server processes on loopback.

node-a serves only the embedding model and lists node-b and node-c as peers (plus "impostor":
node-b's address with a wrong per-peer secret); node-b and node-c serve only gemma3-270m. Every
chat request to node-a is therefore forwarded. The tests run in order: forwarding and metering,
the wrong secret, the least-loaded choice, failover after node-b is killed, and a stream that
loses node-c mid-way.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import tomli_w
from openai import OpenAI

from appliance.peering.auth import sign
from appliance.types import Principal
from tests.e2e.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.e2e
MODEL = "gemma3-270m"
EMBEDDER = "all-minilm-l6-v2"
SECRET = "federation-test-secret-0123456789abcdef"
# Keeps a slot busy for many seconds: counting greedily does not stop before max_tokens.
LONG = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 900, "temperature": 0, "stream": True}


class Nodes:
    a: Server
    b: Server
    c: Server
    a_data: Path
    b_data: Path
    c_data: Path
    key: str
    key_id: str


def data_dir_with(models_from: Path, path: Path, *models: str) -> Path:
    (path / "models").mkdir(parents=True)
    for name in models:
        (path / "models" / name).symlink_to(models_from / "models" / name)
    return path


def config(path: Path, tree: dict) -> str:
    path.write_text(tomli_w.dumps(tree))
    return str(path)


def start_node(base: Path, data_dir: Path, name: str, models: tuple[str, ...], cluster: dict) -> tuple[Server, Path]:
    data = data_dir_with(data_dir, base / name, *models)
    toml = config(base / f"{name}.toml", {"models": {"parallel": 2, "n_ctx": 1024}, "cluster": {"node_name": name, **cluster}})
    # The shared secret comes from the environment, as the README recommends.
    return start_server(data, base / f"{name}.log", "--config", toml, env={"APPLIANCE_CLUSTER_SECRET": SECRET}), data


@pytest.fixture(scope="module")
def nodes(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("federation")
    n = Nodes()
    with ThreadPoolExecutor(2) as pool:
        b = pool.submit(start_node, base, data_dir, "node-b", (MODEL,), {})
        c = pool.submit(start_node, base, data_dir, "node-c", (MODEL,), {})
        (n.b, n.b_data), (n.c, n.c_data) = b.result(), c.result()
    peers = [
        {"name": "node-b", "url": n.b.url},
        {"name": "node-c", "url": n.c.url},
        {"name": "impostor", "url": n.b.url, "secret": "not-the-cluster-secret-but-long-enough!!"},
    ]
    cluster = {"peers": peers, "probe_interval_s": 0.5, "probe_timeout_s": 1.0, "down_after_failures": 3}
    n.a, n.a_data = start_node(base, data_dir, "node-a", (EMBEDDER,), cluster)
    try:
        wait_for(lambda: peer(n.a, "node-b")["state"] == peer(n.a, "node-c")["state"] == "up", "peers up")
        # Open mode until the first key: provision the caller's tenant and key on the node it talks to.
        assert httpx.post(f"{n.a.url}/v1/admin/tenants", json={"name": "team-a"}).status_code == 201
        r = httpx.post(f"{n.a.url}/v1/admin/keys", json={"tenant": "team-a"})
        assert r.status_code == 201, r.text
        n.key, n.key_id = r.json()["key"], r.json()["id"]
        yield n
    finally:
        for server in (n.a, n.b, n.c):
            stop_server(server)
    assert "Traceback" not in n.a.log.read_text(), "node-a logged an unexpected traceback"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def peer(server: Server, name: str) -> dict:
    return httpx.get(f"{server.url}/health", timeout=5).json()["cluster"]["peers"][name]


def client(n: Nodes) -> OpenAI:
    return OpenAI(base_url=f"{n.a.url}/v1", api_key=n.key, max_retries=0, timeout=120)


def usage(data: Path, where: str = "1") -> list[tuple]:
    with sqlite3.connect(data / "gateway.db") as db:
        return db.execute(f"SELECT tenant, key_id, outcome, peer, model, completion_tokens FROM usage WHERE {where}").fetchall()


@contextmanager
def busy(server: Server) -> Iterator[None]:
    """Hold one generation slot on `server` while the block runs (the stream is dropped after it)."""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: a dropped iterator would close the stream and free the slot
        next(lines)
        yield


def test_chat_for_a_model_only_peers_serve_is_forwarded_and_metered_on_both_sides(nodes: Nodes) -> None:
    oa = client(nodes)
    raw = oa.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0
    )
    served_by = raw.headers["x-appliance-served-by"]
    assert served_by in ("node-b", "node-c")
    reply = raw.parse()
    assert reply.model == MODEL and reply.usage.completion_tokens > 0

    stream = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    # Embeddings stay local: node-a serves that model itself.
    emb = oa.embeddings.with_raw_response.create(model=EMBEDDER, input=["hello"])
    assert "x-appliance-served-by" not in emb.headers and len(emb.parse().data[0].embedding) == 384

    # node-a records the forwards; the serving nodes meter the tokens for node-a's caller.
    forwarded = usage(nodes.a_data, "outcome = 'forwarded'")
    assert len(forwarded) == 2
    assert all(r[:3] == ("team-a", nodes.key_id, "forwarded") and r[3] in ("node-b", "node-c") for r in forwarded)
    assert all(r[4] == MODEL for r in forwarded)
    served = usage(nodes.b_data, "tenant = 'team-a'") + usage(nodes.c_data, "tenant = 'team-a'")
    assert len(served) == 2
    assert all(r[:4] == ("team-a", nodes.key_id, "ok", "node-a") and r[5] > 0 for r in served)


def test_models_can_be_listed_cluster_wide(nodes: Nodes) -> None:
    auth = {"Authorization": f"Bearer {nodes.key}"}
    plain = httpx.get(f"{nodes.a.url}/v1/models", headers=auth).json()["data"]
    assert [m["id"] for m in plain] == [EMBEDDER] and "location" not in plain[0]
    wide = {m["id"]: m for m in httpx.get(f"{nodes.a.url}/v1/models?scope=cluster", headers=auth).json()["data"]}
    assert wide[EMBEDDER]["location"] == ["node-a"]
    assert sorted(wide[MODEL]["location"]) == ["node-b", "node-c"] and wide[MODEL]["kind"] == "chat"


def test_ollama_requests_are_forwarded_too(nodes: Nodes) -> None:
    import ollama

    before = len(usage(nodes.a_data, "outcome = 'forwarded'"))
    oc = ollama.Client(host=nodes.a.url, headers={"Authorization": f"Bearer {nodes.key}"})
    # node-a does not serve this model: the request goes to a peer, `:latest` and all
    reply = oc.chat(model=f"{MODEL}:latest", messages=[{"role": "user", "content": "Say hello."}],
                    options={"num_predict": 4, "temperature": 0})
    assert reply.done and reply.eval_count and reply.message.content
    parts = list(oc.generate(model=MODEL, prompt="Paris is", stream=True, options={"num_predict": 4}))
    assert parts[-1].done and "".join(p.response for p in parts)
    with httpx.stream("POST", f"{nodes.a.url}/api/chat", headers={"Authorization": f"Bearer {nodes.key}"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 3}}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        assert resp.headers["x-appliance-served-by"] in ("node-b", "node-c")
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True
    # the embedder is node-a's own: served here
    assert len(oc.embed(model=EMBEDDER, input="hello").embeddings[0]) == 384
    forwarded = usage(nodes.a_data, "outcome = 'forwarded'")
    assert len(forwarded) == before + 3 and all(r[3] in ("node-b", "node-c") for r in forwarded[before:])


def test_a_wrong_cluster_secret_is_refused_and_that_peer_marked_unauthorised(nodes: Nodes) -> None:
    impostor = peer(nodes.a, "impostor")
    assert impostor["state"] == "unauthorised"
    assert "cluster signature" in impostor["last_error"]
    caller = Principal(tenant="team-a", key_id=None, role="admin")
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    json_type = {"content-type": "application/json"}
    for headers in (
        sign("w" * 40, node="node-a", method="POST", path="/v1/completions", principal=caller, body=body),
        sign(SECRET, node="node-a", method="POST", path="/v1/completions", principal=caller, body=body,
             now=time.time() - 300),
        sign(SECRET, node="node-a", method="POST", path="/v1/chat/completions", principal=caller, body=body),
        sign(SECRET, node="node-a", method="POST", path="/v1/completions", principal=caller, body=b"{}"),
    ):
        r = httpx.post(f"{nodes.b.url}/v1/completions", content=body, headers={**json_type, **headers})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    ok = sign(SECRET, node="node-a", method="POST", path="/v1/completions", principal=caller, body=body)
    r = httpx.post(f"{nodes.b.url}/v1/completions", content=body, headers={**json_type, **ok}, timeout=60)
    assert r.status_code == 200


def test_requests_go_to_the_least_loaded_peer(nodes: Nodes) -> None:
    oa = client(nodes)
    for target, other in ((nodes.b, "node-c"), (nodes.c, "node-b")):
        busy_name = "node-b" if target is nodes.b else "node-c"
        with busy(target):
            wait_for(lambda: peer(nodes.a, busy_name)["models"][MODEL]["busy_slots"] >= 1, f"{busy_name} busy")
            for _ in range(2):
                # node-a's view of the other peer must be idle again (a probe may have caught the last one).
                wait_for(lambda: peer(nodes.a, other)["models"][MODEL]["busy_slots"] == 0, f"{other} idle")
                raw = oa.completions.with_raw_response.create(model=MODEL, prompt="Paris is", max_tokens=3)
                assert raw.headers["x-appliance-served-by"] == other
        wait_for(lambda: peer(nodes.a, busy_name)["models"][MODEL]["busy_slots"] == 0, f"{busy_name} idle")


def test_a_killed_peer_is_failed_over_then_marked_down(nodes: Nodes) -> None:
    oa = client(nodes)
    with busy(nodes.c):
        # node-c is busier, so node-a still prefers node-b when it dies; nothing was sent yet: retried.
        wait_for(lambda: peer(nodes.a, "node-c")["models"][MODEL]["busy_slots"] >= 1, "node-c busy")
        failures_before = peer(nodes.a, "node-b")["forward_failures"]
        nodes.b.proc.kill()
        nodes.b.proc.wait()
        raw = oa.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert raw.headers["x-appliance-served-by"] == "node-c"
        assert raw.parse().choices[0].message.content is not None
        assert peer(nodes.a, "node-b")["forward_failures"] > failures_before
    wait_for(lambda: peer(nodes.a, "node-b")["state"] == "down", "node-b marked down", timeout=10)
    health = httpx.get(f"{nodes.a.url}/health").json()
    assert health["status"] == "ok"  # a peer that is down does not make this node unhealthy


def test_a_stream_that_loses_its_peer_ends_with_an_error_event(nodes: Nodes) -> None:
    events: list[str] = []
    body = {**LONG, "max_tokens": 400}
    auth = {"Authorization": f"Bearer {nodes.key}"}
    killed = threading.Event()
    with httpx.stream("POST", f"{nodes.a.url}/v1/completions", json=body, headers=auth, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["x-appliance-served-by"] == "node-c"
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 3 and not killed.is_set():
                nodes.c.proc.kill()
                killed.set()
    assert killed.is_set()
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "peer_unavailable" and error["type"] == "server_error" and error["message"]
    assert all("choices" in json.loads(e) for e in events[:-1])  # whole events only, none cut in half
    wait_for(lambda: peer(nodes.a, "node-c")["state"] == "down", "node-c marked down", timeout=10)
    r = httpx.post(f"{nodes.a.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, headers=auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "peer_unavailable"
    assert "retry-after" in r.headers

