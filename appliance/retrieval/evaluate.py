"""Retrieval quality on a dataset of questions with a gold document (and, for long documents, a gold span).

Two formats:
- SQuAD JSON (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`): each paragraph becomes a
  document; a question's rank is the position of its paragraph among the distinct documents retrieved.
- Long-document QA (`{"format": "appliance-longqa/1", "documents": [{"id", "title", "sections":
  [{"heading", "text"}]}], "questions": [{"id", "question", "document_id", "answers": [span, ...]}]}`):
  each document is chunked like any ingested file; a retrieved chunk is a hit when it is a chunk of the
  question's document and contains one of its answer texts (case and spacing ignored). A question
  whose answer no chunk holds whole (cut at a chunk boundary) counts as a miss in every mode, and the
  report says how many there were (`unreachable`). A question with `"scope": "document"` is asked of
  its document alone (the search is filtered to it), for datasets whose questions are generic.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from appliance.retrieval.chunking import Chunker
from appliance.retrieval.collection import Collection, DocumentInput, SearchFilter
from appliance.retrieval.fusion import Candidates, fuse_hybrid
from appliance.retrieval.parsing import Section

Embed = Callable[[list[str]], np.ndarray]
Rerank = Callable[[str, list[str]], list[float]]
"""(query, documents) -> one relevance logit per document: a cross-encoder's `score`."""
Ranker = Callable[[Candidates], list[tuple[int, float]]]
MODES = ("bm25", "vector", "hybrid")
RERANKED = "hybrid+rerank"
LONGQA_FORMAT = "appliance-longqa/1"
DEPTH = 30
"""Hits looked at per question (MRR@10 and recall@10 need 10; the reranker gets the best 20)."""
POOL = 150
"""Candidates each half returns, as a search for DEPTH hits asks (five times top_k)."""


class EvalQuestion(msgspec.Struct, frozen=True):
    question: str
    document_id: str
    answers: list[str] = []
    """Gold answer texts; empty: any chunk of the document is a hit (SQuAD paragraphs)."""
    scoped: bool = False
    """Asked of its document alone (`"scope": "document"`): the search is filtered to it."""


class EvalSet(msgspec.Struct, frozen=True):
    documents: list[DocumentInput]
    questions: list[EvalQuestion]
    spans: bool
    """True: hits are chunks that contain the answer; False: the rank of the gold document."""


