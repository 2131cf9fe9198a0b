"""Several models in bounded memory (`models.max_memory`), through the real ASGI app with fake engines.

Each fake model is "100 MB"; the limit decides how many fit at once.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litestar.testing import TestClient

from appliance.api.app import create_app
from appliance.engines.memory import MemoryEstimate
from appliance.engines.registry import ModelRegistry
from appliance.modelstore.manifest import Manifest
from appliance.settings import load_settings
from tests.fakes import FakeChatEngine, FakeEmbeddingEngine, manifest

MB = 1_000_000
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "Hi"}]}
EMBED = {"model": "embed-model", "input": "x"}
COMPLETE = {"model": "base-model", "prompt": "x"}


class Loader:
    """Builds a fresh fake engine at every load (a reload is a new engine) and remembers each one."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.engines: dict[str, list[Any]] = {}
        self.reply_delay_s = 0.0

    def __call__(self, m: Manifest) -> Any:
        engine: Any
        if m.kind == "embedding":
            engine = FakeEmbeddingEngine(m.id)
        else:
            engine = FakeChatEngine(m.id, reply="one two three four five six seven eight nine ten")
            engine.delay_s = self.reply_delay_s
        self.loads.append(m.id)
        self.engines.setdefault(m.id, []).append(engine)
        return engine

    def latest(self, model_id: str) -> Any:
        return self.engines[model_id][-1]


MANIFESTS = [
    manifest("chat-model", stop=["</assistant>"]),
    manifest("embed-model", kind="embedding"),
    manifest("base-model", kind="completion"),
]


def estimate(model_id: str, total: int) -> MemoryEstimate:
    return MemoryEstimate(model_id=model_id, weights=total, kv_cache=0, overhead=0, total=total)


@contextmanager
def serve(
    loader: Loader, *, limit: int, sizes: dict[str, int] | None = None, load: str = "lazy", timeout_s: float = 5
) -> Iterator[tuple[TestClient, ModelRegistry]]:
    settings = load_settings(
        env={
            "APPLIANCE_DATA_DIR": tempfile.mkdtemp(prefix="appliance-mem-"),
            "APPLIANCE_MODEL_LOAD": load,
            "APPLIANCE_METRICS_ACCESS": "open",  # the test client is not a loopback address
        }
    )
    registry = ModelRegistry(MANIFESTS, loader, load_timeout_s=timeout_s)
    sizes = sizes or {}
    registry.limit_memory(limit, {m.id: estimate(m.id, sizes.get(m.id, 100 * MB)) for m in MANIFESTS})
    with TestClient(create_app(settings, registry), raise_server_exceptions=False) as client:
        yield client, registry


def states(client: TestClient) -> dict[str, str]:
    return {card["id"]: card["status"] for card in client.get("/v1/models").json()["data"]}


def test_least_recently_used_idle_model_is_unloaded_first() -> None:
    loader = Loader()
    with serve(loader, limit=250 * MB) as (client, _):
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # chat is now the most recent
        assert states(client) == {"chat-model": "ready", "embed-model": "ready", "base-model": "pending"}
        assert client.post("/v1/completions", json=COMPLETE).status_code == 200
        assert states(client) == {"chat-model": "ready", "embed-model": "unloaded", "base-model": "ready"}
        assert loader.latest("embed-model").closed.is_set()
        assert not loader.latest("chat-model").closed.is_set()
        # The embedding model loads again (a new engine); chat, used before base, makes room.
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200
        assert states(client) == {"chat-model": "unloaded", "embed-model": "ready", "base-model": "ready"}
        assert loader.loads == ["chat-model", "embed-model", "base-model", "embed-model"]
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"  # unloaded is not degraded
        assert health.json()["models"]["chat-model"]["state"] == "unloaded"
        metrics = client.get("/metrics").text
        assert 'appliance_model_loads_total{model="embed-model"} 2.0' in metrics
        assert 'appliance_model_unloads_total{model="chat-model"} 1.0' in metrics
        assert 'appliance_model_state{model="chat-model",state="unloaded"} 1.0' in metrics
        assert "appliance_models_memory_limit_bytes 2.5e+08" in metrics


def test_a_model_with_a_stream_in_flight_is_not_unloaded_until_the_stream_ends() -> None:
    loader = Loader()
    loader.reply_delay_s = 0.15  # ten words: a 1.5 s stream
    with serve(loader, limit=150 * MB) as (client, _):
        streamed: list[str] = []

        def stream() -> None:
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                streamed.extend(line for line in resp.iter_lines() if line)

        reader = threading.Thread(target=stream)
        reader.start()
        while "chat-model" not in loader.engines or not loader.latest("chat-model").requests:
            time.sleep(0.01)
        started = time.monotonic()
        resp = client.post("/v1/embeddings", json=EMBED)  # waits for the stream, then makes room
        waited = time.monotonic() - started
        reader.join(10)
        assert resp.status_code == 200
        assert waited > 0.5
        assert streamed[-1] == "data: [DONE]" and not any('"error"' in line for line in streamed)
        assert loader.latest("chat-model").closed.is_set()
        assert states(client) == {"chat-model": "unloaded", "embed-model": "ready", "base-model": "pending"}


