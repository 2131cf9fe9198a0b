"""Per-query fusion, contextual chunk headers, the span-based long-document eval and extractive answers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np

from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.collection import Collection, DocumentInput, context_header
from appliance.retrieval.evaluate import evaluate, load_dataset
from appliance.retrieval.fusion import LEXICAL_WEIGHT, Candidates, adaptive_weight, confidence, fuse, fuse_hybrid
from appliance.retrieval.parsing import Section
from appliance.services.ask import AskService, Source, choose_sentences, extractive_answer, split_sentences
from tests.fakes import manifest
from tests.unit.test_collection import DIM, chunker, embed, ids, open_col

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "longqa_sample.json"


def cands(lexical: list[tuple[int, float]], vector: list[tuple[int, float]]) -> Candidates:
    return Candidates(lexical, vector, {k: "d" for k, _ in (*lexical, *vector)})


# -- fusion --------------------------------------------------------------------------------------


def test_confidence_is_the_margin_of_each_halfs_top_hit() -> None:
    sure = cands([(1, 10.0), (2, 5.0)], [(3, 0.80), (4, 0.70)])
    assert confidence(sure) == (1.0, 1.0)
    unsure = cands([(1, 10.0), (2, 9.7)], [(3, 0.800), (4, 0.799)])
    lexical, vector = confidence(unsure)
    assert 0.09 < lexical < 0.11 and vector < 0.03


def test_a_sure_bm25_is_not_overruled_by_an_unsure_vector_half() -> None:
    # BM25 is sure of chunk 1; the vectors barely prefer chunk 2 over a crowd of near-equal neighbours.
    lexical = [(1, 12.0), (2, 8.0), (5, 2.0)]
    vector = [(2, 0.61), *[(10 + i, 0.60 - 0.001 * i) for i in range(20)], (1, 0.45), (5, 0.30)]
    found = cands(lexical, vector)
    assert fuse_hybrid(found)[0][0] == 2  # the fixed 0.6 / 0.4 (the default) lets the vector half flip it
    assert fuse_hybrid(found) == fuse(lexical, vector)
    assert adaptive_weight(found) > LEXICAL_WEIGHT
    assert fuse_hybrid(found, "adaptive")[0][0] == 1


def test_weights_stay_fixed_when_the_halves_are_equally_sure_or_one_is_missing() -> None:
    assert adaptive_weight(cands([(1, 10.0), (2, 5.0)], [(3, 0.9), (4, 0.5)])) == LEXICAL_WEIGHT
    assert adaptive_weight(cands([(1, 10.0), (2, 9.9)], [(3, 0.9), (4, 0.5)])) == LEXICAL_WEIGHT
    assert adaptive_weight(cands([], [(3, 0.9)])) == LEXICAL_WEIGHT
    assert fuse_hybrid(cands([], []), "adaptive") == []


# -- contextual chunk headers -------------------------------------------------------------------


class RecordingEmbed:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return embed(texts)


def doc_with_heading() -> DocumentInput:
    return DocumentInput("m", "Pump manual", "m.md", [Section("Replace the seal every 4000 hours.", heading="Maintenance")])


def test_new_collections_embed_chunks_behind_title_and_heading(tmp_path: Path) -> None:
    rec = RecordingEmbed()
    col = Collection(tmp_path / "c", embedding_model="test", ndim=DIM, chunker=chunker(), context_headers=True)
    col.ingest([doc_with_heading()], rec)
    assert rec.texts == ["Pump manual > Maintenance\nReplace the seal every 4000 hours."]
    hit = col.search("seal", top_k=1, mode="bm25", query_vector=None)[0]
    assert hit.text == "Replace the seal every 4000 hours."  # the stored chunk and BM25 are unchanged
    col.close()
    # The choice is the collection's: reopening with another default keeps it.
    reopened = Collection(tmp_path / "c", embedding_model="test", ndim=DIM, chunker=chunker(), context_headers=False)
    assert reopened.context_headers
    reopened.close()


def test_a_collection_made_before_headers_keeps_embedding_bare_chunks(tmp_path: Path) -> None:
    col = open_col(tmp_path / "old")
    col.ingest([DocumentInput("a", "A", "a.txt", [Section("pumps need oil")])], embed)
    col.close()
    conn = sqlite3.connect(tmp_path / "old" / "registry.sqlite")
    conn.execute("DELETE FROM meta WHERE key = 'context_headers'")  # as written before the key existed
    conn.commit()
    conn.close()
    rec = RecordingEmbed()
    col = Collection(tmp_path / "old", embedding_model="test", ndim=DIM, chunker=chunker(), context_headers=True)
    assert not col.context_headers
    col.ingest([doc_with_heading()], rec)
    assert rec.texts == ["Replace the seal every 4000 hours."]
    assert ids(col, "oil") == ["a"] and ids(col, "seal", "vector")[0] == "m"
    col.close()


def test_headers_are_cut_to_fit_the_window() -> None:
    words = Chunker(lambda texts: [len(t.split()) for t in texts], max_tokens=12, overlap_tokens=0)
    assert words.fit_header("a very long title that goes on and on", 4) == "a very long title"
    assert context_header("  Manual ", "Manual") == "Manual"
    chunk = Chunk("one two three four five six seven eight nine", 0, 40, None, None, 11, "h")
    text = words.behind_header("Title here", chunk)
    assert text.startswith("Title here\none two") and len(text.split()) <= 10


# -- span-based eval on long documents ----------------------------------------------------------


def test_the_long_document_format_loads_with_sections_and_scopes() -> None:
    data = load_dataset(SAMPLE)
    assert data.spans and len(data.documents) == 3 and len(data.questions) == 6
    pump = data.documents[0]
    assert pump.title == "Centrifugal pump manual" and [s.heading for s in pump.sections] == ["Installation", "Maintenance"]
    assert [q.scoped for q in data.questions].count(True) == 1


def test_a_hit_is_a_chunk_of_the_gold_document_holding_the_answer() -> None:
    small = Chunker(lambda texts: [len(t.split()) for t in texts], max_tokens=24, overlap_tokens=2)
    scores = evaluate(SAMPLE, embed, small, embedding_model="test", ndim=DIM)
    assert set(scores) == {"bm25", "vector", "hybrid"}
    bm25 = scores["bm25"]
    assert bm25["questions"] == 6 and bm25["unreachable"] == 1  # "purple elephants" is in no chunk
    assert bm25["recall@10"] == round(5 / 6, 4) and bm25["mrr@10"] > 0.6
    assert scores["hybrid"]["recall@10"] == round(5 / 6, 4)


def test_squad_files_still_rank_the_gold_paragraph(tmp_path: Path) -> None:
    squad = tmp_path / "s.json"
    squad.write_text('{"data": [{"title": "T", "paragraphs": [{"context": "Pumps need oil.", "qas": [{"question": "What do pumps need?", "answers": [{"text": "oil", "answer_start": 11}]}]}, {"context": "Valves need grease.", "qas": []}]}]}')
    data = load_dataset(squad)
    assert not data.spans and data.questions[0].document_id == "T-0"
    scores = evaluate(squad, embed, chunker(), embedding_model="test", ndim=DIM)
    assert scores["bm25"]["recall@1"] == 1.0 and "unreachable" not in scores["bm25"]


# -- extractive answers -------------------------------------------------------------------------


def test_sentences_are_split_without_cutting_abbreviations() -> None:
    text = "The U.S. Army, e.g. its 3rd division, moved. J. Smith led it! Then it ended.\n\nA heading\nMore."
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "The U.S. Army, e.g. its 3rd division, moved.", "J. Smith led it!", "Then it ended.", "A heading\nMore.",
    ]


def test_the_best_sentence_and_a_close_second_are_chosen_in_reading_order() -> None:
    scored = [(0.9, 2, 0, "Seals are replaced every 4000 hours."), (0.85, 1, 3, "The seal is a cartridge seal."),
              (0.2, 1, 0, "Pumps are blue and quite large."), (0.95, 1, 1, "Seal.")]
    # "Seal." is too short to be an answer; the second best is within the margin; sources then positions.
    assert choose_sentences(scored) == [(1, 3, "The seal is a cartridge seal."), (2, 0, "Seals are replaced every 4000 hours.")]
    assert choose_sentences(scored, margin=0.01) == [(2, 0, "Seals are replaced every 4000 hours.")]


def test_extracted_sentences_are_verbatim_and_cited() -> None:
    sources = [Source(1, "d1", 11, "T1", "a.txt", 3, "x"), Source(2, "d2", 22, "T2", "b.txt", None, "y")]
    text, citations = extractive_answer([(2, 0, "Seals last a year."), (1, 1, "Oil it weekly.")], sources)
    assert text == "Seals last a year. [2] Oil it weekly. [1]"
    assert [(c.index, c.chunk_id, c.page, c.quote, c.supported) for c in citations] == [
        (2, 22, None, "Seals last a year.", True), (1, 11, 3, "Oil it weekly.", True)]


class ScoringDocuments:
    """Stands in for DocumentService: scores sentences by the share of question words they hold."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    async def sentence_scores(self, question: str, sentences: list[str]) -> list[float]:
        self.asked.append(sentences)
        q = set(question.lower().rstrip("?").split())
        return [len(q & set(s.lower().rstrip(".").split())) / len(q) for s in sentences]


