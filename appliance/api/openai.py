"""OpenAI-compatible routes. Thin: decode, call a service, encode."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Stream

from appliance.api.cluster import cluster_model_list, forward_if_needed, peer_response, route_peers
from appliance.errors import ModelNotFound
from appliance.api.http import SSE_HEADERS, json_response, sse, sse_event
from appliance.peering.cluster import Cluster
from appliance.peering.forward import Forwarded
from appliance.policy.gateway import RequestContext
from appliance.engines.registry import ModelRegistry
from appliance.modelstore.manifest import Manifest
from appliance.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, decode_request
from appliance.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    EmbeddingList,
    FunctionCallOut,
    FunctionDelta,
    ModelCard,
    ModelList,
    RouteCard,
    TextChoice,
    TextCompletion,
    ToolCallDelta,
    ToolCallOut,
    chat_logprobs,
    embedding_list,
    new_id,
    now,
    text_logprobs,
    usage_out,
)
from appliance.services.ask import AskService
from appliance.services.embeddings import EmbeddingService
from appliance.types import Usage
from appliance.services.generation import Generation
from appliance.services.routing import RoutingService
from appliance.services.tools import ToolCallStream, split_calls

log = logging.getLogger(__name__)


async def _chat_events(
    generation: Generation, n: int, logprobs: bool, include_usage: bool, ctx: RequestContext
) -> AsyncIterator[bytes]:
    cid, created, model = new_id("chatcmpl"), now(), generation.manifest.id

    def chunk(index: int, delta: Delta, finish: str | None = None, lp: Any = None, **extra: Any) -> bytes:
        return sse_event(ChatCompletionChunk(cid, created, model, [ChunkChoice(index, delta, finish, lp)], **extra))

    for i in range(n):
        yield chunk(i, Delta(role="assistant", content=""))
    calls = {i: ToolCallStream() for i in range(n)} if generation.tools_offered else {}
    sent = dict.fromkeys(range(n), 0)
    async for piece in generation:
        i, stream = piece.index, calls.get(piece.index)
        text, done = (piece.text, []) if stream is None else stream.feed(piece.text)
        if stream is not None and piece.finish_reason is not None:
            text += stream.finish()
        lp = chat_logprobs(piece.logprobs) if logprobs and piece.logprobs else None
        if text or lp is not None:
            yield chunk(i, Delta(content=text) if text else Delta(), lp=lp)
        for call in done:  # an answer is text or calls, never both: no text follows a call
            # OpenAI's shape: index, id, type and name, then the arguments (in one piece here)
            yield chunk(i, Delta(tool_calls=[ToolCallDelta(sent[i], call.id, "function",
                                                           FunctionDelta(call.name, call.arguments))]))
            sent[i] += 1
        if piece.finish_reason is not None:
            finish = "tool_calls" if stream is not None and stream.calls and piece.finish_reason == "stop" else piece.finish_reason
            # On the last chunk the usage record is written: the guardrail actions are final.
            yield chunk(i, Delta(), finish, **(_guardrail_fields(ctx) if piece.usage is not None else {}))
        if include_usage and piece.usage is not None:
            yield sse_event(ChatCompletionChunk(cid, created, model, [], usage=usage_out(piece.usage)))


async def _completion_events(
    generation: Generation, n: int, logprobs: bool, include_usage: bool, echo: str, ctx: RequestContext
) -> AsyncIterator[bytes]:
    cid, created, model = new_id("cmpl"), now(), generation.manifest.id
    offsets = dict.fromkeys(range(n), len(echo))
    if echo:
        for i in range(n):
            yield sse_event(TextCompletion(cid, created, model, [TextChoice(i, echo, None)]))
    async for piece in generation:
        i = piece.index
        if piece.text or piece.finish_reason is not None or piece.logprobs:
            lp = text_logprobs(piece.logprobs, offsets[i]) if logprobs else None
            offsets[i] += len(piece.text)
            extra = _guardrail_fields(ctx) if piece.usage is not None else {}
            yield sse_event(TextCompletion(cid, created, model, [TextChoice(i, piece.text, piece.finish_reason, lp)], **extra))
        if piece.usage is not None and include_usage:
            yield sse_event(TextCompletion(cid, created, model, [], usage=usage_out(piece.usage)))


async def _grounded_chat(
    body: ChatCompletionRequest, ask: AskService, routing: RoutingService, ctx: RequestContext
) -> Response[bytes] | Stream:
    """`collection` in a chat request: the same retrieval, prompt and checks as /ask, in OpenAI's shape."""
    body.check()
    args = dict(top_k=body.collection_top_k, max_tokens=body.token_limit or 256, policy=ctx,
                answer_mode=body.answer_mode)
    tenant = ctx.tenant.name
    run = ask.stream if body.stream else ask.ask

    async def on(model: str) -> Any:
        return await run(tenant, body.collection or "", body.question(), model=model, **args)

    if routing.is_route(body.model):
        result = await routing.grounded(body.model, tenant, ctx, on, whole=not body.stream)
    else:
        result = await on(body.model)
    if body.stream:
        return Stream(sse(_grounded_events(result)), media_type="text/event-stream", headers=SSE_HEADERS)
    answer = result
    usage = Usage(prompt_tokens=answer.usage["prompt_tokens"], completion_tokens=answer.usage["completion_tokens"])
    choice = ChatChoice(0, AssistantMessage(answer.answer), "stop")
    return json_response(
        ChatCompletion(new_id("chatcmpl"), now(), answer.model, [choice], usage_out(usage),
                       citations=answer.citations, grounded=answer.grounded, quarantined=answer.quarantined)
    )


