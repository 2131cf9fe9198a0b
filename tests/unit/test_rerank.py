"""Reranking: the ONNX cross-encoder on a tiny real model, its import into the model store, the engine
factory, the rerank service, reranked search over a collection and `eval retrieval --rerank`."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.engines.registry import ModelRegistry
from appliance.errors import EngineError, InvalidRequest, ModelNotFound, ModelStoreError, SettingsError, UnsupportedForModel
from appliance.modelstore.store import ModelStore
from appliance.services.rerank import RerankService, relevance
from appliance.settings import load_settings
from tests.fakes import FakeEmbeddingEngine, manifest
from tests.tinyclassifier import minilm_tokenizer, write_tiny_classifier
from tests.tinygguf import write_tiny_gguf
from tests.tinyreranker import logit, write_tiny_reranker

QUERY = "What do llamas eat?"  # words the tiny model counts: do, ll, ##ama, ##s, eat
DOCUMENTS = [
    "The weather in Paris is mild in spring.",  # none of them
    "Llamas eat grass and hay.",  # ll ##ama ##s eat: 4 of 5
    "Llamas are camelids from the Andes.",  # ll ##ama ##s: 3 of 5
]
EXPECTED = [logit(0, 5), logit(4, 5), logit(3, 5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) of the tiny one-logit cross-encoder."""
    pytest.importorskip("onnx")
    directory = tmp_path_factory.mktemp("reranker")
    tokenizer = minilm_tokenizer(directory)
    return write_tiny_reranker(directory / "ranker.onnx", tokenizer), tokenizer


def cross_encoder(model: Path, tokenizer: Path, **kw: object) -> object:
    from appliance.engines.onnx import OnnxCrossEncoder

    options: dict[str, object] = {"max_length": 64, "batch_size": 2, "n_threads": 1, "gpu": "off", **kw}
    return OnnxCrossEncoder(model, tokenizer, model_id="ranker", **options)  # type: ignore[arg-type]


# -- the engine --------------------------------------------------------------------------------------


def test_the_document_sharing_the_querys_words_scores_highest(tiny: tuple[Path, Path]) -> None:
    engine = cross_encoder(*tiny)
    scores = engine.score(QUERY, DOCUMENTS)  # type: ignore[attr-defined]
    assert scores == pytest.approx(EXPECTED)
    assert max(range(3), key=lambda i: scores[i]) == 1


def test_scores_do_not_depend_on_batching_or_order(tiny: tuple[Path, Path]) -> None:
    many = DOCUMENTS * 5 + ["Llamas eat.", ""]
    one_batch = cross_encoder(*tiny, batch_size=64).score(QUERY, many)  # type: ignore[attr-defined]
    small_batches = cross_encoder(*tiny, batch_size=3).score(QUERY, many)  # type: ignore[attr-defined]
    assert one_batch == pytest.approx(small_batches)
    assert one_batch[-2] == pytest.approx(logit(4, 5)) and one_batch[-1] == pytest.approx(logit(0, 5))


