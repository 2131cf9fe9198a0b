"""Response caches for deterministic generations: exact match, and optionally semantic.

Only requests whose output is determined by their input are cached (temperature 0, or a fixed
seed). Entries are scoped by tenant, model and every parameter that shapes the output (sampling,
max_tokens, stop strings, schema), so one tenant never receives another's answer and a change of
parameters never returns a stale one. The semantic cache reuses an answer whose prompt embeds
within a cosine threshold of the new prompt, within the same scope.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import numpy as np

from appliance.types import GenerationRequest, Usage


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    usage: Usage


@dataclass
class _Entry:
    answer: CachedAnswer
    expires: float
    scope: str
    vector: np.ndarray | None = None


def deterministic(request: GenerationRequest) -> bool:
    return request.sampling.temperature <= 0 or request.sampling.seed is not None


def scope_of(tenant: str, model_id: str, request: GenerationRequest) -> str:
    """Everything but the prompt that decides the output."""
    params = msgspec.json.encode(
        [tenant, model_id, request.max_tokens, request.stop, request.sampling, request.json_schema, request.tools]
    )
    return hashlib.sha256(params).hexdigest()


class ResponseCache:
    def __init__(self, *, ttl_s: float, max_entries: int, semantic_threshold: float = 0.0) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.semantic_threshold = semantic_threshold
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    @staticmethod
    def key(scope: str, prompt: str) -> str:
        return hashlib.sha256(f"{scope}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry.answer

    def get_similar(self, scope: str, vector: np.ndarray) -> CachedAnswer | None:
        """The freshest answer in `scope` whose prompt vector is within the cosine threshold."""
        if self.semantic_threshold <= 0:
            return None
        now, best, best_score = time.monotonic(), None, self.semantic_threshold
        with self._lock:
            for entry in self._entries.values():
                if entry.scope != scope or entry.vector is None or entry.expires <= now:
                    continue
                score = float(np.dot(entry.vector, vector))
                if score >= best_score:
                    best, best_score = entry.answer, score
        return best

    def put(self, key: str, scope: str, answer: CachedAnswer, vector: np.ndarray | None = None) -> None:
        with self._lock:
            self._entries[key] = _Entry(answer, time.monotonic() + self.ttl_s, scope, vector)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
