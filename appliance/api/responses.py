"""POST /v1/responses: OpenAI's Responses API for text, as newer SDKs and agent frameworks call it.
Thin: the request becomes a chat request once; the answer is shaped as a response object, or streamed
as its typed events (response.created ... response.output_text.delta ... response.completed)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from appliance.api.errors import error_body
from appliance.api.http import SSE_HEADERS, json_response, sse, sse_event
from appliance.api.openai import _cache_headers, _cache_scope
from appliance.errors import ApplianceError
from appliance.policy.gateway import RequestContext
from appliance.protocol.openai import decode_request
from appliance.protocol.openai_responses import (
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
    ResponsesUsage,
    new_message_id,
    new_response_id,
)
from appliance.protocol.responses import now
from appliance.services.generation import Generation
from appliance.services.routing import RoutingService
from appliance.types import Usage

def _response(
    body: ResponsesRequest, rid: str, created: int, model: str, mid: str, text: str | None,
    finish: str | None, usage: Usage | None,
) -> ResponseObject:
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    output = [] if text is None else [OutputMessage(mid, [OutputText(text)], status)]
    return ResponseObject(
        id=rid, created_at=created, model=model, status=status, output=output,
        usage=None if usage is None else ResponsesUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
        incomplete_details=IncompleteDetails("max_output_tokens") if finish == "length" else None,
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, temperature=body.temperature,
        top_p=body.top_p, metadata=body.metadata or {},
    )


async def _events(body: ResponsesRequest, generation: Generation) -> AsyncIterator[bytes]:
    rid, mid, created, model = new_response_id(), new_message_id(), now(), generation.manifest.id
    seq = 0

    def event(kind: str, **fields: object) -> bytes:
        nonlocal seq
        seq += 1
        return sse_event({"type": kind, "sequence_number": seq - 1, **fields}, kind)

    def error(exc: ApplianceError) -> bytes:
        return event("error", **msgspec.to_builtins(error_body(exc).error))

    async def events() -> AsyncIterator[bytes]:
        yield event("response.created", response=_response(body, rid, created, model, mid, None, None, None))
        yield event("response.in_progress", response=_response(body, rid, created, model, mid, None, None, None))
        item = OutputMessage(mid, [], "in_progress")
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=OutputText(""))
        parts: list[str] = []
        async for piece in generation:
            if piece.text:
                parts.append(piece.text)
                yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                            delta=piece.text, logprobs=[])
            if piece.usage is not None:
                text = "".join(parts)
                done = _response(body, rid, created, model, mid, text, piece.finish_reason, piece.usage)
                yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                            logprobs=[])
                yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                            part=OutputText(text))
                yield event("response.output_item.done", output_index=0, item=done.output[0])
                kind = "response.completed" if done.status == "completed" else "response.incomplete"
                yield event(kind, response=done)

    async for chunk in sse(events(), done=False, on_error=error, close=generation.aclose):
        yield chunk


@post("/v1/responses", status_code=200, opt={
    "request": ResponsesRequest, "response": ResponseObject, "stream": ResponseStreamEvent,
    "summary": "OpenAI Responses API: text input and output, instructions, streaming events",
})
async def create_response(
    request: Request, routing_service: RoutingService, ctx: RequestContext
) -> Response[bytes] | Stream:
    body: ResponsesRequest = decode_request(await request.body(), ResponsesRequest)
    generation = await routing_service.chat(
        body.to_chat(), ctx, tenant=ctx.tenant.name, cache_scope=_cache_scope(request, ctx)
    )
    headers = _cache_headers(generation)
    if body.stream:
        return Stream(_events(body, generation), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    text, finish, usage = await generation.collect()
    out = _response(body, new_response_id(), now(), generation.manifest.id, new_message_id(), text, finish, usage)
    return json_response(out, headers=headers)