def test_a_two_label_model_scores_its_positive_column(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    two = write_tiny_reranker(tmp_path / "two.onnx", tiny[1], columns=2)  # [0, logit]: positive minus negative
    assert cross_encoder(two, tiny[1]).score(QUERY, DOCUMENTS) == pytest.approx(EXPECTED)  # type: ignore[attr-defined]


def test_pairs_are_cut_to_the_window_never_refused(tiny: tuple[Path, Path]) -> None:
    engine = cross_encoder(*tiny, max_length=16)
    long = "Llamas eat grass. " + "The weather in Paris is mild. " * 200
    [score] = engine.score(QUERY, [long])  # type: ignore[attr-defined]
    assert math.isfinite(score)
    assert engine.count_tokens(QUERY, [long, "hay"]) <= 32  # type: ignore[attr-defined]
    full = cross_encoder(*tiny, max_length=4096)
    assert full.count_tokens(QUERY, [long]) > 1000  # type: ignore[attr-defined]


def test_count_tokens_counts_the_pairs_with_special_tokens(tiny: tuple[Path, Path]) -> None:
    engine = cross_encoder(*tiny)
    # [CLS] what do ll ##ama ##s eat ? [SEP] + ll ##ama ##s eat grass and hay . [SEP]
    assert engine.count_tokens(QUERY, ["Llamas eat grass and hay."]) == 9 + 9  # type: ignore[attr-defined]


def test_a_model_with_more_than_two_columns_is_not_a_cross_encoder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    three = write_tiny_classifier(tmp_path / "three.onnx", tiny[1], labels=3)
    with pytest.raises(EngineError, match="3 output columns"):
        cross_encoder(three, tiny[1])


def test_relevance_is_the_sigmoid_of_the_logit() -> None:
    assert relevance(0.0) == 0.5
    assert relevance(2.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert relevance(-2.0) == pytest.approx(1 - relevance(2.0))
    assert relevance(1000.0) == 1.0 and relevance(-1000.0) == 0.0  # no overflow in either tail


# -- the model store and the factory -----------------------------------------------------------------


def test_import_a_cross_encoder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from appliance.engines.factory import NativeEngineFactory
    from appliance.engines.onnx import OnnxCrossEncoder

    store = ModelStore(tmp_path / "models")
    m = store.import_model(tiny[0], model_id="ranker", kind="rerank", tokenizer=tiny[1], context_length=128)
    assert (m.kind, m.format, m.embedding_dim, m.labels, m.context_length) == ("rerank", "onnx", None, None, 128)
    engine = NativeEngineFactory(store, load_settings(env={}).models)(m)
    assert isinstance(engine, OnnxCrossEncoder) and engine.max_length == 128
    assert engine.score(QUERY, DOCUMENTS) == pytest.approx(EXPECTED)


def test_a_rerank_import_needs_an_onnx_cross_encoder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="needs --tokenizer"):
        store.import_model(tiny[0], kind="rerank")
    with pytest.raises(ModelStoreError, match="must be an ONNX cross-encoder"):
        store.import_model(write_tiny_gguf(tmp_path / "tiny.gguf"), kind="rerank")
    three = write_tiny_classifier(tmp_path / "three.onnx", tiny[1], labels=3)
    with pytest.raises(ModelStoreError, match="has 3 output columns"):
        store.import_model(three, kind="rerank", tokenizer=tiny[1])
    assert not store.root.exists() or [p.name for p in store.root.iterdir()] == []


def test_cli_imports_a_cross_encoder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from appliance.cli import main

    args = ["models", "import", str(tiny[0]), "--id", "ranker", "--kind", "rerank", "--tokenizer", str(tiny[1]),
            "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "imported ranker (rerank, onnx" in result.output
    listed = CliRunner().invoke(main, ["models", "--data-dir", str(tmp_path), "list", "--json"])
    assert [(r["id"], r["kind"]) for r in json.loads(listed.output)] == [("ranker", "rerank")]


# -- the service -------------------------------------------------------------------------------------


def _registry(tiny: tuple[Path, Path]) -> ModelRegistry:
    manifests = [manifest("ranker", kind="rerank"), manifest("embed", kind="embedding")]

    def factory(m: object) -> object:
        return cross_encoder(*tiny) if m.id == "ranker" else FakeEmbeddingEngine("embed")  # type: ignore[attr-defined]

    return ModelRegistry(manifests, factory, load_timeout_s=10)


class RecordingPolicy:
    """The parts of RequestPolicy the rerank service uses, recording what it was told."""

    def __init__(self) -> None:
        self.reserved: list[tuple[str, int, int]] = []
        self.screened: list[list[str]] = []

    def allow_model(self, manifest: object) -> None:
        return None

    def screen_input(self, texts: list[str], *, instructions: bool = True) -> list[str]:
        assert not instructions  # query and documents are data to a cross-encoder
        self.screened.append(texts)
        return texts

    def reserve(self, manifest: object, prompt_tokens: int, max_tokens: int) -> None:
        self.reserved.append((manifest.id, prompt_tokens, max_tokens))  # type: ignore[attr-defined]


def test_the_service_ranks_best_first_and_reserves_the_pair_tokens(tiny: tuple[Path, Path]) -> None:
    registry = _registry(tiny)
    policy = RecordingPolicy()
    try:
        ranking = asyncio.run(RerankService(registry).rerank("ranker", QUERY, DOCUMENTS, top_n=2, policy=policy))  # type: ignore[arg-type]
    finally:
        registry.close()
    assert ranking.model == "ranker"
    assert [r.index for r in ranking.results] == [1, 2]
    assert [r.relevance_score for r in ranking.results] == pytest.approx([relevance(EXPECTED[1]), relevance(EXPECTED[2])])
    tokens = cross_encoder(*tiny).count_tokens(QUERY, DOCUMENTS)  # type: ignore[attr-defined]
    assert ranking.prompt_tokens == tokens and policy.reserved == [("ranker", tokens, 0)]
    assert policy.screened == [[QUERY, *DOCUMENTS]]


def test_the_service_refuses_unknown_and_other_models(tiny: tuple[Path, Path]) -> None:
    registry = _registry(tiny)
    service = RerankService(registry)
    with pytest.raises(ModelNotFound):
        asyncio.run(service.rerank("nope", QUERY, DOCUMENTS))
    with pytest.raises(UnsupportedForModel, match="embedding model"):
        asyncio.run(service.rerank("embed", QUERY, DOCUMENTS))
    with pytest.raises(InvalidRequest, match="no rerank model is configured") as refused:
        service.default()
    assert refused.value.param == "rerank"
    assert RerankService(registry, default_model="ranker").default().id == "ranker"
    with pytest.raises(SettingsError, match="retrieval.rerank_model: no model named 'nope'"):
        RerankService(registry, default_model="nope")
    with pytest.raises(SettingsError, match="retrieval.rerank_model: .*embedding model"):
        RerankService(registry, default_model="embed")
    registry.close()


def test_the_setting_and_its_environment_variable() -> None:
    assert load_settings(env={}).retrieval.rerank_model is None
    assert load_settings(env={"APPLIANCE_RERANK_MODEL": "ranker"}).retrieval.rerank_model == "ranker"


# -- reranked search ---------------------------------------------------------------------------------

CORPUS = {
    "paris": "People eat well in Paris, where the weather is mild in spring.",
    "andes": "Llamas, llamas, llamas!",
    "food": (
        "High in the valleys of the Andes, far from any town, llamas eat grass, hay and the leaves of the small "
        "shrubs that grow between the rocks."
    ),
    "ships": "Sailors eat on container ships that carry loads across the sea.",
}


def test_search_with_rerank_orders_by_the_cross_encoder(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from appliance.services.documents import DocumentService

    registry = _registry(tiny)
    query = "Do llamas eat?"

    async def run() -> tuple[list[object], list[object], list[object]]:
        plain = DocumentService(tmp_path, registry, embedding_model="embed")
        ranked = DocumentService(tmp_path, registry, embedding_model="embed",
                                 reranker=RerankService(registry, default_model="ranker"))
        await plain.create("t", "c")
        for doc_id, text in CORPUS.items():
            await plain.ingest_text("t", "c", text, doc_id=doc_id, title=doc_id, metadata={})
        with pytest.raises(InvalidRequest, match="no rerank model is configured"):
            await plain.search("t", "c", query, top_k=2, mode="bm25", flt=None, rerank=True)
        before = await ranked.search("t", "c", query, top_k=4, mode="bm25", flt=None)
        after = await ranked.search("t", "c", query, top_k=1, mode="bm25", flt=None, rerank=True)
        hybrid = await ranked.search("t", "c", query, top_k=4, mode="hybrid", flt=None, rerank=True)
        plain.close()
        ranked.close()
        return before, after, hybrid

    try:
        before, after, hybrid = asyncio.run(run())
    finally:
        registry.close()
    # BM25 likes the short text that repeats "llamas"; the cross-encoder the one holding more of the words
    # the tiny model counts (ll, ##ama, ##s, eat of do, ll, ##ama, ##s, eat), though BM25 put it second.
    assert [h.document_id for h in before][:2] == ["andes", "food"]  # type: ignore[attr-defined]
    assert [h.document_id for h in after] == ["food"]  # type: ignore[attr-defined]
    assert [h.document_id for h in hybrid][:2] == ["food", "andes"]  # type: ignore[attr-defined]
    scores = [h.score for h in hybrid]  # type: ignore[attr-defined]
    assert scores[0] == pytest.approx(relevance(logit(4, 5)), abs=1e-6)  # all but "do"
    assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
    assert hybrid[0].snippet  # type: ignore[attr-defined]


# -- eval retrieval --rerank -------------------------------------------------------------------------


def _squad(path: Path) -> Path:
    paragraphs = [
        {"context": text, "qas": [{"question": question, "id": str(i), "answers": []}]}
        for i, (text, question) in enumerate([
            (CORPUS["food"], "What do llamas eat?"),
            (CORPUS["andes"], "Which word is said three times?"),
            (CORPUS["paris"], "How is the weather in Paris?"),
            (CORPUS["ships"], "What do container ships carry?"),
        ])
    ]
    path.write_text(json.dumps({"data": [{"title": "mini", "paragraphs": paragraphs}]}), encoding="utf-8")
    return path


def test_eval_retrieval_reports_a_reranked_row(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from appliance.cli import main

    installed = Path(__file__).resolve().parents[2] / ".appliance-data" / "test" / "models" / "all-minilm-l6-v2"
    if not installed.is_dir():
        pytest.skip("the bundled embedding model is not materialised (the e2e fixtures do that)")
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / installed.name).symlink_to(installed)
    ModelStore(data / "models").import_model(tiny[0], model_id="ranker", kind="rerank", tokenizer=tiny[1])
    dataset = _squad(tmp_path / "squad.json")
    args = ["eval", "retrieval", "--dataset", str(dataset), "--json", "--data-dir", str(data)]
    refused = CliRunner().invoke(main, [*args, "--rerank"])
    assert refused.exit_code != 0 and "no rerank model is configured" in refused.output
    result = CliRunner().invoke(main, [*args, "--rerank"], env={"APPLIANCE_RERANK_MODEL": "ranker"})
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{"):])  # after the progress bar (stderr)
    assert set(scores) == {"bm25", "vector", "hybrid", "hybrid+rerank"}
    assert 0.0 <= scores["hybrid+rerank"]["mrr@10"] <= 1.0
