"""Reranking: a cross-encoder scores each (query, document) pair; results come back best first.

`relevance_score` is the sigmoid of the model's logit: for a one-logit cross-encoder (the ms-marco
MiniLM family, bge-reranker, jina-reranker) the probability the model gives that the document is
relevant, in 0..1, as Jina and Cohere report it; for a two-label model the softmax probability of
the positive label. Ties keep the documents' order. Scores are comparable within one model only.
"""

from __future__ import annotations

import asyncio
import math

import msgspec

from appliance.engines.registry import ModelRegistry, RerankEngine
from appliance.errors import InvalidRequest, ModelNotFound, SettingsError, UnsupportedForModel
from appliance.modelstore.manifest import Manifest
from appliance.services.policy import OPEN_POLICY, RequestPolicy


class Ranked(msgspec.Struct):
    index: int
    """Position of the document in the input."""
    relevance_score: float


class Ranking(msgspec.Struct):
    model: str
    results: list[Ranked]
    """Best first, at most top_n."""
    prompt_tokens: int
    """Tokens of all the (query, document) pairs the model read."""


def relevance(logit: float) -> float:
    """The sigmoid, written so that neither tail overflows."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


class RerankService:
    def __init__(self, registry: ModelRegistry, *, default_model: str | None = None) -> None:
        """`default_model`: the setting retrieval.rerank_model, used by search and ask. Raises SettingsError
        when it names no registered rerank model."""
        self._registry = registry
        self._default: Manifest | None = None
        if default_model:
            try:
                self._default = registry.resolve(default_model, kinds=("rerank",))
            except ModelNotFound:
                raise SettingsError(
                    f"retrieval.rerank_model: no model named {default_model!r} is registered (import one with "
                    "`appliance models import MODEL.onnx --kind rerank --tokenizer tokenizer.json`)"
                ) from None
            except UnsupportedForModel as exc:
                raise SettingsError(f"retrieval.rerank_model: {exc.message}") from None

    def default(self) -> Manifest:
        """The configured rerank model, or a 400 that says how to configure one."""
        if self._default is None:
            raise InvalidRequest(
                "rerank was asked for but no rerank model is configured: import a cross-encoder with "
                "`appliance models import MODEL.onnx --kind rerank --tokenizer tokenizer.json` and set "
                "retrieval.rerank_model (or APPLIANCE_RERANK_MODEL).",
                param="rerank",
            )
        return self._default

    async def rerank(
        self,
        model: str | Manifest,
        query: str,
        documents: list[str],
        *,
        top_n: int | None = None,
        policy: RequestPolicy = OPEN_POLICY,
    ) -> Ranking:
        """Rank `documents` against `query` with `model` (a name a client sent, or a resolved manifest)."""
        manifest = model if isinstance(model, Manifest) else self._registry.resolve(model, kinds=("rerank",))
        policy.allow_model(manifest)
        # Query and documents are data to this model, never instructions to one: PII policy only.
        [query, *documents] = await asyncio.to_thread(policy.screen_input, [query, *documents], instructions=False)
        async with self._registry.use(manifest) as engine:
            ranker: RerankEngine = engine
            tokens = await asyncio.to_thread(ranker.count_tokens, query, documents)
            policy.reserve(manifest, tokens, 0)
            logits = await asyncio.to_thread(ranker.score, query, documents)
        # Sorted on the logits: their sigmoids tie at 1.0 for logits far above zero.
        order = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_n]
        return Ranking(manifest.id, [Ranked(i, relevance(logits[i])) for i in order], tokens)
