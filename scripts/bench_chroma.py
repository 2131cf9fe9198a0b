"""chromadb side of scripts/bench_retrieval.py: same corpus, same vectors, same query embedding model.

Run by bench_retrieval.py with the python of .bench/venv-chroma (chromadb installed there, kept out of
the appliance's dependencies). Prints one JSON line: build seconds and query latency percentiles.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.engines.onnx import OnnxEmbeddingEngine  # noqa: E402


def main() -> None:
    corpus, questions_file, model_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import chromadb

    data = np.load(corpus, allow_pickle=False)
    texts, vectors = list(data["texts"]), data["vectors"]
    questions = json.loads(questions_file.read_text())
    engine = OnnxEmbeddingEngine(model_dir / "model.onnx", model_dir / "tokenizer.json", model_id="m", max_length=256,
                                 batch_size=32, n_threads=None, gpu="off")
    with tempfile.TemporaryDirectory() as tmp:
        client = chromadb.PersistentClient(path=tmp)
        col = client.create_collection("bench", metadata={"hnsw:space": "cosine"})
        t = time.perf_counter()
        step = 5000
        for i in range(0, len(texts), step):
            col.add(ids=[str(k) for k in range(i, min(i + step, len(texts)))], documents=texts[i:i + step],
                    embeddings=vectors[i:i + step].tolist())
        build = time.perf_counter() - t
        times = []
        for q in questions:
            t = time.perf_counter()
            vec = engine.embed([q]).vectors[0]
            col.query(query_embeddings=[vec], n_results=10)
            times.append(time.perf_counter() - t)
    times.sort()
    pick = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    print(json.dumps({"build_s": round(build, 1), "p50_ms": round(pick(0.5) * 1000, 2), "p99_ms": round(pick(0.99) * 1000, 2)}))


if __name__ == "__main__":
    main()
