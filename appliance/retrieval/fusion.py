"""Fusing BM25 and vector rankings.

Plain reciprocal rank fusion throws the scores away, so a confident BM25 hit and a marginal one
count the same; on technical text, where BM25 is strong and MiniLM weaker, that loses to BM25 alone.
The default here is a weighted sum of normalised scores: each list is scaled to [0, 1] by its own
best score (BM25) or its own range (cosine), so a document both halves like wins, and a half that is
much surer than the other decides.

`adaptive` fusion sets the weights per query: each half's confidence is the margin of its top hit over
its runner-up (on the development sets that margin predicted whether a half's top hit was right better
than the absolute scores or the halves' agreement did), and BM25 gets more weight when it is sure and
the vector half is not, so that an embedding that sees a 256-token window of a long document, among
many near-identical neighbours, cannot overrule a confident BM25 hit. Measured on the sets here it is a
wash against the fixed weights (+0.001 to -0.003 MRR@10; README), so `fixed` stays the default and
`adaptive` is a setting (retrieval.fusion) to measure where the vector half is weak. Constants were
chosen on development sets only (scripts/retrieval_study.py).
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


LEXICAL_MARGIN_FULL = 0.3
"""BM25's top hit this far (as a share of its score) above the second: BM25 is as sure as it gets."""
VECTOR_MARGIN_FULL = 0.04
"""The best cosine this far above the second: the vector half is as sure as it gets."""
GUARD_GAIN = 0.2
"""Most lexical weight added when BM25 is sure and the vectors are not."""


def confidence(found: Candidates) -> tuple[float, float]:
    """How sure each half is of its own top hit, 0..1, from the margin to its runner-up."""
    lex = [s for _, s in found.lexical]
    vec = [s for _, s in found.vector]
    lexical = 1.0 if len(lex) == 1 else ((lex[0] - lex[1]) / lex[0] if len(lex) > 1 and lex[0] > 0 else 0.0)
    vector = 1.0 if len(vec) == 1 else (vec[0] - vec[1] if len(vec) > 1 else 0.0)
    return min(1.0, lexical / LEXICAL_MARGIN_FULL), min(1.0, max(0.0, vector) / VECTOR_MARGIN_FULL)


def adaptive_weight(found: Candidates) -> float:
    """The lexical weight for this query: LEXICAL_WEIGHT, raised by up to GUARD_GAIN as far as BM25 is
    surer of its top hit than the vector half is of its own (long documents with a weak embedding)."""
    if not found.lexical or not found.vector:
        return LEXICAL_WEIGHT
    lexical, vector = confidence(found)
    return LEXICAL_WEIGHT + GUARD_GAIN * max(0.0, lexical - vector)


FUSIONS = ("fixed", "adaptive")


def fuse_hybrid(found: Candidates, fusion: str = "fixed") -> list[tuple[int, float]]:
    """The hybrid ranking the collection serves: normalised scores, weighted LEXICAL_WEIGHT / the rest
    (`fixed`) or per query (`adaptive`)."""
    weight = adaptive_weight(found) if fusion == "adaptive" else LEXICAL_WEIGHT
    return fuse(found.lexical, found.vector, lexical_weight=weight)