async def _grounded_events(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    cid, created = new_id("chatcmpl"), now()
    model = ""
    async for event in events:
        if event["type"] == "delta":
            yield sse_event(ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(content=event["text"]))]))
        elif event["type"] == "sources":
            yield sse_event(ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(role="assistant", content=""))]))
        elif event["type"] == "done":
            model = event["model"]
            final = msgspec.to_builtins(ChatCompletionChunk(cid, created, model, [ChunkChoice(0, Delta(), "stop")]))
            final["citations"], final["grounded"] = event["citations"], event["grounded"]
            final["quarantined"] = event["quarantined"]
            yield sse_event(final)


async def _decoded(
    request: Request, type_: type[Any], cluster: Cluster, ctx: RequestContext
) -> tuple[Any, Response[bytes] | Stream | None]:
    """The request body decoded, and a peer's answer when federation sends the request there."""
    raw = await request.body()
    body = decode_request(raw, type_)
    return body, await forward_if_needed(cluster, ctx, request, raw, body.model)


async def _forward_unless_routed(
    routing: RoutingService, cluster: Cluster, ctx: RequestContext, request: Request, raw: bytes, model: str
) -> Response[bytes] | Stream | None:
    """A peer's answer when federation sends this model there; a routed id is the routing service's to place."""
    return None if routing.is_route(model) else await forward_if_needed(cluster, ctx, request, raw, model)


def _assistant_message(text: str, finish: str, tools_offered: bool) -> tuple[AssistantMessage, str]:
    """The message and finish reason of a whole answer; an answer that is tool calls becomes `tool_calls`."""
    if not tools_offered:
        return AssistantMessage(text), finish
    content, calls, complete = split_calls(text)
    if not calls:
        return AssistantMessage(text), finish
    out = [ToolCallOut(c.id, FunctionCallOut(c.name, c.arguments)) for c in calls]
    return AssistantMessage(content, tool_calls=out), "tool_calls" if complete and finish == "stop" else finish


