"""Ollama's API on the appliance's port (/api/*). Thin: decode, convert once to the OpenAI request the
services take, call the service, write Ollama's shapes (NDJSON when streaming, the default).

The routes sit behind the same gateway as /v1 (keys, tenants, limits, budgets, metering by route),
and their errors are Ollama's `{"error": "..."}` with the status the error tree gives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.response import Stream

from appliance import __version__
from appliance.api.cluster import forward_if_needed, peer_response, route_peers
from appliance.api.http import json_response
from appliance.api.ollama_models import (
    listed_model,
    listed_route,
    ollama_serves,
    route_show_response,
    running_model,
    show_response,
)
from appliance.engines.registry import ModelRegistry
from appliance.errors import ApplianceError, EngineError, InvalidRequest, ModelNotFound
from appliance.modelstore.manifest import Manifest, ModelKind
from appliance.peering.cluster import Cluster
from appliance.peering.forward import Forwarded
from appliance.policy.gateway import RequestContext
from appliance.protocol.ollama import (
    OLLAMA_API_VERSION,
    ChatRequest,
    ChatResponse,
    CopyRequest,
    Counters,
    CreateRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    ModelRequest,
    OllamaError,
    OutMessage,
    PsResponse,
    ShowResponse,
    StatusResponse,
    TagsResponse,
    VersionResponse,
    created_at,
    lookup_names,
    not_found_message,
    tool_calls_out,
)
from appliance.protocol.openai import decode_request
from appliance.services.embeddings import EmbeddingService
from appliance.services.generation import Generation, GenerationService
from appliance.services.routing import RoutingService
from appliance.services.tools import ToolCall, ToolCallStream, split_calls
from appliance.types import Chunk

log = logging.getLogger(__name__)
_encode = msgspec.json.encode
NDJSON = "application/x-ndjson"
BUSY_RETRY_S = 1.0
"""A keep_alive that expires while the model is in use tries again this much later."""
_ERRORS: dict[int, Any] = {status: OllamaError for status in (400, 401, 403, 404, 413, 429, 500, 503, 504)}
_OFFLINE = "this appliance does not reach any model registry"


# -- errors: Ollama's shape ------------------------------------------------------------------------


def _error_line(message: str) -> bytes:
    return _encode(OllamaError(message)) + b"\n"


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(_encode(OllamaError(message)), status_code=status, media_type="application/json", headers=headers)


def handle_ollama_error(_: Request, exc: ApplianceError) -> Response[bytes]:
    if exc.status >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc.__cause__ is not None)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return _error_response(exc.status, exc.message, headers)


def handle_ollama_http_exception(_: Request, exc: HTTPException) -> Response[bytes]:
    message = "The request body is larger than this server accepts." if exc.status_code == 413 else exc.detail
    return _error_response(exc.status_code, message or "error")


def handle_ollama_unexpected(_: Request, exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    return _error_response(500, "The server had an internal error.")


# -- keep_alive ------------------------------------------------------------------------------------


class KeepAlive:
    """Honours keep_alive: a model is unloaded that long after a request that asked for it.

    Only a request that sends keep_alive sets a deadline (the appliance keeps models loaded by
    default); a later one replaces it, a negative one removes it. A deadline that finds the model
    in use (by any route) tries again shortly, so a running request is never cut.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._deadlines: dict[str, float] = {}

    def after_request(self, manifest: Manifest, seconds: float | None) -> None:
        """Keyed by the engine: `BASE:ADAPTER` sets its base model's deadline (one engine serves both)."""
        if seconds is None:
            return
        self._cancel(manifest.engine_id)
        if math.isinf(seconds):
            return
        if seconds <= 0:
            self._expire(manifest)
        else:
            self._arm(manifest, seconds)

    def expires_at(self, model_id: str) -> float | None:
        """Unix time of the model's unload deadline; None: none is set."""
        return self._deadlines.get(model_id)

    def _arm(self, manifest: Manifest, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[manifest.engine_id] = loop.call_later(seconds, self._expire, manifest)
        self._deadlines[manifest.engine_id] = time.time() + seconds

    def _cancel(self, model_id: str) -> None:
        timer = self._timers.pop(model_id, None)
        if timer is not None:
            timer.cancel()
        self._deadlines.pop(model_id, None)

    def _expire(self, manifest: Manifest) -> None:
        self._cancel(manifest.engine_id)
        if not self._registry.unload(manifest) and self._registry.status()[manifest.engine_id]["state"] == "ready":
            self._arm(manifest, BUSY_RETRY_S)  # in use: unload once it is idle


def provide_keep_alive(request: Request, registry: ModelRegistry) -> KeepAlive:
    """One KeepAlive per app, kept in its state beside the settings."""
    state = request.app.state
    keep_alive = state.get("ollama_keep_alive")
    if keep_alive is None:
        keep_alive = state["ollama_keep_alive"] = KeepAlive(registry)
    return keep_alive


# -- helpers ---------------------------------------------------------------------------------------


def _resolve(registry: ModelRegistry, ctx: RequestContext, name: str, kinds: tuple[ModelKind, ...] | None) -> Manifest:
    """The model an Ollama name means (`gemma3:latest` is `gemma3`); 404 in Ollama's words otherwise.

    A model the tenant may not use is not found either, before its kind is checked.
    """
    for candidate in lookup_names(name):
        try:
            manifest = registry.resolve(candidate)
            ctx.allow_model(manifest)
        except ModelNotFound:
            continue
        if kinds is not None:
            registry.resolve(manifest.id, kinds=kinds)  # UnsupportedForModel (400) names what it needs
        return manifest
    raise ModelNotFound(not_found_message(name), param="model")


def _route_of(routing: RoutingService, name: str) -> str | None:
    """The routed model id an Ollama name means (`auto` or `auto:latest`), or None for a plain model."""
    return next((n for n in lookup_names(name) if routing.is_route(n)), None)


def _route_models(routing: RoutingService, ctx: RequestContext, route: str, name: str) -> list[Manifest]:
    """The models of this node in `route` that the caller may use (maybe none, when the caller may use
    candidates only peers serve); 404 in Ollama's words when it may use no candidate at all."""
    allowed = []
    for manifest in routing.models_of(route):
        try:
            ctx.allow_model(manifest)
        except ModelNotFound:
            continue
        allowed.append(manifest)
    tenant_allows = ctx.tenant.allowed_models
    remote = [m for m in routing.remote_of(route) if tenant_allows is None or m in tenant_allows]
    if not allowed and not remote:
        raise ModelNotFound(not_found_message(name), param="model")
    return allowed


def _route_window(registry: ModelRegistry, models: list[Manifest]) -> int | None:
    """What `num_ctx` may ask of a route: the smallest context among its models."""
    windows = [w for m in models if (w := registry.context_window(m)) is not None]
    return min(windows) if windows else None


async def _forward(
    cluster: Cluster, registry: ModelRegistry, ctx: RequestContext, request: Request, raw: bytes, name: str
) -> Response[bytes] | Stream | None:
    """A peer's answer when federation sends this request there (as on /v1): a model served only by a
    peer, or this node saturated. `gemma3:latest` is planned as `gemma3` unless the full name is known here."""
    try:
        registry.resolve(name)
        planned = name
    except ModelNotFound:
        planned = lookup_names(name)[-1]
    return await forward_if_needed(cluster, ctx, request, raw, planned)


async def _decoded(
    request: Request, type_: type[Any], cluster: Cluster, registry: ModelRegistry, ctx: RequestContext,
    routing: RoutingService | None = None,
) -> tuple[Any, Response[bytes] | Stream | None]:
    """The request body decoded, and a peer's answer when federation sends the request there (a routed
    model id is the routing service's to place, peers included)."""
    raw = await request.body()
    body = decode_request(raw, type_)
    if routing is not None and _route_of(routing, body.model) is not None:
        return body, None
    return body, await _forward(cluster, registry, ctx, request, raw, body.model)


async def _embed(
    registry: ModelRegistry, service: EmbeddingService, ctx: RequestContext, keep_alive: KeepAlive,
    body: EmbedRequest | EmbeddingsRequest, texts: list[str],
) -> tuple[list[list[float]], int, float]:
    """Vectors, tokens and seconds spent loading the model; no texts only loads it (as in Ollama)."""
    seconds = body.keep_alive_s()  # a bad keep_alive is refused before any work
    manifest = _resolve(registry, ctx, body.model, ("embedding",))
    began = time.monotonic()
    async with registry.use(manifest):  # loads it (load_duration), and holds it for the service
        load_s = time.monotonic() - began
        vectors: list[list[float]] = []
        tokens = 0
        if texts:
            _, result = await service.embed(body.embedding_request(manifest.id), ctx)
            vectors, tokens = result.vectors, result.prompt_tokens
    keep_alive.after_request(manifest, seconds)
    return vectors, tokens, load_s


async def _generation(
    registry: ModelRegistry, keep_alive: KeepAlive, ctx: RequestContext, body: GenerateRequest | ChatRequest,
    kinds: tuple[ModelKind, ...], empty: bool,
    start: Callable[[Manifest, int | None], Callable[[], Awaitable[Generation]]],
) -> Response[bytes] | Stream:
    """Serve /api/generate or /api/chat: load only (an empty request), or run the generation `start` makes."""
    manifest = _resolve(registry, ctx, body.model, kinds)
    seconds, shape = body.keep_alive_s(), _Shape(body.model, chat=isinstance(body, ChatRequest))
    if empty:
        return await _load_only(registry, keep_alive, manifest, seconds, shape)
    run = await _start(registry, manifest, ctx, start(manifest, registry.context_window(manifest)))
    return await _answer(run, shape, body.stream, lambda: keep_alive.after_request(manifest, seconds))


async def _routed_generation(
    registry: ModelRegistry, routing: RoutingService, keep_alive: KeepAlive, ctx: RequestContext,
    body: GenerateRequest | ChatRequest, route: str, empty: bool,
    start: Callable[[str, int | None], Awaitable[Generation | Forwarded]],
) -> Response[bytes] | Stream:
    """Serve /api/generate or /api/chat for a routed model id: the routing service walks the route's
    ladder (the X-Route header and the usage record show the hops). An empty request loads the route's
    first model of this node the caller may use. The answer's `model` is the model that answered, as on
    /v1; a peer's answer (a candidate a cluster peer serves) is relayed as the peer wrote it."""
    models = _route_models(routing, ctx, route, body.model)
    seconds, chat = body.keep_alive_s(), isinstance(body, ChatRequest)
    if empty:
        if not models:  # only peers serve its candidates: nothing to load here
            return json_response(_Shape(body.model, chat=chat).final("", "load", None, None))
        return await _load_only(registry, keep_alive, models[0], seconds, _Shape(body.model, chat=chat))
    began = time.monotonic()
    generation = await start(route, _route_window(registry, models))
    if isinstance(generation, Forwarded):
        return peer_response(generation, ctx)
    run = _Run(generation, ctx, 0.0, time.monotonic() - began)
    served = generation.manifest
    return await _answer(run, _Shape(served.id, chat=chat), body.stream, lambda: keep_alive.after_request(served, seconds))


def _cache_scope(request: Request, ctx: RequestContext) -> str | None:
    directives = request.headers.get("cache-control", "").lower()
    if "no-cache" in directives or "no-store" in directives:
        return None
    return ctx.tenant.name


def _guardrail_fields(ctx: RequestContext) -> dict[str, Any]:
    """Response extensions for what the guardrails did; absent when they did nothing."""
    fields: dict[str, Any] = {}
    if actions := ctx.guardrail_actions():
        fields["guardrails"] = [msgspec.to_builtins(a) for a in actions]
    if ctx.pii_map:
        fields["pii_map"] = ctx.pii_map
    return fields


def _ns(seconds: float) -> int:
    return max(1, round(seconds * 1e9))


class _Run:
    """A started generation and its clock: Ollama's counters are measured, not estimated."""

    def __init__(self, generation: Generation, ctx: RequestContext, load_s: float, prompt_s: float) -> None:
        self.generation = generation
        self.ctx = ctx
        self.load_s = load_s
        self.prompt_s = prompt_s
        self.first_at = time.monotonic()
        """The first chunk is computed when the service returns: prefill ends here."""

    def counters(self, chunk: Chunk) -> Counters:
        now = time.monotonic()
        usage = chunk.usage
        return Counters(
            total_duration=_ns(now - self.ctx.started),
            load_duration=_ns(self.load_s),
            prompt_eval_count=usage.prompt_tokens if usage else 0,
            prompt_eval_duration=_ns(self.prompt_s),
            eval_count=usage.completion_tokens if usage else 0,
            eval_duration=_ns(now - self.first_at),
        )

    def headers(self) -> dict[str, str]:
        return {"X-Cache": "hit" if self.generation.cached else "miss"}


async def _start(
    registry: ModelRegistry, manifest: Manifest, ctx: RequestContext, start: Callable[[], Awaitable[Generation]]
) -> _Run:
    """Load the model (timed apart: load_duration), then start the generation (prompt_eval_duration)."""
    began = time.monotonic()
    lease = await registry.acquire(manifest)
    loaded = time.monotonic()
    try:
        generation = await start()
    finally:
        lease.release()  # the generation holds its own lease until it ends
    return _Run(generation, ctx, loaded - began, time.monotonic() - loaded)


class _Shape:
    """How one answer's objects look: /api/generate's `response` or /api/chat's `message`."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat

    def part(self, text: str, calls: list[ToolCall] | None = None, **final: Any) -> GenerateResponse | ChatResponse:
        done = bool(final)
        if self.chat:
            out = tool_calls_out([(c.name, c.arguments) for c in calls]) if calls else msgspec.UNSET
            message = OutMessage(text, tool_calls=out)
            return ChatResponse(model=self.model, created_at=created_at(), message=message, done=done, **final)
        return GenerateResponse(model=self.model, created_at=created_at(), response=text, done=done, **final)

    def final(
        self, text: str, reason: str, counters: Counters | None, ctx: RequestContext | None,
        calls: list[ToolCall] | None = None,
    ) -> Any:
        extra = msgspec.structs.asdict(counters) if counters is not None else {}
        return self.part(text, calls, done_reason=reason, **extra, **(_guardrail_fields(ctx) if ctx else {}))


async def _answer(run: _Run, shape: _Shape, stream: bool, after: Callable[[], None]) -> Response[bytes] | Stream:
    headers = run.headers()
    if stream:
        return Stream(_ndjson(run, shape, after), media_type=NDJSON, headers=headers)
    try:
        text, finish, usage = await run.generation.collect()
    finally:
        after()
    calls: list[ToolCall] = []
    if run.generation.tools_offered:
        content, calls, _ = split_calls(text)  # an answer that opens with a call is calls only
        text = content or ""
    return json_response(shape.final(text, finish, run.counters(Chunk(text="", usage=usage)), run.ctx, calls), headers=headers)


async def _ndjson(run: _Run, shape: _Shape, after: Callable[[], None]) -> AsyncIterator[bytes]:
    """One JSON object per line; a failure mid-stream ends it with an `{"error": ...}` line.

    With tools offered, calls go out as they complete, each in a `message.tool_calls` line (as
    Ollama streams them), and no call markup leaks as text.
    """
    calls = ToolCallStream() if run.generation.tools_offered else None
    try:
        async for chunk in run.generation:
            text, done = (chunk.text, []) if calls is None else calls.feed(chunk.text)
            if calls is not None and chunk.finish_reason is not None:
                text += calls.finish()
            if text:
                yield _encode(shape.part(text)) + b"\n"
            if done:
                yield _encode(shape.part("", done)) + b"\n"
            if chunk.finish_reason is not None:
                # The usage record is written by now: the guardrail actions are final.
                yield _encode(shape.final("", chunk.finish_reason, run.counters(chunk), run.ctx)) + b"\n"
    except ApplianceError as exc:
        yield _error_line(exc.message)
    except Exception:
        log.exception("stream failed")
        yield _error_line(EngineError("The stream failed inside the server.").message)
    finally:
        await run.generation.aclose()
        after()


async def _load_only(
    registry: ModelRegistry, keep_alive: KeepAlive, manifest: Manifest, seconds: float | None, shape: _Shape
) -> Response[bytes]:
    """No prompt: load the model (or unload it with keep_alive 0), as Ollama does."""
    if seconds == 0:
        keep_alive.after_request(manifest, 0)
        return json_response(shape.final("", "unload", None, None))
    async with registry.use(manifest):
        pass
    keep_alive.after_request(manifest, seconds)
    return json_response(shape.final("", "load", None, None))


_GENERATE_OPT = {
    "request": GenerateRequest, "response": GenerateResponse, "ndjson": GenerateResponse, "responses": _ERRORS,
    "summary": "Ollama: generate a completion (NDJSON unless stream is false)", "tag": "Ollama",
}
_CHAT_OPT = {
    "request": ChatRequest, "response": ChatResponse, "ndjson": ChatResponse, "responses": _ERRORS,
    "summary": "Ollama: chat (NDJSON unless stream is false)", "tag": "Ollama",
}


def _opt(summary: str, request: Any = None, response: Any = None, ndjson: Any = None) -> dict[str, Any]:
    opt: dict[str, Any] = {"summary": f"Ollama: {summary}", "tag": "Ollama", "responses": _ERRORS}
    if ndjson is not None:
        opt["ndjson"] = ndjson
    if request is not None:
        opt["request"] = request
    if response is not None:
        opt["response"] = response
    return opt


class OllamaController(Controller):
    path = "/api"
    dependencies = {"keep_alive": Provide(provide_keep_alive, sync_to_thread=False)}
    exception_handlers = {
        ApplianceError: handle_ollama_error,
        HTTPException: handle_ollama_http_exception,
        Exception: handle_ollama_unexpected,
    }

    @get("/version", opt=_opt("the Ollama API version these routes follow", None, VersionResponse))
    async def ollama_version(self) -> Response[bytes]:
        return json_response(VersionResponse(OLLAMA_API_VERSION, __version__))

    @get("/tags", opt=_opt("list the models", None, TagsResponse))
    async def ollama_tags(self, registry: ModelRegistry, routing_service: RoutingService, ctx: RequestContext) -> Response[bytes]:
        """The models, `BASE:ADAPTER` for each LoRA adapter, and the routed model ids, as the caller may use them."""
        models = []
        for m in [*registry.manifests(), *registry.adapters()]:
            try:
                ctx.allow_model(m)
            except ModelNotFound:
                continue
            if ollama_serves(m):
                models.append(listed_model(m))
        for route in routing_service.route_ids():
            try:
                routed = _route_models(routing_service, ctx, route, route)
            except ModelNotFound:
                continue
            models.append(listed_route(route, routed, routing_service.remote_of(route)))
        return json_response(TagsResponse(models))

    @get("/ps", opt=_opt("list the loaded models", None, PsResponse))
    async def ollama_ps(self, registry: ModelRegistry, ctx: RequestContext, keep_alive: KeepAlive) -> Response[bytes]:
        allowed = ctx.tenant.allowed_models
        status = registry.status()
        running = [
            running_model(m, status[m.engine_id], registry.context_window(m), keep_alive.expires_at(m.engine_id))
            for m in registry.manifests()
            if status[m.engine_id]["state"] == "ready" and (allowed is None or m.id in allowed)
        ]
        return json_response(PsResponse(running))

    @post("/show", status_code=200, opt=_opt("show a model", ModelRequest, ShowResponse))
    async def ollama_show(
        self, request: Request, registry: ModelRegistry, routing_service: RoutingService, ctx: RequestContext
    ) -> Response[bytes]:
        body: ModelRequest = decode_request(await request.body(), ModelRequest)
        route = _route_of(routing_service, body.model_name)
        if route is not None:
            models = _route_models(routing_service, ctx, route, body.model_name)
            allowed = ctx.tenant.allowed_models
            remote = [m for m in routing_service.remote_of(route) if allowed is None or m in allowed]
            return json_response(route_show_response(route, models, remote, _route_window(registry, models)))
        manifest = _resolve(registry, ctx, body.model_name, None)
        return json_response(show_response(manifest, registry.context_window(manifest)))

    @post("/generate", status_code=200, opt=_GENERATE_OPT)
    async def ollama_generate(
        self, request: Request, registry: ModelRegistry, generation_service: GenerationService, ctx: RequestContext,
        keep_alive: KeepAlive, cluster: Cluster, routing_service: RoutingService,
    ) -> Response[bytes] | Stream:
        body, forwarded = await _decoded(request, GenerateRequest, cluster, registry, ctx, routing_service)
        if forwarded is not None:
            return forwarded
        body.check()
        scope = _cache_scope(request, ctx)
        empty = not body.prompt and not body.system
        if (route := _route_of(routing_service, body.model)) is not None:

            peers = route_peers(cluster, ctx, request, await request.body())

            async def routed(name: str, window: int | None) -> Generation | Forwarded:
                # Through the chat template unless raw: a route's completion models serve raw prompts only.
                if body.uses_template(True):
                    return await routing_service.chat(
                        body.chat_completion(name, window), ctx, tenant=ctx.tenant.name, cache_scope=scope, peers=peers
                    )
                return await routing_service.complete(
                    body.completion(name, window), ctx, tenant=ctx.tenant.name, cache_scope=scope, peers=peers
                )

            return await _routed_generation(registry, routing_service, keep_alive, ctx, body, route, empty, routed)

        def start(manifest: Manifest, window: int | None) -> Callable[[], Awaitable[Generation]]:
            if body.uses_template(manifest.kind == "chat"):
                return partial(generation_service.chat, body.chat_completion(manifest.id, window), ctx, cache_scope=scope)
            return partial(generation_service.complete, body.completion(manifest.id, window), ctx, cache_scope=scope)

        return await _generation(registry, keep_alive, ctx, body, ("chat", "completion"), empty, start)

    @post("/chat", status_code=200, opt=_CHAT_OPT)
    async def ollama_chat(self, request: Request, ctx: RequestContext, generation_service: GenerationService,
                          registry: ModelRegistry, keep_alive: KeepAlive, cluster: Cluster,
                          routing_service: RoutingService) -> Response[bytes] | Stream:
        chat_body, forwarded = await _decoded(request, ChatRequest, cluster, registry, ctx, routing_service)
        if forwarded is None and (route := _route_of(routing_service, chat_body.model)) is not None:
            chat_body.check()
            scope = _cache_scope(request, ctx)

            peers = route_peers(cluster, ctx, request, await request.body())

            async def routed(name: str, window: int | None) -> Generation | Forwarded:
                chat = chat_body.chat_completion(name, window)
                return await routing_service.chat(chat, ctx, tenant=ctx.tenant.name, cache_scope=scope, peers=peers)

            empty = not chat_body.messages
            forwarded = await _routed_generation(registry, routing_service, keep_alive, ctx, chat_body, route, empty, routed)
        if forwarded is None:
            chat_body.check()
            scope = _cache_scope(request, ctx)

            def start(manifest: Manifest, window: int | None) -> Callable[[], Awaitable[Generation]]:
                chat = chat_body.chat_completion(manifest.id, window)
                return partial(generation_service.chat, chat, ctx, cache_scope=scope)

            forwarded = await _generation(registry, keep_alive, ctx, chat_body, ("chat",), not chat_body.messages, start)
        return forwarded

    @post("/embed", status_code=200, opt=_opt("embed one input or a list", EmbedRequest, EmbedResponse))
    async def ollama_embed(
        self, request: Request, registry: ModelRegistry, embedding_service: EmbeddingService, ctx: RequestContext,
        keep_alive: KeepAlive, cluster: Cluster,
    ) -> Response[bytes]:
        body, forwarded = await _decoded(request, EmbedRequest, cluster, registry, ctx)
        if forwarded is not None:
            return forwarded
        vectors, tokens, load_s = await _embed(registry, embedding_service, ctx, keep_alive, body, body.texts())
        return json_response(EmbedResponse(
            model=body.model, embeddings=vectors, total_duration=_ns(time.monotonic() - ctx.started),
            load_duration=_ns(load_s), prompt_eval_count=tokens,
        ))

    @post("/embeddings", status_code=200, opt=_opt("embed one prompt (older route)", EmbeddingsRequest, EmbeddingsResponse))
    async def ollama_embeddings(self, request: Request, ctx: RequestContext, embedding_service: EmbeddingService,
                                registry: ModelRegistry, keep_alive: KeepAlive, cluster: Cluster) -> Response[bytes]:
        older, forwarded = await _decoded(request, EmbeddingsRequest, cluster, registry, ctx)
        if forwarded is None:
            texts = [older.prompt] if older.prompt else []
            vectors, _, _ = await _embed(registry, embedding_service, ctx, keep_alive, older, texts)
            forwarded = json_response(EmbeddingsResponse(vectors[0] if vectors else []))
        return forwarded

    # -- model management: offline, from the command line --------------------------------------

    @post("/pull", status_code=200, opt=_opt("pull: success for a model already here", ModelRequest, StatusResponse, StatusResponse))
    async def ollama_pull(self, request: Request, registry: ModelRegistry, ctx: RequestContext) -> Response[bytes]:
        body: ModelRequest = decode_request(await request.body(), ModelRequest)
        try:
            _resolve(registry, ctx, body.model_name, None)
        except ModelNotFound:
            raise ModelNotFound(
                f'model "{body.model_name}" is not here and {_OFFLINE}: copy its GGUF file to this machine and run '
                f"`appliance models import <file.gguf> --id {lookup_names(body.model_name)[-1]}`.",
                param="model",
            ) from None
        status = _encode(StatusResponse("success"))
        return Response(status + (b"\n" if body.stream else b""), media_type=NDJSON if body.stream else "application/json")

    @post("/push", status_code=200, opt=_opt("push: refused (offline)", ModelRequest, None))
    async def ollama_push(self) -> Response[bytes]:
        raise InvalidRequest(f"Pushing models is not supported: {_OFFLINE}.", param="model")

    @post("/create", status_code=200, opt=_opt("create: refused, import from the command line", CreateRequest, None))
    async def ollama_create(self) -> Response[bytes]:
        raise InvalidRequest(
            "Creating models over the API is not supported: import a GGUF file with "
            "`appliance models import <file.gguf> --id <name>` (--chat-template, --stop and --alias set "
            "what a Modelfile would), then restart the server.",
            param="model",
        )

    @post("/copy", status_code=200, opt=_opt("copy: refused, add an alias from the command line", CopyRequest, None))
    async def ollama_copy(self, request: Request, registry: ModelRegistry, ctx: RequestContext) -> Response[bytes]:
        body: CopyRequest = decode_request(await request.body(), CopyRequest)
        model_id = _resolve(registry, ctx, body.source, None).id
        raise InvalidRequest(
            f"Copying models is not supported: to give {model_id} another name, import its file again with "
            f"`appliance models import <file> --id {model_id} --alias {body.destination}`.", param="destination"
        )

    @delete("/delete", status_code=200, opt=_opt("delete: refused, remove from the command line", ModelRequest, None))
    async def ollama_delete(self, request: Request, registry: ModelRegistry, ctx: RequestContext) -> Response[bytes]:
        name = decode_request(await request.body(), ModelRequest).model_name
        model_id = _resolve(registry, ctx, name, None).id
        message = f"Deleting models over the API is not supported: stop the server and run `appliance models remove {model_id}`."
        raise InvalidRequest(message, param="model")
