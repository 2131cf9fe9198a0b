"""The real server with `models.max_memory` room for one bundled model at a time: the models take turns.

A completion loads Gemma, an embedding unloads it and loads MiniLM, the next completion swaps them back;
each answer is right, /v1/models shows the swaps, and the server's resident memory drops on an unload.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.engines.memory import estimate_model_memory
from appliance.modelstore.store import ModelStore
from appliance.settings import load_settings
from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server
from tests.e2e.test_openai_client import GREEDY_PROMPT, GREEDY_TEXT

MIB = 1 << 20


@pytest.fixture(scope="module")
def one_at_a_time(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    # The limit the server will apply, from the estimates it will compute: room for the larger model alone.
    settings = load_settings(env={"APPLIANCE_DATA_DIR": str(data_dir)})
    store = ModelStore(settings.models_dir)
    sizes = [estimate_model_memory(m, settings.models_dir / m.id, settings.models).total for m in store.manifests()]
    limit = max(sizes) + 64 * MIB
    assert limit < sum(sizes), "the limit must not hold both models"
    base = tmp_path_factory.mktemp("memory")
    server = start_server(
        fresh_data_dir(data_dir, base / "data"),
        base / "server.log",
        # No response cache: the repeated completion must reach the model again.
        env={"APPLIANCE_MAX_MEMORY": str(limit), "APPLIANCE_CACHE_TTL_S": "0"},
    )
    yield server, limit
    stop_server(server)
    assert "Traceback" not in server.log.read_text()


def states(server: Server) -> dict[str, str]:
    """The load states of the two models this test takes turns with (the other bundled ones stay unloaded)."""
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    return {m["id"]: m["status"] for m in models if m["id"] in ("all-minilm-l6-v2", "gemma3-270m")}


def rss(server: Server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def complete(server: Server) -> str:
    resp = server.client().completions.create(
        model="gemma3-270m", prompt=GREEDY_PROMPT, max_tokens=20, temperature=0
    )
    return resp.choices[0].text


def embed(server: Server) -> list[list[float]]:
    resp = server.client().embeddings.create(
        model="all-minilm-l6-v2", input=["a cat sat on the mat", "a kitten sat on the rug", "quarterly tax returns"]
    )
    return [d.embedding for d in resp.data]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_models_take_turns_within_the_limit(one_at_a_time: tuple[Server, int], capsys: pytest.CaptureFixture[str]) -> None:
    server, limit = one_at_a_time
    # Start-up loads in registry order only what fits: MiniLM (first by id); Gemma waits for its first request.
    assert states(server) == {"all-minilm-l6-v2": "ready", "gemma3-270m": "unloaded"}
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    assert complete(server) == GREEDY_TEXT
    assert states(server) == {"all-minilm-l6-v2": "unloaded", "gemma3-270m": "ready"}
    with_gemma = rss(server)

    vectors = embed(server)
    assert states(server) == {"all-minilm-l6-v2": "ready", "gemma3-270m": "unloaded"}
    with_minilm = rss(server)
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2

    assert complete(server) == GREEDY_TEXT
    assert states(server) == {"all-minilm-l6-v2": "unloaded", "gemma3-270m": "ready"}
    with_gemma_again = rss(server)

    # Gemma's weights, KV cache and buffers leave the process when it is unloaded, and MiniLM's session
    # when it is: the second time Gemma is loaded the process is no bigger than the first time.
    drop = with_gemma - with_minilm
    with capsys.disabled():
        print(f"\nRSS with Gemma {with_gemma / MIB:.0f} MiB, with MiniLM {with_minilm / MIB:.0f} MiB "
              f"(drop {drop / MIB:.0f} MiB), with Gemma again {with_gemma_again / MIB:.0f} MiB, "
              f"limit {limit / MIB:.0f} MiB")
    assert drop > 300 * MIB
    assert with_gemma_again < with_gemma + 100 * MIB

    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'appliance_model_loads_total{model="gemma3-270m"} 2.0' in metrics
    assert 'appliance_model_unloads_total{model="gemma3-270m"} 1.0' in metrics
    assert 'appliance_model_unloads_total{model="all-minilm-l6-v2"} 2.0' in metrics
