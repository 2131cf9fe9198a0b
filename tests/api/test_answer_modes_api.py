"""answer_mode on /ask through the real ASGI app: extractive answers ranked by the embedding model, or by the
configured cross-encoder (a tiny real ONNX one), and the wire validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from tests.api.conftest import World, make_client
from tests.fakes import manifest
from tests.tinyclassifier import minilm_tokenizer
from tests.tinyreranker import write_tiny_reranker

QUESTION = "What do llamas eat?"
TEXT = "Llamas live in the Andes. Llamas eat grass and hay every day. The weather there is cold at night."


@pytest.fixture
def ranked(world: World, tmp_path: Path) -> World:
    pytest.importorskip("onnx")
    from appliance.engines.onnx import OnnxCrossEncoder

    tokenizer = minilm_tokenizer(tmp_path)
    model = write_tiny_reranker(tmp_path / "ranker.onnx", tokenizer)
    world.manifests.append(manifest("ranker", kind="rerank"))
    world.engines["ranker"] = OnnxCrossEncoder(model, tokenizer, model_id="ranker", max_length=64, batch_size=4,
                                               n_threads=1, gpu="off")
    return world


def _collection(client: TestClient) -> None:
    assert client.post("/v1/collections", json={"name": "docs"}).status_code == 201
    r = client.post("/v1/collections/docs/documents", json={"text": TEXT, "id": "llamas", "title": "Llamas"})
    assert r.status_code == 200, r.text


def _extract(world: World, **env: str) -> dict:
    with make_client(world, APPLIANCE_EMBEDDING_MODEL="embed-model", **env) as client:
        _collection(client)
        r = client.post("/v1/collections/docs/ask", json={"question": QUESTION, "answer_mode": "extractive", "max_tokens": 16})
        assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer_mode"] == "extractive" and body["grounded"] is True
    assert body["citations"] and all(c["quote"] in TEXT and c["supported"] for c in body["citations"])
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    return body


def test_extractive_answer_ranked_by_the_cross_encoder(ranked: World) -> None:
    body = _extract(ranked, APPLIANCE_RERANK_MODEL="ranker")
    # The tiny cross-encoder scores by shared words: the sentence about eating wins.
    assert body["answer"].startswith("Llamas eat grass and hay every day. [1]")


def test_extractive_answer_ranked_by_the_embedding_model(world: World) -> None:
    body = _extract(world)
    assert "Llamas eat grass and hay every day. [1]" in body["answer"]


def test_generative_stays_the_default_and_bad_modes_are_refused(world: World) -> None:
    with make_client(world, APPLIANCE_EMBEDDING_MODEL="embed-model") as client:
        _collection(client)
        body = client.post("/v1/collections/docs/ask", json={"question": QUESTION, "max_tokens": 16}).json()
        assert body["answer_mode"] == "generative"
        r = client.post("/v1/collections/docs/ask", json={"question": QUESTION, "answer_mode": "summary"})
        assert r.status_code == 400 and "answer_mode" in r.text


def test_chat_with_a_collection_takes_answer_mode(world: World) -> None:
    with make_client(world, APPLIANCE_EMBEDDING_MODEL="embed-model") as client:
        _collection(client)
        r = client.post("/v1/chat/completions", json={
            "model": "chat-model", "collection": "docs", "answer_mode": "extractive", "max_tokens": 16,
            "messages": [{"role": "user", "content": QUESTION}],
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert "Llamas eat grass and hay every day." in body["choices"][0]["message"]["content"]
        assert body["grounded"] is True and body["citations"]
        bad = client.post("/v1/chat/completions", json={
            "model": "chat-model", "collection": "docs", "answer_mode": "summary",
            "messages": [{"role": "user", "content": QUESTION}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "answer_mode"


def test_the_setting_is_the_default_mode(world: World, tmp_path: Path) -> None:
    from appliance.api.app import create_app
    from appliance.engines.registry import ModelRegistry
    from appliance.settings import load_settings

    config = tmp_path / "appliance.toml"
    config.write_text('[retrieval]\nanswer_mode = "extractive"\nembedding_model = "embed-model"\n')
    settings = load_settings(config=config, env={"APPLIANCE_DATA_DIR": str(tmp_path / "data")})
    app = create_app(settings, ModelRegistry(world.manifests, world.factory, load_timeout_s=5))
    with TestClient(app) as client:
        _collection(client)
        r = client.post("/v1/collections/docs/ask", json={"question": QUESTION})
    assert r.json()["answer_mode"] == "extractive"
