"""Reranking as an operator sets it up: `appliance models import --kind rerank` of a tiny generated
cross-encoder into a fresh data directory, then /v1/rerank and reranked search on the real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server
from tests.e2e.test_gateway import cli
from tests.tinyclassifier import minilm_tokenizer
from tests.tinyreranker import write_tiny_reranker

pytestmark = pytest.mark.e2e
QUERY = "What do llamas eat?"
DOCUMENTS = ["The weather in Paris is mild in spring.", "Llamas eat grass and hay.", "Llamas are camelids."]


@pytest.fixture(scope="module")
def reranking(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, Path]:
    pytest.importorskip("onnx")
    base = tmp_path_factory.mktemp("rerank")
    tokenizer = minilm_tokenizer(base)
    model = write_tiny_reranker(base / "ms-marco-tiny.onnx", tokenizer)
    data = fresh_data_dir(data_dir, base / "data")
    imported = cli(data, "models", "import", str(model), "--kind", "rerank", "--tokenizer", str(tokenizer),
                   "--id", "tiny-reranker", "--context-length", "128")
    assert "imported tiny-reranker (rerank, onnx" in imported.stdout
    srv = start_server(data, base / "server.log", env={"APPLIANCE_RERANK_MODEL": "tiny-reranker"})
    yield srv, data
    stop_server(srv)
    assert "Traceback" not in srv.log.read_text(), "the server logged an unexpected traceback"


def test_rerank_on_the_real_server(reranking: tuple[Server, Path]) -> None:
    server, _ = reranking
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
    assert any(m["id"] == "tiny-reranker" and m["kind"] == "rerank" for m in models)
    body = {"model": "tiny-reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    r = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["index"] for x in answer["results"]] == [1, 2]
    assert answer["results"][0]["document"] == {"text": DOCUMENTS[1]}
    assert 0.5 < answer["results"][1]["relevance_score"] < answer["results"][0]["relevance_score"] < 1.0
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0
    # llama-server's path answers the same.
    assert httpx.post(f"{server.url}/rerank", json=body, timeout=60).json()["results"] == answer["results"]
    wrong = httpx.post(f"{server.url}/v1/rerank", json={**body, "model": "gemma3-270m"}, timeout=60)
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_not_supported"


def test_search_reranks_with_the_configured_model(reranking: tuple[Server, Path]) -> None:
    server, _ = reranking
    url = f"{server.url}/v1/collections"
    assert httpx.post(url, json={"name": "llamas"}, timeout=60).status_code == 201
    for i, text in enumerate(DOCUMENTS):
        r = httpx.post(f"{url}/llamas/documents", json={"text": text, "id": f"d{i}"}, timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/llamas/search", json={"query": QUERY, "top_k": 3, "rerank": True}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert [h["document_id"] for h in hits][0] == "d1"
    assert all(0.0 <= h["score"] <= 1.0 for h in hits)
