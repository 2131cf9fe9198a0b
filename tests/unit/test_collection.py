"""The collection's commit protocol on real tantivy, usearch and SQLite files, with crashes simulated."""

from __future__ import annotations

import gc
import zlib
from pathlib import Path

import numpy as np
import pytest

from appliance.retrieval.chunking import Chunker
from appliance.retrieval.collection import Collection, DocumentInput, SearchFilter
from appliance.retrieval.parsing import Section

DIM = 256


def embed(texts: list[str]) -> np.ndarray:
    """Bag of hashed words. crc32, not hash(): str hashes change with every process (PYTHONHASHSEED),
    which made word collisions, and so the vector ranking, differ from run to run."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.encode()) % DIM] += 1.0
    return out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-9, None)


def chunker() -> Chunker:
    return Chunker(lambda texts: [len(t.split()) for t in texts], max_tokens=40, overlap_tokens=4)


def open_col(path: Path) -> Collection:
    return Collection(path, embedding_model="test", ndim=DIM, chunker=chunker())


def doc(doc_id: str, text: str, **meta: object) -> DocumentInput:
    return DocumentInput(doc_id, doc_id.title(), f"{doc_id}.txt", [Section(text)], dict(meta))


def ids(col: Collection, query: str, mode: str = "bm25") -> list[str]:
    vec = embed([query])[0]
    return [h.document_id for h in col.search(query, top_k=10, mode=mode, query_vector=vec)]


def test_ingest_search_replace_delete(tmp_path: Path) -> None:
    col = open_col(tmp_path / "c")
    res = col.ingest([doc("a", "pumps need oil"), doc("b", "valves need grease"), doc("a", "dup")], embed)
    assert [(r.document_id, r.status) for r in res] == [("a", "ingested"), ("a", "failed"), ("b", "ingested")]
    assert ids(col, "pumps") == ["a"] and ids(col, "pumps", "vector")[0] == "a"
    assert col.ingest([doc("a", "pumps need oil")], embed)[0].status == "unchanged"
    col.ingest([doc("a", "turbines need steam")], embed)
    assert ids(col, "pumps") == [] and ids(col, "turbines") == ["a"]
    assert col.delete("b") and ids(col, "valves") == [] and not col.delete("b")
    col.close()
    reopened = open_col(tmp_path / "c")
    assert ids(reopened, "turbines") == ["a"] and ids(reopened, "turbines", "vector")[0] == "a"


@pytest.mark.parametrize("crash_in", ["lexical", "vectors", "final"])
def test_a_crash_mid_ingest_leaves_nothing_visible_and_can_resume(tmp_path: Path, crash_in: str) -> None:
    col = open_col(tmp_path / "c")
    col.ingest([doc("kept", "boilers need water")], embed)

    def boom(*_: object) -> None:
        raise SystemExit("simulated crash")

    if crash_in == "lexical":
        col._lexical.commit = boom  # type: ignore[method-assign]
    elif crash_in == "vectors":
        col._vectors.save = boom  # type: ignore[method-assign]
    else:
        col._add_tombstones = boom  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        col.ingest([doc("kept", "boilers need steam now"), doc("new", "compressors need filters")], embed)
    # The process "dies" here (its index writer lock goes with it); a new one opens the same files.
    col._lexical._writer = None
    del col
    gc.collect()
    reopened = open_col(tmp_path / "c")
    states = {d["id"]: d["state"] for d in reopened.documents()}
    assert states == {"kept": "pending", "new": "pending"}
    for query in ("boilers", "compressors", "steam"):
        for mode in ("bm25", "vector", "hybrid"):
            assert ids(reopened, query, mode) == []
    # Resuming re-ingests exactly the interrupted documents, from the text the registry kept.
    results = reopened.ingest(reopened.pending(), embed)
    assert {r.status for r in results} == {"ingested"}
    assert ids(reopened, "steam") == ["kept"] and ids(reopened, "compressors") == ["new"]


def test_filters_and_compaction(tmp_path: Path) -> None:
    col = open_col(tmp_path / "c")
    col.ingest([doc(f"d{i}", f"memo {i} about audits", dept="legal" if i == 3 else "finance") for i in range(10)], embed)
    hits = col.search("audits", top_k=10, mode="hybrid", query_vector=embed(["audits"])[0], flt=SearchFilter(metadata={"dept": "legal"}))
    assert [h.document_id for h in hits] == ["d3"]
    for round_ in range(8):  # replace every document repeatedly: tombstones pile up, then get compacted
        col.ingest([doc(f"d{i}", f"memo {i} revision {round_} about audits") for i in range(10)], embed)
    assert len(col._vectors) == col.stats()["chunks"]


def test_snippets_keep_the_punctuation_around_them(tmp_path: Path) -> None:
    """tantivy's fragments end at the last word; the sentence's full stop, and quotes or brackets, stay."""
    col = Collection(tmp_path / "c", embedding_model="test", ndim=DIM,
                     chunker=Chunker(lambda texts: [len(t.split()) for t in texts], max_tokens=200))
    # 47 "word"s fill tantivy's first 240-character fragment; the second starts at "turbines", after the quote.
    quoted = "word " * 47 + '"turbines need steam."'
    col.ingest([doc("a", "Pumps need oil every week."), doc("b", "Valves need grease (not oil)."),
                doc("c", "Why do compressors need filters?"), doc("q", quoted)], embed)

    def snippet(query: str) -> tuple[str, list[str]]:
        [hit] = col.search(query, top_k=1, mode="bm25", query_vector=None)
        return hit.snippet, [hit.snippet[a:b] for a, b in hit.highlights]

    assert snippet("week") == ("Pumps need oil every week.", ["week"])
    assert snippet("grease") == ("Valves need grease (not oil).", ["grease"])
    assert snippet("compressors") == ("Why do compressors need filters?", ["compressors"])
    assert snippet("turbines steam") == ('"turbines need steam."', ["turbines", "steam"]), "the opening quote too"
    col.close()