def load_squad(path: Path, limit: int | None = None) -> tuple[list[DocumentInput], list[tuple[str, str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    docs, questions = [], []
    for article in data["data"]:
        for i, para in enumerate(article["paragraphs"]):
            doc_id = f"{article.get('title', 'doc')}-{i}"
            docs.append(DocumentInput(doc_id, article.get("title", ""), path.name, [Section(para["context"])]))
            questions.extend((qa["question"], doc_id) for qa in para["qas"])
    if limit:
        questions = questions[:limit]
    return docs, questions


def load_longqa(path: Path, limit: int | None = None) -> EvalSet:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != LONGQA_FORMAT:
        raise ValueError(f"{path} is not in the {LONGQA_FORMAT} format")
    docs = [
        DocumentInput(
            d["id"], d.get("title") or d["id"], path.name,
            [Section(s["text"], heading=s.get("heading"), heading_chars=0) for s in d["sections"] if s["text"].strip()],
        )
        for d in data["documents"]
    ]
    questions = [
        EvalQuestion(q["question"], q["document_id"], [a for a in q["answers"] if a.strip()], q.get("scope") == "document")
        for q in data["questions"]
    ]
    questions = [q for q in questions if q.answers]
    return EvalSet(docs, questions[:limit] if limit else questions, True)


def load_dataset(path: Path, limit: int | None = None) -> EvalSet:
    """Either format, told apart by the long-document format's `format` key."""
    with path.open(encoding="utf-8") as f:
        head = f.read(4096)
    if LONGQA_FORMAT in head:
        return load_longqa(path, limit)
    docs, questions = load_squad(path, limit)
    return EvalSet(docs, [EvalQuestion(q, d) for q, d in questions], False)


def evaluate(
    dataset: Path,
    embed: Embed,
    chunker: Chunker,
    *,
    embedding_model: str,
    ndim: int,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    rerank: Rerank | None = None,
    rerank_candidates: int = 20,
    context_headers: bool = False,
    fusion: str = "fixed",
    rankers: dict[str, Ranker] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics per mode; with `rerank`, also the hybrid search's best `rerank_candidates` chunks
    reordered by the cross-encoder (the "hybrid+rerank" row). `rankers` replaces the modes with named
    functions of the two halves' candidates (for comparing fusions on one index)."""
    data = load_dataset(dataset, limit)
    rankers = rankers or {"bm25": lambda c: c.lexical, "vector": lambda c: c.vector,
                          "hybrid": lambda c: fuse_hybrid(c, fusion)}
    with tempfile.TemporaryDirectory(prefix="appliance-eval-") as tmp:
        col = Collection(Path(tmp) / "eval", embedding_model=embedding_model, ndim=ndim, chunker=chunker,
                         context_headers=context_headers, fusion=fusion)
        col.ingest(data.documents, embed)
        scores = evaluate_on(col, data, embed, rankers, progress=progress, rerank=rerank,
                             rerank_candidates=rerank_candidates)
        col.close()
    return scores


def evaluate_on(
    col: Collection,
    data: EvalSet,
    embed: Embed,
    rankers: dict[str, Ranker],
    *,
    progress: Callable[[int], None] | None = None,
    rerank: Rerank | None = None,
    rerank_candidates: int = 20,
) -> dict[str, dict[str, float]]:
    vectors = embed([q.question for q in data.questions])
    everything = max(POOL, col.stats()["chunks"])  # a filtered search looks at every chunk, as the service's does
    ranks: dict[str, list[int | None]] = {m: [] for m in (*rankers, *([RERANKED] if rerank else []))}
    for q, vec in zip(data.questions, vectors):
        found = col.candidates(q.question, mode="hybrid", query_vector=vec, pool=everything if q.scoped else POOL, flt=scope(q))
        rankings = {name: rank(found)[:DEPTH] for name, rank in rankers.items()}
        texts = col.chunks(list({k for r in rankings.values() for k, _ in r})) if data.spans else {}
        for name, ranking in rankings.items():
            ranks[name].append(_rank_of(q, [k for k, _ in ranking], found.documents, texts, data.spans))
        if rerank is not None:
            pool = [k for k, _ in rankings["hybrid"][:rerank_candidates]]
            details = col.chunks(pool)
            logits = rerank(q.question, [details[k].text for k in pool])
            order = [pool[i] for i in sorted(range(len(pool)), key=lambda i: -logits[i])]
            ranks[RERANKED].append(_rank_of(q, order, found.documents, texts or details, data.spans))
        if progress:
            progress(1)
    out = {mode: _metrics(r) for mode, r in ranks.items()}
    if data.spans:
        chunk_texts = {d: col.chunk_texts(d) for d in {q.document_id for q in data.questions}}
        unreachable = sum(1 for q in data.questions if not any(contains(t, q.answers) for t in chunk_texts[q.document_id]))
        for m in out.values():
            m["unreachable"] = unreachable
    return out


def scope(q: EvalQuestion) -> SearchFilter | None:
    return SearchFilter(document_id=q.document_id) if q.scoped else None


def _rank_of(
    q: EvalQuestion, ranking: list[int], documents: dict[int, str], texts: dict, spans: bool
) -> int | None:
    if not spans:
        return _rank([documents[k] for k in ranking], q.document_id)
    for i, k in enumerate(ranking, 1):
        if documents.get(k) == q.document_id and contains(texts[k].text, q.answers):
            return i
    return None


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def contains(text: str, answers: list[str]) -> bool:
    """The text holds one of the answer texts (case- and space-insensitive)."""
    norm = _norm(text)
    return any(_norm(a) in norm for a in answers if a.strip())


def _rank(document_ids: list[str], gold: str) -> int | None:
    """1-based position of the gold document among the distinct documents of the hits."""
    seen = list(dict.fromkeys(document_ids))
    return seen.index(gold) + 1 if gold in seen else None


def _metrics(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks) or 1

    def recall(k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / n

    mrr = sum(1.0 / r for r in ranks if r is not None and r <= 10) / n
    return {"recall@1": round(recall(1), 4), "recall@5": round(recall(5), 4), "recall@10": round(recall(10), 4),
            "mrr@10": round(mrr, 4), "questions": len(ranks)}


def answer_hits(answer: str, gold: list[str]) -> bool:
    """The generated answer contains one of the gold answer texts (case- and space-insensitive)."""
    return contains(answer, gold)


def load_squad_answers(path: Path, limit: int | None) -> list[tuple[str, str, list[str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for i, para in enumerate(article["paragraphs"]):
            doc_id = f"{article.get('title', 'doc')}-{i}"
            for qa in para["qas"]:
                out.append((qa["question"], doc_id, [a["text"] for a in qa.get("answers", [])]))
    return out[:limit] if limit else out
