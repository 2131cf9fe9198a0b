"""POST /v1/rerank (and the aliases llama-server answers). Thin: decode, call the rerank service, encode."""

from __future__ import annotations

import uuid

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from appliance.api.cluster import forward_if_needed
from appliance.peering.cluster import Cluster
from appliance.policy.gateway import RequestContext
from appliance.protocol.openai import decode_request
from appliance.protocol.rerank import DocumentOut, RerankRequest, RerankResponse, RerankResult, RerankUsage
from appliance.services.rerank import RerankService

RERANK_PATHS = ["/v1/rerank", "/v1/reranking", "/rerank", "/reranking"]
"""The paths llama-server serves reranking on; Jina and Cohere clients use /v1/rerank."""


@post(
    RERANK_PATHS,
    status_code=200,
    opt={
        "request": RerankRequest,
        "response": RerankResponse,
        "summary": "Rank documents by relevance to a query with a cross-encoder (llama-server / Jina / Cohere shape)",
    },
)
async def rerank(
    request: Request, rerank_service: RerankService, ctx: RequestContext, cluster: Cluster
) -> Response[bytes] | Stream:
    raw = await request.body()
    body: RerankRequest = decode_request(raw, RerankRequest)
    if (forwarded := await forward_if_needed(cluster, ctx, request, raw, body.model)) is not None:
        return forwarded
    texts = body.texts()
    ranking = await rerank_service.rerank(body.model, body.query, texts, top_n=body.top_n, policy=ctx)
    results = [
        RerankResult(r.index, r.relevance_score, DocumentOut(texts[r.index]) if body.return_documents else None)
        for r in ranking.results
    ]
    usage = RerankUsage(ranking.prompt_tokens, ranking.prompt_tokens)
    answer = RerankResponse(f"rerank-{uuid.uuid4().hex}", ranking.model, results, usage)
    return Response(msgspec.json.encode(answer), media_type="application/json")
