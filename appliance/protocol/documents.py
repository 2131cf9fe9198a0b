"""Wire types of the collections, documents and search API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from appliance.types import SearchFilter


class CreateCollection(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class DocumentIn(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    id: str | None = None
    title: str | None = None
    metadata: dict[str, str | int | float | bool] = {}


class SearchRequest(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(max_length=10_000)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    mode: Literal["hybrid", "bm25", "vector"] = "hybrid"
    filter: SearchFilter | None = None
    rerank: bool = False
    """Reorder the best candidates with the cross-encoder retrieval.rerank_model; scores become 0..1."""


class SearchHit(msgspec.Struct):
    document_id: str
    chunk_id: int
    title: str
    source: str
    page: int | None
    heading: str | None
    text: str
    start: int
    end: int
    score: float
    snippet: str
    highlights: list[tuple[int, int]]
    metadata: dict[str, Any]


class SearchResponse(msgspec.Struct):
    query: str
    mode: str
    data: list[SearchHit]
    object: str = "list"


class AskRequest(msgspec.Struct, forbid_unknown_fields=True):
    question: Annotated[str, msgspec.Meta(max_length=10_000)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 5
    stream: bool = False
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    rerank: bool = False
    """Choose the sources after reordering the candidates with retrieval.rerank_model."""
    answer_mode: Literal["generative", "extractive", "auto"] | None = None
    """generative: the model writes the answer; extractive: the best source sentences, verbatim, with
    citations, no generation; auto: extractive for base models and when a generated answer fails its
    citation check. Default: the server's retrieval.answer_mode."""


# -- grounded answers ---------------------------------------------------------------------------


class Source(msgspec.Struct):
    index: int
    document_id: str
    chunk_id: int
    title: str
    source: str
    page: int | None
    text: str


class Citation(msgspec.Struct):
    index: int
    document_id: str
    chunk_id: int
    title: str
    page: int | None
    quote: str
    """The passage of the source that best supports the sentence."""
    sentence: str
    supported: bool
    inferred: bool = False
    """True when the model gave no marker and the source was matched by content."""


class Answer(msgspec.Struct):
    answer: str
    citations: list[Citation]
    sources: list[Source]
    grounded: bool
    model: str
    usage: dict[str, int]
    quarantined: list[dict[str, str]] = msgspec.field(default_factory=list)
    """Retrieved chunks the injection guardrail kept out of the prompt (document and chunk ids)."""
    answer_mode: str = "generative"
    """How this answer was made: "generative" (written by the model) or "extractive" (source sentences)."""
