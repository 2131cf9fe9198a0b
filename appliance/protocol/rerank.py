"""Wire types of /v1/rerank, in the shape llama-server, Jina and Cohere share.

Request: `model`, `query`, `documents` (strings, or objects with a `text` field as Jina and Cohere's
older API send), `top_n`, `return_documents`. Response: `results` sorted by `relevance_score`, best
first, each with the document's `index` in the request; `usage` counts the tokens of the
(query, document) pairs the model read.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from appliance.errors import InvalidRequest

MAX_RERANK_DOCUMENTS = 1000
"""Documents one request may rank (each is one pass of the cross-encoder)."""


class DocumentIn(msgspec.Struct, kw_only=True):
    """A document as an object; fields other than `text` (title, id...) are accepted and ignored."""

    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    model: str
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=10_000)]
    documents: Annotated[list[str | DocumentIn], msgspec.Meta(min_length=1, max_length=MAX_RERANK_DOCUMENTS)]
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Return only the best n (default: all)."""
    return_documents: bool = True
    """Echo each document's text in its result."""

    def texts(self) -> list[str]:
        """The documents as strings, after checking the query says something."""
        if not self.query.strip():
            raise InvalidRequest("query is empty; send the text to rank the documents against.", param="query")
        return [d if isinstance(d, str) else d.text for d in self.documents]


class DocumentOut(msgspec.Struct):
    text: str


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: int
    """Position of the document in the request's `documents`."""
    relevance_score: float
    """Sigmoid of the cross-encoder's logit: the probability, in 0..1, that the document is relevant."""
    document: DocumentOut | None = None


class RerankUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(msgspec.Struct):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    object: str = "list"
