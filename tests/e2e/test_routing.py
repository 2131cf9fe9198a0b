"""Routed model ids on the real server and the bundled models, through the `openai` client.

One slot per model and a waiting queue of one (APPLIANCE_PARALLEL=1, APPLIANCE_MAX_QUEUE=1): with a
generation running and one request waiting, the next request to that model is refused at once, so a
routed request falls to the next candidate. A model whose GGUF
file is garbage fails to load and is passed over too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from appliance.modelstore.catalog import catalog_manifests
from appliance.modelstore.manifest import MANIFEST_NAME, read_manifest, write_manifest
from appliance.modelstore.store import ModelStore
from tests.e2e.conftest import REPO, Server, free_port, fresh_data_dir, stop_server

ROUTES = """
[routing.auto]
candidates = ["smollm2-135m", "gemma3-270m"]
load_wait_s = 2

[routing.sturdy]
candidates = ["broken", "auto"]
"""
# Counting as a plain completion goes on to max_tokens (a chat answer to "count to 1000" stops at 20).
HOLD = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 3000, "temperature": 0.2, "stream": True}
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_models() -> Path:
    """The two bundled chat models only, materialised once (the routes need nothing else)."""
    path = REPO / ".appliance-data" / "routing"
    store = ModelStore(path / "models")
    for template in catalog_manifests():
        if template.id in ("smollm2-135m", "gemma3-270m"):
            store.install(template)
    return path


@pytest.fixture(scope="module")
def routed(chat_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("routed")
    data = fresh_data_dir(chat_models, base / "data")
    # A registered model whose file is not a GGUF at all: it fails to load.
    broken = data / "models" / "broken"
    broken.mkdir()
    (broken / "model.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    template = read_manifest(REPO / "models" / "smollm2-135m.toml")
    file = msgspec.structs.replace(template.file, name="model.gguf", sha256="0" * 64, size=4100, source=None)
    write_manifest(msgspec.structs.replace(template, id="broken", aliases=[], file=file), broken / MANIFEST_NAME)
    config = base / "appliance.toml"
    config.write_text(ROUTES)
    srv = _start(data, base / "server.log", config)
    yield srv
    stop_server(srv)


def _start(data: Path, log: Path, config: Path) -> Server:
    """The server, once every model has loaded or failed (with a failed model /health stays 503)."""
    port = free_port()
    env = {**os.environ, "APPLIANCE_PARALLEL": "1", "APPLIANCE_MAX_QUEUE": "1", "APPLIANCE_CONFIG": str(config)}
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--data-dir", str(data)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            models = httpx.get(f"{server.url}/health", timeout=2).json()["models"]
            if models and all(m["state"] in ("ready", "failed") for m in models.values()):
                return server
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the models did not load:\n{log.read_text()}")


class Occupied:
    """A model's only slot and its queue of one taken: a streamed generation holds the slot and a
    one-token request waits behind it, so the next request to the model is refused at once."""

    def __init__(self, server: Server, model: str) -> None:
        self._pool = ThreadPoolExecutor(2)
        self._client = httpx.Client(timeout=120)
        request = self._client.build_request("POST", f"{server.url}/v1/completions", json={**HOLD, "model": model})
        self._holder = self._client.send(request, stream=True)
        assert self._holder.status_code == 200
        # Kept: a line iterator that is garbage-collected closes the connection (and frees the slot).
        self._lines = self._holder.iter_lines()
        while not next(self._lines).startswith("data: "):
            pass
        self._waiter = self._pool.submit(
            httpx.post, f"{server.url}/v1/chat/completions", timeout=120,
            json={"model": model, "messages": ASK, "max_tokens": 1},
        )
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["models"][model]["engine"]["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the waiting request never queued"
            time.sleep(0.05)

    def release(self) -> None:
        self._holder.close()  # the client hangs up: the slot frees, the waiting request runs its one token
        assert self._waiter.result(60).status_code == 200
        self._client.close()
        self._pool.shutdown()


def test_auto_is_listed_and_served_by_its_first_candidate(routed: Server) -> None:
    client = routed.client()
    ids = {m.id: m for m in client.models.list().data}
    assert ids["auto"].model_extra["candidates"] == ["smollm2-135m", "gemma3-270m"]
    assert ids["sturdy"].model_extra["candidates"] == ["broken", "smollm2-135m", "gemma3-270m"]
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=ASK, max_tokens=16, temperature=0)
    assert raw.headers["x-route"] == "auto>smollm2-135m"
    completion = raw.parse()
    assert completion.model == "smollm2-135m"
    assert completion.choices[0].message.content


def test_a_busy_first_candidate_falls_to_the_next(routed: Server) -> None:
    client = routed.client()
    hold = Occupied(routed, "smollm2-135m")
    try:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=ASK, max_tokens=16)
        assert raw.headers["x-route"] == "auto>smollm2-135m(queue_full)>gemma3-270m"
        assert raw.parse().model == "gemma3-270m"
        # Streamed the same way: the path is in the headers before the first event.
        with client.chat.completions.with_streaming_response.create(
            model="auto", messages=ASK, max_tokens=8, stream=True
        ) as stream:
            assert stream.headers["x-route"] == "auto>smollm2-135m(queue_full)>gemma3-270m"
            assert {chunk.model for chunk in stream.parse()} == {"gemma3-270m"}
    finally:
        hold.release()


def test_a_model_that_failed_to_load_is_passed_over(routed: Server) -> None:
    client = routed.client()
    assert httpx.get(f"{routed.url}/v1/models/broken").json()["status"] == "failed"
    raw = client.chat.completions.with_raw_response.create(model="sturdy", messages=ASK, max_tokens=8)
    assert raw.headers["x-route"] == "sturdy>broken(failed)>smollm2-135m"


def test_every_candidate_busy_gives_503_with_retry_after(routed: Server) -> None:
    client = routed.client()
    holds = [Occupied(routed, "smollm2-135m"), Occupied(routed, "gemma3-270m")]
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="auto", messages=ASK, max_tokens=8, temperature=0.7)
        resp = caught.value.response
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.headers["x-route"] == "auto>smollm2-135m(queue_full)>gemma3-270m(queue_full)"
        assert resp.json()["error"]["code"] == "route_unavailable"
    finally:
        for hold in holds:
            hold.release()
    metrics = httpx.get(f"{routed.url}/metrics").text
    assert 'appliance_route_hops_total{model="smollm2-135m",outcome="queue_full",route="auto"}' in metrics
    assert 'appliance_route_hops_total{model="broken",outcome="failed",route="sturdy"} 1.0' in metrics
    assert 'appliance_routed_requests_total{result="unavailable",route="auto"} 1.0' in metrics
    # The slots come back once the holders hang up.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=ASK, max_tokens=4)
        if raw.headers["x-route"] == "auto>smollm2-135m":
            break
        time.sleep(0.5)
    assert raw.headers["x-route"] == "auto>smollm2-135m"
