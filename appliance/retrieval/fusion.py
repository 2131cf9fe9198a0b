"""Fusing BM25 and vector rankings.

Plain reciprocal rank fusion throws the scores away, so a confident BM25 hit and a marginal one
count the same; on technical text, where BM25 is strong and MiniLM weaker, that loses to BM25 alone.
The default here is a weighted sum of normalised scores: each list is scaled to [0, 1] by its own
best score (BM25) or its own range (cosine), so a document both halves like wins, and a half that is
much surer than the other decides.
"""

from __future__ import annotations

import msgspec

LEXICAL_WEIGHT = 0.6
RRF_K = 60


def _by_max(scores: list[tuple[int, float]]) -> dict[int, float]:
    top = max((s for _, s in scores), default=0.0)
    return {k: s / top for k, s in scores} if top > 0 else {}


def _by_range(scores: list[tuple[int, float]]) -> dict[int, float]:
    if not scores:
        return {}
    hi = max(s for _, s in scores)
    lo = min(s for _, s in scores)
    span = hi - lo
    return {k: (s - lo) / span if span > 1e-9 else 1.0 for k, s in scores}


def fuse(
    lexical: list[tuple[int, float]], vector: list[tuple[int, float]], *, lexical_weight: float = LEXICAL_WEIGHT
) -> list[tuple[int, float]]:
    lex, vec = _by_max(lexical), _by_range(vector)
    keys = set(lex) | set(vec)
    scored = {k: lexical_weight * lex.get(k, 0.0) + (1 - lexical_weight) * vec.get(k, 0.0) for k in keys}
    return sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))


def rrf(lexical: list[tuple[int, float]], vector: list[tuple[int, float]], k: int = RRF_K) -> list[tuple[int, float]]:
    scored: dict[int, float] = {}
    for ranking in (lexical, vector):
        for rank, (key, _) in enumerate(ranking):
            scored[key] = scored.get(key, 0.0) + 1.0 / (k + rank + 1)
    return sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))


class Candidates(msgspec.Struct):
    """Each half's ranking of one query, before fusion."""

    lexical: list[tuple[int, float]]
    """(chunk id, BM25 score), best first."""
    vector: list[tuple[int, float]]
    """(chunk id, cosine similarity), best first."""
    documents: dict[int, str]
    """The document of each candidate chunk."""
    terms: list[str] = []
    """The query's words as BM25 searched them."""


def fuse_hybrid(found: Candidates) -> list[tuple[int, float]]:
    """The hybrid ranking the collection serves."""
    return fuse(found.lexical, found.vector)
