"""POST /v1/feedback: a user's verdict on an answer, stored beside its usage record. Thin: decode, store, encode."""

from __future__ import annotations

import asyncio

from litestar import Request, Response, post

from appliance.api.http import json_response
from appliance.policy.gateway import Gateway, RequestContext
from appliance.protocol.feedback import FeedbackOut, FeedbackRequest
from appliance.protocol.openai import decode_request


@post("/v1/feedback", status_code=200, opt={
    "request": FeedbackRequest, "response": FeedbackOut,
    "summary": "A verdict (-1..1, optional comment) on one of this tenant's answers, by its X-Request-Id",
})
async def feedback(request: Request, gateway: Gateway, ctx: RequestContext) -> Response[bytes]:
    body: FeedbackRequest = decode_request(await request.body(), FeedbackRequest)
    principal = ctx.principal
    assert principal is not None  # the gateway middleware authenticated the request
    comment = body.comment.strip() if body.comment else None
    stored = await asyncio.to_thread(  # an fsync'd SQLite write: off the loop
        gateway.experiments.add_feedback, body.request_id, tenant=principal.tenant, key_id=principal.key_id,
        score=body.score, comment=comment or None,
    )
    return json_response(FeedbackOut(
        id=f"fb_{stored.id}", object="feedback", created=int(stored.ts), request_id=stored.request_id,
        score=stored.score, comment=stored.comment, model=stored.model, variant=stored.variant,
    ))
