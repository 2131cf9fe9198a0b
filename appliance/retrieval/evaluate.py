"""Retrieval quality on a SQuAD-format file: each paragraph becomes a document, each question a query."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.retrieval.chunking import Chunker
from appliance.retrieval.collection import Collection, DocumentInput
from appliance.retrieval.parsing import Section

Embed = Callable[[list[str]], np.ndarray]
Rerank = Callable[[str, list[str]], list[float]]
"""(query, documents) -> one relevance logit per document: a cross-encoder's `score`."""
MODES = ("bm25", "vector", "hybrid")
RERANKED = "hybrid+rerank"


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
) -> dict[str, dict[str, float]]:
    """Ranks of the gold paragraph per mode; with `rerank`, also the hybrid search's best
    `rerank_candidates` chunks reordered by the cross-encoder (the "hybrid+rerank" row)."""
    docs, questions = load_squad(dataset, limit)
    with tempfile.TemporaryDirectory(prefix="appliance-eval-") as tmp:
        col = Collection(Path(tmp) / "eval", embedding_model=embedding_model, ndim=ndim, chunker=chunker)
        col.ingest(docs, embed)
        vectors = embed([q for q, _ in questions])
        ranks: dict[str, list[int | None]] = {m: [] for m in (*MODES, *([RERANKED] if rerank else []))}
        for (question, gold), vec in zip(questions, vectors):
            for mode in MODES:
                hits = col.search(question, top_k=30, mode=mode, query_vector=vec, snippets=False)
                ranks[mode].append(_rank([h.document_id for h in hits], gold))
                if mode == "hybrid" and rerank is not None:
                    pool = hits[:rerank_candidates]
                    logits = rerank(question, [h.text for h in pool])
                    order = sorted(range(len(pool)), key=lambda i: -logits[i])
                    ranks[RERANKED].append(_rank([pool[i].document_id for i in order], gold))
            if progress:
                progress(1)
        col.close()
    return {mode: _metrics(r) for mode, r in ranks.items()}


def _rank(document_ids: list[str], gold: str) -> int | None:
    """1-based position of the gold document among the distinct documents of the hits."""
    seen = list(dict.fromkeys(document_ids))
    return seen.index(gold) + 1 if gold in seen else None


def _metrics(ranks: list[int | None]) -> dict[str, float]:
    n = len(ranks) or 1

    def recall(k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / n

    mrr = sum(1.0 / r for r in ranks if r is not None and r <= 10) / n
    return {"recall@1": round(recall(1), 4), "recall@5": round(recall(5), 4), "recall@10": round(recall(10), 4), "mrr@10": round(mrr, 4)}


def answer_hits(answer: str, gold: list[str]) -> bool:
    """The generated answer contains one of the gold answer texts (case- and space-insensitive)."""
    norm = " ".join(answer.lower().split())
    return any(" ".join(g.lower().split()) in norm for g in gold if g.strip())


def load_squad_answers(path: Path, limit: int | None) -> list[tuple[str, str, list[str]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for i, para in enumerate(article["paragraphs"]):
            doc_id = f"{article.get('title', 'doc')}-{i}"
            for qa in para["qas"]:
                out.append((qa["question"], doc_id, [a["text"] for a in qa.get("answers", [])]))
    return out[:limit] if limit else out