def test_extract_answers_from_the_sources_without_generation() -> None:
    docs = ScoringDocuments()
    service = AskService(docs, None, None, default_model=None)  # type: ignore[arg-type]
    sources = [
        Source(1, "manual", 7, "Manual", "m.pdf", 2,
               "Pumps are painted blue. The mechanical seal is replaced every 4000 hours. Bearings use lithium grease."),
        Source(2, "notes", 9, "Notes", "n.txt", None, "Nothing about seals here at all."),
    ]
    answer = asyncio.run(service.extract("how often is the mechanical seal replaced?", sources, manifest("m")))
    assert answer.answer == "The mechanical seal is replaced every 4000 hours. [1]"
    assert answer.grounded and answer.answer_mode == "extractive" and answer.usage["completion_tokens"] == 0
    assert answer.citations[0].chunk_id == 7 and answer.citations[0].page == 2
    assert len(docs.asked[0]) == 4


def test_auto_extracts_for_base_models_only() -> None:
    service = AskService(ScoringDocuments(), None, None, default_model=None, answer_mode="auto")  # type: ignore[arg-type]
    assert service.extracts(manifest("base", instruction_tuned=False), None)
    assert not service.extracts(manifest("chat"), None)
    assert not service.extracts(manifest("base", instruction_tuned=False), "generative")
    assert service.extracts(manifest("chat"), "extractive")