def test_waiting_for_room_ends_in_503_with_retry_after() -> None:
    loader = Loader()
    loader.reply_delay_s = 0.3  # a 3 s stream against a 1 s load timeout
    with serve(loader, limit=150 * MB, timeout_s=1) as (client, _):
        done = threading.Event()

        def stream() -> None:
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                for _ in resp.iter_lines():
                    pass
            done.set()

        threading.Thread(target=stream, daemon=True).start()
        while "chat-model" not in loader.engines or not loader.latest("chat-model").requests:
            time.sleep(0.01)
        resp = client.post("/v1/embeddings", json=EMBED)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "model_unavailable"
        assert "models.max_memory" in resp.json()["error"]["message"]
        assert int(resp.headers["retry-after"]) >= 1
        assert not done.is_set()  # the stream was never disturbed
        assert done.wait(10)
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200


def test_a_client_that_disconnects_mid_stream_releases_its_model() -> None:
    """Drives the ASGI app by hand: the client sends http.disconnect after the first streamed bytes."""
    loader = Loader()
    loader.reply_delay_s = 1.0  # ten words: a 10 s stream, cut off after the first

    async def run() -> float:
        settings = load_settings(env={"APPLIANCE_DATA_DIR": tempfile.mkdtemp(prefix="appliance-mem-"),
                                      "APPLIANCE_MODEL_LOAD": "lazy"})
        registry = ModelRegistry(MANIFESTS, loader, load_timeout_s=4)
        registry.limit_memory(150 * MB, {m.id: estimate(m.id, 100 * MB) for m in MANIFESTS})
        app = create_app(settings, registry)
        first_bytes = asyncio.Event()

        async def request(path: str, payload: dict[str, Any], *, disconnect: bool) -> int:
            body = json.dumps(payload).encode()
            status = 0
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                if disconnect:
                    await first_bytes.wait()
                    return {"type": "http.disconnect"}
                await asyncio.Event().wait()  # a client that stays
                return {}

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and message.get("body"):
                    first_bytes.set()

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"host", b"localhost")],
                "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "state": {},
            }
            await app(scope, receive, send)  # type: ignore[arg-type]
            return status

        started = time.monotonic()
        streaming = asyncio.create_task(
            request("/v1/chat/completions", {**CHAT, "stream": True}, disconnect=True)
        )
        await first_bytes.wait()  # the chat model is loaded and streaming when the embedding request comes
        assert await request("/v1/embeddings", EMBED, disconnect=False) == 200
        elapsed = time.monotonic() - started
        await streaming
        registry.close()
        return elapsed

    elapsed = asyncio.run(run())
    assert elapsed < 4  # not the 10 s the stream would have taken
    assert loader.loads == ["chat-model", "embed-model"]
    chat = loader.latest("chat-model")
    assert chat.cancelled.wait(3)  # the engine saw the cancellation
    assert chat.closed.is_set()


def test_a_failed_request_releases_its_model() -> None:
    loader = Loader()
    with serve(loader, limit=150 * MB, timeout_s=2) as (client, _):
        too_long = {**COMPLETE, "prompt": "word " * 100}  # over the fake's 64-token context: refused at submit
        assert client.post("/v1/completions", json=too_long).status_code == 400
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200
        assert states(client)["base-model"] == "unloaded"


def test_a_model_that_can_never_fit_is_refused_and_named_at_start() -> None:
    loader = Loader()
    with serve(loader, limit=150 * MB, sizes={"base-model": 200 * MB}, load="startup") as (client, registry):
        resp = client.post("/v1/completions", json=COMPLETE)
        assert resp.status_code == 503
        message = resp.json()["error"]["message"]
        assert "base-model" in message and "191 MiB" in message and "143 MiB" in message
        assert "base-model" not in loader.loads
        assert registry.status()["base-model"]["state"] == "failed"
        # The others still serve.
        assert client.post("/v1/embeddings", json=EMBED).status_code == 200


def test_startup_loads_in_registry_order_only_what_fits() -> None:
    loader = Loader()
    with serve(loader, limit=250 * MB, load="startup") as (client, _):
        for _ in range(100):
            if client.get("/health").json()["status"] == "ok":
                break
            time.sleep(0.02)
        assert loader.loads == ["chat-model", "embed-model"]
        assert states(client) == {"chat-model": "ready", "embed-model": "ready", "base-model": "unloaded"}
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=COMPLETE).status_code == 200
        assert states(client)["base-model"] == "ready"
        assert sum(s == "ready" for s in states(client).values()) == 2