def _guardrail_fields(ctx: RequestContext) -> dict[str, Any]:
    """Response extensions for what the guardrails did; absent when they did nothing."""
    fields: dict[str, Any] = {}
    actions = ctx.guardrail_actions()
    if actions:
        fields["guardrails"] = [msgspec.to_builtins(a) for a in actions]
    if ctx.pii_map:
        fields["pii_map"] = ctx.pii_map
    if ctx.quarantined:
        fields["quarantined"] = ctx.quarantined
    return fields


def _cache_scope(request: Request, ctx: RequestContext) -> str | None:
    """The tenant whose cache this request may use; `Cache-Control: no-cache` (or no-store) bypasses it."""
    directives = request.headers.get("cache-control", "").lower()
    if "no-cache" in directives or "no-store" in directives:
        return None
    return ctx.tenant.name


def _cache_headers(generation: Generation, base: dict[str, str] | None = None) -> dict[str, str]:
    return {**(base or {}), "X-Cache": "hit" if generation.cached else "miss"}


def model_card(manifest: Manifest, status: dict[str, Any], context_window: int | None) -> ModelCard:
    return ModelCard(
        id=manifest.id,
        created=manifest.created,
        owned_by="appliance",
        kind=manifest.kind,
        format=manifest.format,
        aliases=manifest.aliases,
        context_length=context_window,
        trained_context_length=manifest.context_length,
        status=status.get("state", "pending"),
        adapter=manifest.adapter.id if manifest.adapter is not None else None,
        parent=manifest.engine_id if manifest.adapter is not None else None,
    )


def route_cards(routing: RoutingService, registry: ModelRegistry, allowed: list[str] | None) -> list[RouteCard]:
    """A card per routed model id the caller may use (any of its models allowed): kind "route", its
    `candidates`, and the smallest context window among them."""
    cards = []
    status = registry.status()
    for name in routing.route_ids():
        models = [m for m in routing.models_of(name) if allowed is None or m.id in allowed]
        if not models:
            continue
        windows = [w for m in models if (w := registry.context_window(m)) is not None]
        states = [status[m.engine_id]["state"] for m in models]
        cards.append(RouteCard(
            id=name, created=0, owned_by="appliance", kind="route", format="route", aliases=[],
            context_length=min(windows) if windows else None, trained_context_length=None,
            status="ready" if "ready" in states else states[0], candidates=[m.id for m in models],
        ))
    return cards


