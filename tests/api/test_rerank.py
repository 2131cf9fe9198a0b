"""/v1/rerank (and its aliases) and reranked search and ask, through the real ASGI app, on a tiny real
ONNX cross-encoder beside the fake chat and embedding engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.errors import SettingsError
from appliance.protocol.rerank import MAX_RERANK_DOCUMENTS
from appliance.storage.sqlite import connect
from tests.api.conftest import World, make_client
from tests.fakes import manifest
from tests.tinyclassifier import minilm_tokenizer
from tests.tinyreranker import logit, write_tiny_reranker

QUERY = "What do llamas eat?"
DOCUMENTS = ["The weather in Paris is mild in spring.", "Llamas eat grass and hay.", "Llamas are camelids."]


def sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("onnx")
    directory = tmp_path_factory.mktemp("reranker")
    tokenizer = minilm_tokenizer(directory)
    return write_tiny_reranker(directory / "ranker.onnx", tokenizer), tokenizer


@pytest.fixture
def ranked(world: World, tiny: tuple[Path, Path]) -> World:
    """The world plus the cross-encoder `ranker` (alias `ranker-alias`)."""
    from appliance.engines.onnx import OnnxCrossEncoder

    world.manifests.append(manifest("ranker", kind="rerank", aliases=["ranker-alias"]))
    world.engines["ranker"] = OnnxCrossEncoder(
        tiny[0], tiny[1], model_id="ranker", max_length=64, batch_size=4, n_threads=1, gpu="off"
    )
    return world


def rerank(client: TestClient, path: str = "/v1/rerank", **body: Any) -> Any:
    return client.post(path, json={"model": "ranker", "query": QUERY, "documents": DOCUMENTS, **body})


def test_rerank_returns_results_best_first_with_scores_documents_and_usage(ranked: World) -> None:
    with make_client(ranked) as client:
        r = rerank(client)
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["model"] == "ranker" and body["object"] == "list" and body["id"].startswith("rerank-")
    assert [x["index"] for x in body["results"]] == [1, 2, 0]
    assert [x["relevance_score"] for x in body["results"]] == pytest.approx(
        [sigmoid(logit(4, 5)), sigmoid(logit(3, 5)), sigmoid(logit(0, 5))]
    )
    assert [x["document"]["text"] for x in body["results"]] == [DOCUMENTS[1], DOCUMENTS[2], DOCUMENTS[0]]
    tokens = ranked.engines["ranker"].count_tokens(QUERY, DOCUMENTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_aliases_top_n_return_documents_and_document_objects(ranked: World) -> None:
    with make_client(ranked) as client:
        first = rerank(client).json()["results"]
        for path in ("/v1/reranking", "/rerank", "/reranking"):
            r = rerank(client, path)
            assert r.status_code == 200, path
            assert r.json()["results"] == first
        top = rerank(client, top_n=1, return_documents=False, model="ranker-alias").json()
        assert top["results"] == [{"index": 1, "relevance_score": first[0]["relevance_score"]}]
        assert top["model"] == "ranker"
        # Jina and Cohere's older API send objects with a `text` field (and other fields, ignored).
        objects = [{"text": DOCUMENTS[0], "title": "weather"}, DOCUMENTS[1], {"text": DOCUMENTS[2]}]
        r = rerank(client, documents=objects, top_n=10)
        assert r.status_code == 200, r.text
        assert r.json()["results"] == first


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"documents": []}, 400, None, "documents"),
        ({"documents": ["x"] * (MAX_RERANK_DOCUMENTS + 1)}, 400, None, "documents"),
        ({"documents": [{"title": "no text"}]}, 400, None, "documents[0]"),
        ({"query": ""}, 400, None, "query"),
        ({"query": "   "}, 400, None, "query"),
        ({"top_n": 0}, 400, None, "top_n"),
        ({"model": "nope"}, 404, "model_not_found", "model"),
        ({"model": "chat-model"}, 400, "model_not_supported", "model"),
        ({"model": "embed-model"}, 400, "model_not_supported", "model"),
    ],
)
def test_bad_requests_get_a_clear_error(ranked: World, body: dict[str, Any], status: int, code: str | None,
                                        param: str) -> None:
    with make_client(ranked) as client:
        r = rerank(client, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code


def test_a_missing_field_and_a_missing_body_are_refused(ranked: World) -> None:
    with make_client(ranked) as client:
        r = client.post("/v1/rerank", json={"model": "ranker", "query": QUERY})
        assert r.status_code == 400 and "documents" in r.json()["error"]["message"]
        assert client.post("/v1/rerank", content=b"").status_code == 400


def test_rerank_needs_a_key_once_keys_exist_and_is_metered(ranked: World, tmp_path: Path) -> None:
    with make_client(ranked, APPLIANCE_DATA_DIR=str(tmp_path)) as client:
        admin = client.post("/v1/admin/keys", json={"tenant": "default", "role": "admin"}).json()["key"]
        assert rerank(client).status_code == 401
        r = client.post("/v1/rerank", json={"model": "ranker", "query": QUERY, "documents": DOCUMENTS},
                        headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200
        tokens = r.json()["usage"]["prompt_tokens"]
        refused = client.post("/v1/rerank", json={"model": "ranker", "query": "", "documents": DOCUMENTS},
                              headers={"Authorization": f"Bearer {admin}"})
        assert refused.status_code == 400
    rows = connect(tmp_path / "gateway.db").execute(
        "SELECT route, status, model, prompt_tokens, completion_tokens FROM usage WHERE route LIKE '%rerank%' "
        "ORDER BY seq"
    ).fetchall()
    assert [tuple(row) for row in rows] == [
        ("POST /v1/rerank", 200, "ranker", tokens, 0), ("POST /v1/rerank", 400, None, 0, 0),
    ]


def test_a_tenant_allow_list_hides_the_rerank_model(ranked: World) -> None:
    with make_client(ranked) as client:
        auth = {"Authorization": f"Bearer {client.post('/v1/admin/keys', json={'tenant': 'default', 'role': 'admin'}).json()['key']}"}
        assert client.post("/v1/admin/tenants", json={"name": "narrow", "allowed_models": ["chat-model"]},
                           headers=auth).status_code == 201
        key = client.post("/v1/admin/keys", json={"tenant": "narrow"}, headers=auth).json()["key"]
        r = client.post("/v1/rerank", json={"model": "ranker", "query": QUERY, "documents": DOCUMENTS},
                        headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- search and ask with "rerank": true ---------------------------------------------------------------


CORPUS = {
    "paris": "People eat well in Paris, where the weather is mild in spring.",
    "andes": "Llamas, llamas, llamas!",
    "food": (
        "High in the valleys of the Andes, far from any town, llamas eat grass, hay and the leaves of the small "
        "shrubs that grow between the rocks."
    ),
}


def _collection(client: TestClient) -> None:
    assert client.post("/v1/collections", json={"name": "docs"}).status_code == 201
    for doc_id, text in CORPUS.items():
        r = client.post("/v1/collections/docs/documents", json={"text": text, "id": doc_id})
        assert r.status_code == 200, r.text


def test_search_and_ask_rerank_with_the_configured_model(ranked: World) -> None:
    env = {"APPLIANCE_RERANK_MODEL": "ranker", "APPLIANCE_EMBEDDING_MODEL": "embed-model"}
    with make_client(ranked, **env) as client:
        _collection(client)
        search = {"query": QUERY, "top_k": 1, "mode": "bm25"}
        plain = client.post("/v1/collections/docs/search", json=search).json()["data"]
        assert [h["document_id"] for h in plain] == ["andes"]  # BM25 likes the short text of repeats
        r = client.post("/v1/collections/docs/search", json={**search, "rerank": True})
        assert r.status_code == 200, r.text
        hits = r.json()["data"]
        assert [h["document_id"] for h in hits] == ["food"]  # the cross-encoder, the one with the question's words
        assert hits[0]["score"] == pytest.approx(sigmoid(logit(4, 5)), abs=1e-6)
        answer = client.post("/v1/collections/docs/ask", json={"question": QUERY, "rerank": True})
        assert answer.status_code == 200, answer.text


def test_rerank_without_a_configured_model_is_a_clear_400(ranked: World) -> None:
    with make_client(ranked, APPLIANCE_EMBEDDING_MODEL="embed-model") as client:
        _collection(client)
        for route, body in (("search", {"query": QUERY}), ("ask", {"question": QUERY})):
            r = client.post(f"/v1/collections/docs/{route}", json={**body, "rerank": True})
            assert r.status_code == 400, route
            error = r.json()["error"]
            assert error["param"] == "rerank" and "retrieval.rerank_model" in error["message"]


def test_a_rerank_model_setting_that_names_no_rerank_model_stops_start_up(ranked: World) -> None:
    with pytest.raises(SettingsError, match="retrieval.rerank_model: no model named 'nope'"):
        make_client(ranked, APPLIANCE_RERANK_MODEL="nope")
    with pytest.raises(SettingsError, match="retrieval.rerank_model: .*chat model"):
        make_client(ranked, APPLIANCE_RERANK_MODEL="chat-model")
