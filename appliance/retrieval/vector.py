"""Approximate nearest neighbours with usearch HNSW, cosine, f16 storage (the only usearch importer).

usearch's `save()` truncates and rewrites its target in place with no fsync, so saves go to a temp
file that is fsynced and renamed over the old one; the index is loaded into memory (never `view`ed),
so replacing the file can never pull pages out from under a reader. usearch must not be imported
before onnxruntime (2.26.2-2.26.6 crash then); the pin in pyproject avoids those versions and the
engines import onnxruntime first anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from usearch.index import Index

from appliance.storage.files import fsync_dir



class VectorIndex:
    def __init__(self, path: Path, ndim: int) -> None:
        self.path = path
        self.ndim = ndim
        self._index = Index(ndim=ndim, metric="cos", dtype="f16")
        if path.exists():
            self._index.load(str(path))
            if self._index.ndim != ndim:
                raise ValueError(f"{path} holds {self._index.ndim}-dimensional vectors, expected {ndim}")

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: list[int], vectors: np.ndarray) -> None:
        if keys:
            # usearch parallelises one add itself (threads=0: all cores); never add from several threads.
            self._index.add(np.asarray(keys, dtype=np.uint64), np.asarray(vectors, dtype=np.float32), threads=0)

    def remove(self, keys: list[int]) -> None:
        present = [k for k in keys if self._index.contains(k)]
        if present:
            self._index.remove(np.asarray(present, dtype=np.uint64))

    def get(self, keys: list[int]) -> np.ndarray:
        return np.asarray(self._index.get(np.asarray(keys, dtype=np.uint64)), dtype=np.float32)

    def contains(self, key: int) -> bool:
        return bool(self._index.contains(key))

    def search(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        """(key, cosine similarity) best first."""
        if len(self._index) == 0:
            return []
        matches = self._index.search(np.asarray(vector, dtype=np.float32), min(limit, len(self._index)))
        return [(int(k), 1.0 - float(d)) for k, d in zip(matches.keys, matches.distances)]

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        self._index.save(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def reset(self) -> None:
        self._index = Index(ndim=self.ndim, metric="cos", dtype="f16")