class OpenAIController(Controller):
    path = "/v1"

    @get("/models", opt={"response": ModelList, "summary": "The models this key may use (scope=cluster: the peers' too)"})
    async def list_models(
        self, registry: ModelRegistry, routing_service: RoutingService, ctx: RequestContext, cluster: Cluster,
        where: str | None = Parameter(query="scope", default=None),
    ) -> Response[bytes]:
        status = registry.status()
        allowed = ctx.tenant.allowed_models
        cards = [
            model_card(m, status[m.engine_id], registry.context_window(m))
            for m in [*registry.manifests(), *registry.adapters()]
            if allowed is None or m.id in allowed or (m.adapter is not None and m.engine_id in allowed)
        ]
        cards += route_cards(routing_service, registry, allowed)
        if where == "cluster":  # appliance extension: the peers' models too, each with its `location`
            return json_response(cluster_model_list(cluster, cards, allowed))
        return json_response(ModelList(cards))

    @get("/models/{model_id:str}", opt={"response": ModelCard, "summary": "One model, by id or alias"})
    async def get_model(
        self, model_id: str, registry: ModelRegistry, routing_service: RoutingService, ctx: RequestContext
    ) -> Response[bytes]:
        if routing_service.is_route(model_id):
            card = next((c for c in route_cards(routing_service, registry, ctx.tenant.allowed_models) if c.id == model_id), None)
            if card is None:
                raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
            return json_response(card)
        manifest = registry.resolve(model_id)
        ctx.allow_model(manifest)
        return json_response(model_card(manifest, registry.status()[manifest.engine_id], registry.context_window(manifest)))

    @post("/chat/completions", status_code=200, opt={
        "request": ChatCompletionRequest, "response": ChatCompletion, "stream": ChatCompletionChunk,
        "summary": "Chat completion: tools, logprobs, n, response_format, grounded answers with `collection`",
    })
    async def chat_completions(
        self, request: Request, routing_service: RoutingService, ask_service: AskService, ctx: RequestContext,
        cluster: Cluster,
    ) -> Response[bytes] | Stream:
        raw = await request.body()
        body: ChatCompletionRequest = decode_request(raw, ChatCompletionRequest)
        if body.collection is not None:
            return await _grounded_chat(body, ask_service, routing_service, ctx)
        if (forwarded := await _forward_unless_routed(routing_service, cluster, ctx, request, raw, body.model)) is not None:
            return forwarded
        generation = await routing_service.chat(body, ctx, tenant=ctx.tenant.name, cache_scope=_cache_scope(request, ctx),
                                                peers=route_peers(cluster, ctx, request, raw))
        if isinstance(generation, Forwarded):  # a route's candidate on a peer answered
            return peer_response(generation, ctx)
        headers = _cache_headers(generation)
        logprobs = body.logprob_count() is not None
        if body.stream:
            events = _chat_events(generation, body.n, logprobs, body.include_usage, ctx)
            return Stream(sse(events, close=generation.aclose), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        results, usage = await generation.collect_all()
        choices = [
            ChatChoice(i, *_assistant_message(text, finish, generation.tools_offered),
                       logprobs=chat_logprobs(lp) if logprobs else None)
            for i, (text, finish, lp) in enumerate(results)
        ]
        return json_response(
            ChatCompletion(
                new_id("chatcmpl"), now(), generation.manifest.id, choices, usage_out(usage), **_guardrail_fields(ctx)
            ),
            headers=headers,
        )

    @post("/completions", status_code=200, opt={
        "request": CompletionRequest, "response": TextCompletion, "stream": TextCompletion,
        "summary": "Text completion (the legacy endpoint)",
    })
    async def completions(
        self, request: Request, routing_service: RoutingService, ctx: RequestContext, cluster: Cluster
    ) -> Response[bytes] | Stream:
        raw = await request.body()
        body: CompletionRequest = decode_request(raw, CompletionRequest)
        if (forwarded := await _forward_unless_routed(routing_service, cluster, ctx, request, raw, body.model)) is not None:
            return forwarded
        generation = await routing_service.complete(body, ctx, tenant=ctx.tenant.name, cache_scope=_cache_scope(request, ctx),
                                                    peers=route_peers(cluster, ctx, request, raw))
        if isinstance(generation, Forwarded):
            return peer_response(generation, ctx)
        headers = _cache_headers(generation)
        echo = body.prompt_text if body.echo else ""
        logprobs = body.logprob_count() is not None
        if body.stream:
            events = _completion_events(generation, body.n, logprobs, body.include_usage, echo, ctx)
            return Stream(sse(events, close=generation.aclose), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        results, usage = await generation.collect_all()
        choices = [
            TextChoice(i, echo + text, finish, text_logprobs(lp, len(echo)) if logprobs else None)
            for i, (text, finish, lp) in enumerate(results)
        ]
        completion = TextCompletion(
            new_id("cmpl"), now(), generation.manifest.id, choices, usage_out(usage), **_guardrail_fields(ctx)
        )
        return json_response(completion, headers=headers)

    @post("/embeddings", status_code=200, opt={
        "request": EmbeddingRequest, "response": EmbeddingList, "summary": "Embeddings of one or more texts",
    })
    async def embeddings(
        self, request: Request, embedding_service: EmbeddingService, ctx: RequestContext, cluster: Cluster
    ) -> Response[bytes] | Stream:
        body, forwarded = await _decoded(request, EmbeddingRequest, cluster, ctx)
        if forwarded is None:
            manifest, result = await embedding_service.embed(body, ctx)
            forwarded = json_response(embedding_list(manifest.id, result, body.encoding_format))
        return forwarded
