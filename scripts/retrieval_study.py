"""Compare fusion and document-score variants on cached candidates, so each change is measured on its own.

`dump` ingests a dataset (either eval format) into a temporary collection, with or without contextual
chunk headers, and saves each question's BM25 and vector candidates (pool 150, as a search for 30 hits
asks) with the chunk texts; `score` replays each ranker (each half alone, the fixed fusion, RRF, the per-query
fusion, with and without a document prior) on the saved candidates and prints MRR@10 and R@1. Choices are made on dev sets only; the test split and
XQuAD are scored once, with what was chosen.

    .venv/bin/python scripts/retrieval_study.py dump DATASET --out CACHE.pkl [--no-headers]
    .venv/bin/python scripts/retrieval_study.py score CACHE.pkl [CACHE.pkl ...]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.engines.onnx import OnnxEmbeddingEngine  # noqa: E402  (onnxruntime before usearch)
from appliance.retrieval import fusion  # noqa: E402
from appliance.retrieval.chunking import Chunker  # noqa: E402
from appliance.retrieval.collection import Collection  # noqa: E402
from appliance.retrieval.evaluate import POOL, _metrics, contains, load_dataset, scope  # noqa: E402
from appliance.settings import Settings  # noqa: E402


def dump(dataset: Path, out: Path, headers: bool) -> None:
    mdir = Settings().models_dir / "all-minilm-l6-v2"
    engine = OnnxEmbeddingEngine(mdir / "model.onnx", mdir / "tokenizer.json", model_id="all-minilm-l6-v2",
                                 max_length=256, batch_size=32, n_threads=os.cpu_count() or 1, gpu="off")
    chunker = Chunker(lambda t: engine.count_tokens(t, special=False), max_tokens=256)

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(engine.embed(texts).vectors, dtype=np.float32)

    data = load_dataset(dataset)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        col = Collection(Path(tmp) / "c", embedding_model="m", ndim=384, chunker=chunker, context_headers=headers)
        col.ingest(data.documents, embed)
        print(f"ingested {len(data.documents)} documents, {col.stats()['chunks']} chunks in {time.time() - started:.0f} s", flush=True)
        vectors = embed([q.question for q in data.questions])
        everything = max(POOL, col.stats()["chunks"])
        rows = []
        texts: dict[int, str] = {}
        for q, vec in zip(data.questions, vectors):
            found = col.candidates(q.question, mode="hybrid", query_vector=vec, pool=everything if q.scoped else POOL, flt=scope(q))
            missing = [k for k in found.documents if k not in texts]
            texts.update({k: h.text for k, h in col.chunks(missing).items()})
            rows.append((q, found))
        gold_texts = {d: col.chunk_texts(d) for d in {q.document_id for q in data.questions}}
        col.close()
    with out.open("wb") as f:
        pickle.dump({"spans": data.spans, "rows": rows, "texts": texts, "gold_texts": gold_texts,
                     "titles": {d.id: d.title for d in data.documents}}, f)
    print(f"{out}: {len(rows)} questions in {time.time() - started:.0f} s")


def with_document_prior(rank, weight: float, best: int = 1):
    """`rank`, then each chunk raised by `weight` x its document's score (the sum of the document's `best`
    best fused chunk scores, over the best document's): a long document's many chunks rank as a whole."""

    def ranked(found: fusion.Candidates) -> list[tuple[int, float]]:
        base = rank(found)
        per_doc: dict[str, list[float]] = {}
        for key, value in base:
            per_doc.setdefault(found.documents[key], []).append(value)
        doc_score = {d: sum(sorted(v, reverse=True)[:best]) for d, v in per_doc.items()}
        top = max(doc_score.values(), default=1.0) or 1.0
        return sorted(((k, v + weight * doc_score[found.documents[k]] / top) for k, v in base), key=lambda kv: (-kv[1], kv[0]))

    return ranked


RANKERS = {
    "bm25": lambda c: c.lexical,
    "vector": lambda c: c.vector,
    "fixed 0.6/0.4": lambda c: fusion.fuse_hybrid(c, "fixed"),
    "rrf k=60": lambda c: fusion.rrf(c.lexical, c.vector),
    "adaptive (per query)": lambda c: fusion.fuse_hybrid(c, "adaptive"),
    "fixed + doc prior (best)": with_document_prior(lambda c: fusion.fuse_hybrid(c, "fixed"), 0.2),
    "fixed + doc prior (top 3)": with_document_prior(lambda c: fusion.fuse_hybrid(c, "fixed"), 0.1, best=3),
    "adaptive + doc prior (best)": with_document_prior(lambda c: fusion.fuse_hybrid(c, "adaptive"), 0.2),
}


def score(paths: list[Path]) -> None:
    caches = []
    for path in paths:
        with path.open("rb") as f:
            caches.append((path.stem, pickle.load(f)))
    print(f"{'MRR@10 / R@1':<32}" + "".join(f"{name:>22}" for name, _ in caches))
    for name, rank in RANKERS.items():
        cells = []
        for _, cache in caches:
            ranks = [
                _rank_of(q, [k for k, _ in rank(found)[:30]], found.documents, cache["texts"], cache["spans"])
                for q, found in cache["rows"]
            ]
            m = _metrics(ranks)
            cells.append(f"{m['mrr@10']:.4f} / {m['recall@1']:.4f}")
        print(f"{name:<32}" + "".join(f"{c:>22}" for c in cells), flush=True)


def _rank_of(q, ranking: list[int], documents: dict[int, str], texts: dict[int, str], spans: bool) -> int | None:
    if not spans:
        seen = list(dict.fromkeys(documents[k] for k in ranking))
        return seen.index(q.document_id) + 1 if q.document_id in seen else None
    for i, k in enumerate(ranking, 1):
        if documents.get(k) == q.document_id and contains(texts[k], q.answers):
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("dataset", type=Path)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--no-headers", action="store_true")
    s = sub.add_parser("score")
    s.add_argument("caches", type=Path, nargs="+")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.dataset, args.out, not args.no_headers)
    else:
        score(args.caches)


if __name__ == "__main__":
    main()
