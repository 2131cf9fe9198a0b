"""Chat and text completions: resolve the model, build the prompt, run the engine off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jinja2
import msgspec
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.engines.registry import ChatEngine, EngineLease, ModelRegistry
from appliance.errors import ApplianceError, ContextLengthExceeded, EngineError
from appliance.modelstore.manifest import Manifest
from appliance.protocol.openai import ChatCompletionRequest, CompletionRequest
from appliance.services.cache import CachedAnswer, ResponseCache, deterministic, scope_of
from appliance.services.policy import OPEN_POLICY, OutputFilter, RequestPolicy
from appliance.services.tools import fallback_preamble, history, template_knows_tools, template_tools
from appliance.types import Chunk, GenerationRequest, SamplingParams, TokenLogprob, ToolGrammar, Usage

log = logging.getLogger(__name__)
_END = object()
TOOL_RESULT_QUARANTINED = "[tool result withheld: the injection guardrail found instructions in it]"
"""What the model reads in place of a tool result that carries a prompt injection."""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """How a routed request tries one candidate (services/routing.py); the defaults are an unrouted request's."""

    load_wait_s: float | None = None
    """Wait at most this long for the model to load; None: models.load_timeout_s."""
    fit_context: bool = False
    """Refuse (ContextLengthExceeded) when prompt + max_tokens exceed the context, rather than stop at the end."""
    logprobs: bool = False
    """Compute the generated tokens' log-probabilities even when the request did not ask (cascade mode)."""


def _filtered(f: OutputFilter, chunk: Chunk) -> str:
    return f.feed(chunk.text) + (f.flush() if chunk.finish_reason is not None else "")


class Generation:
    """A started generation: the first chunk is already computed, so errors surface before streaming."""

    def __init__(self, manifest: Manifest, first: Chunk, rest: AsyncIterator[Chunk]) -> None:
        self.manifest = manifest
        self._first: Chunk | None = first
        self._rest = rest
        self._observers: list[Callable[[Chunk], None]] = []
        self._make_filter: Callable[[], OutputFilter | None] | None = None
        self._filters: dict[int, OutputFilter | None] = {}
        self.cached = False
        """True when the answer came from the response cache (no engine ran)."""
        self.tools_offered = False
        """True when the output may hold tool calls (services/tools.py parses them)."""

    def filter_output(self, make_filter: Callable[[], OutputFilter | None]) -> None:
        """Pass every chunk's text through a filter (PII masking) before anyone sees it: one filter per
        sequence, from `make_filter`, since each holds back text of its own stream."""
        self._make_filter = make_filter

    def observe(self, observer: Callable[[Chunk], None]) -> None:
        """Call `observer` with every chunk before it is handed on (metering counts tokens here)."""
        self._observers.append(observer)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        if self._first is not None:
            first, self._first = self._first, None
            first = await self._notify(first)
            yield first
            if first.usage is not None:  # the last chunk (with n > 1: of the last sequence to finish)
                return
        async for chunk in self._rest:
            yield await self._notify(chunk)

    async def _notify(self, chunk: Chunk) -> Chunk:
        if self._make_filter is not None and chunk.index not in self._filters:
            self._filters[chunk.index] = self._make_filter()
        f = self._filters.get(chunk.index)
        if f is not None:
            # On a worker thread: PII masking may run spaCy's NER, which must never run on the event loop.
            text = await asyncio.to_thread(_filtered, f, chunk)
            chunk = msgspec.structs.replace(chunk, text=text)
        for observer in self._observers:
            observer(chunk)
        return chunk

    async def aclose(self) -> None:
        await self._rest.aclose()  # type: ignore[attr-defined]

    async def replay(self) -> tuple[Generation, list[TokenLogprob]]:
        """Run to the end; a new Generation that hands out the whole answer at once, and its token logprobs.

        For a routed request that may yet prefer another model's answer (cascade mode): the policy has seen
        every chunk already, so the replay has no observers.
        """
        [(text, finish, logprobs)], usage = await self.collect_all()
        whole = Chunk(text=text, finish_reason=finish, usage=usage, logprobs=tuple(logprobs))  # type: ignore[arg-type]
        again = Generation(self.manifest, whole, _nothing())
        again.cached, again.tools_offered = self.cached, self.tools_offered
        return again, logprobs

    async def collect(self) -> tuple[str, str, Usage]:
        [(text, finish, _)], usage = await self.collect_all()
        return text, finish, usage

    async def collect_all(self) -> tuple[list[tuple[str, str, list[TokenLogprob]]], Usage]:
        """Each sequence's (text, finish_reason, token logprobs), by index, and the usage of them all."""
        parts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        finish: dict[int, str] = {}
        try:
            async for chunk in self:
                parts.setdefault(chunk.index, []).append(chunk.text)
                logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
                if chunk.finish_reason is not None:
                    finish[chunk.index] = chunk.finish_reason
                if chunk.usage is not None:
                    return [("".join(parts[i]), finish[i], logprobs[i]) for i in sorted(finish)], chunk.usage
        finally:
            await self.aclose()
        raise EngineError("generation ended without a final chunk")


class GenerationService:
    def __init__(
        self,
        registry: ModelRegistry,
        cache: ResponseCache | None = None,
        embed_prompt: Callable[[str], Awaitable[np.ndarray | None]] | None = None,
        speculation: str = "off",
    ) -> None:
        """`speculation`: which requests speculate by default (settings `models.speculation`)."""
        self._registry = registry
        self._speculation = speculation
        self._templates = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._cache = cache
        self._embed_prompt = embed_prompt

    def render_chat(
        self, manifest: Manifest, request: ChatCompletionRequest, policy: RequestPolicy = OPEN_POLICY
    ) -> str:
        return self.render_screened(manifest, request, self.screen_chat(request, policy))

    @staticmethod
    def screen_chat(request: ChatCompletionRequest, policy: RequestPolicy = OPEN_POLICY) -> list[str]:
        """Each message's text after the input guardrails (once per request, whichever models it tries)."""
        texts = [m.text(i) for i, m in enumerate(request.messages)]
        # Tool results are third-party content, like retrieved chunks: screened for injection in one batch,
        # and one that carries an injection reaches the model as a short notice instead (policy: drop).
        tools = [i for i, m in enumerate(request.messages) if m.role == "tool"]
        if tools:
            kept = set(policy.screen_tool_results([texts[i] for i in tools],
                                                  [request.messages[i].tool_call_id or "" for i in tools], tools))
            for n, i in enumerate(tools):
                if n not in kept:
                    texts[i] = TOOL_RESULT_QUARANTINED
        # The user's turns are instructions (injection is checked there); the rest is screened for PII only.
        for instructions, indices in (
            (True, [i for i, m in enumerate(request.messages) if m.role == "user"]),
            (False, [i for i, m in enumerate(request.messages) if m.role != "user"]),
        ):
            screened = policy.screen_input([texts[i] for i in indices], instructions=instructions)
            for i, text in zip(indices, screened, strict=True):
                texts[i] = text
        return texts

    def render_screened(self, manifest: Manifest, request: ChatCompletionRequest, texts: list[str]) -> str:
        """The prompt for `manifest`'s chat template from the screened message texts."""
        tools = request.active_tools()
        if not tools and not any(m.tool_calls or m.role == "tool" for m in request.messages):
            return self._render(manifest, [{"role": m.role, "content": t} for m, t in zip(request.messages, texts)])
        native = template_knows_tools(self._templates, manifest.chat_template or "")
        messages = history(request.messages, texts, fallback=not native)
        if tools and not native:
            messages.insert(0, {"role": "system", "content": fallback_preamble(request, tools)})
        return self._render(manifest, messages, tools=template_tools(tools) if native and tools else None)

    def _render(self, manifest: Manifest, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> str:
        # A trailing assistant message is a prefill: continue it rather than open a new turn.
        add_generation_prompt = messages[-1]["role"] != "assistant"
        extra = {"tools": tools} if tools else {}
        try:
            template = self._templates.from_string(manifest.chat_template or "")
            prompt = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.TemplateError as exc:
            log.error("chat template of %s failed: %s", manifest.id, exc)
            raise EngineError(f"the chat template of model {manifest.id} failed to render") from None
        if not add_generation_prompt:
            prompt = prompt.rstrip()
            for marker in manifest.stop:
                if prompt.endswith(marker):
                    prompt = prompt[: -len(marker)]
        return prompt

    async def chat(
        self, request: ChatCompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, cache_scope: str | None = None
    ) -> Generation:
        """`cache_scope` (the tenant) turns the response cache on for this request; None bypasses it."""
        request.check()
        manifest = self._registry.with_default_adapter(
            self._registry.resolve(request.model, kinds=("chat",), adapter=request.adapter), policy.default_adapter
        )
        policy.allow_model(manifest)
        # Off the event loop: screening runs the PII detector and the injection classifier.
        texts = await asyncio.to_thread(self.screen_chat, request, policy)
        return await self.start_chat(manifest, request, texts, policy, cache_scope=cache_scope)

    async def start_chat(
        self,
        manifest: Manifest,
        request: ChatCompletionRequest,
        texts: list[str],
        policy: RequestPolicy = OPEN_POLICY,
        *,
        cache_scope: str | None = None,
        attempt: Attempt | None = None,
    ) -> Generation:
        """A chat on `manifest` from already screened message texts (routing tries several models with them)."""
        policy.allow_model(manifest)
        prompt = await asyncio.to_thread(self.render_screened, manifest, request, texts)
        tools = request.tool_grammar()
        generation = await self._start(
            manifest, prompt, request.token_limit, request, policy, cache_scope,
            json_schema=request.json_schema() if tools is None else None, tools=tools, attempt=attempt,
        )
        generation.tools_offered = tools is not None
        return generation

    def cached_chat(
        self, manifest: Manifest, request: ChatCompletionRequest, texts: list[str], policy: RequestPolicy, tenant: str
    ) -> Generation | None:
        """The response cache's answer to this chat on `manifest`, if it holds one (exact match); never runs a model."""
        tools = request.tool_grammar()
        prompt = self.render_screened(manifest, request, texts)
        generation = self._request(
            manifest, prompt, request.token_limit, request, policy,
            json_schema=request.json_schema() if tools is None else None, tools=tools,
        )
        found = self._cache_hit(manifest, generation, policy, tenant)
        if found is not None:
            found.tools_offered = tools is not None
        return found

    async def complete(
        self, request: CompletionRequest, policy: RequestPolicy = OPEN_POLICY, *, cache_scope: str | None = None
    ) -> Generation:
        request.check()
        manifest = self._registry.with_default_adapter(
            self._registry.resolve(request.model, kinds=("chat", "completion"), adapter=request.adapter),
            policy.default_adapter,
        )
        policy.allow_model(manifest)
        [prompt] = await asyncio.to_thread(policy.screen_input, [request.prompt_text])
        return await self.start_completion(manifest, request, prompt, policy, cache_scope=cache_scope)

    async def start_completion(
        self,
        manifest: Manifest,
        request: CompletionRequest,
        prompt: str,
        policy: RequestPolicy = OPEN_POLICY,
        *,
        cache_scope: str | None = None,
        attempt: Attempt | None = None,
    ) -> Generation:
        """A completion on `manifest` of an already screened prompt."""
        policy.allow_model(manifest)
        return await self._start(manifest, prompt, request.max_tokens, request, policy, cache_scope, attempt=attempt)

    def cached_completion(
        self, manifest: Manifest, request: CompletionRequest, prompt: str, policy: RequestPolicy, tenant: str
    ) -> Generation | None:
        return self._cache_hit(manifest, self._request(manifest, prompt, request.max_tokens, request, policy), policy, tenant)

    async def generate(
        self,
        manifest: Manifest,
        *,
        prompt: str,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        temperature: float = 0.0,
        policy: RequestPolicy = OPEN_POLICY,
    ) -> Generation:
        """For other services (grounded answers): a prompt, or messages for the model's chat template."""
        if messages is not None:
            prompt = self._render(manifest, messages)
        d = manifest.sampling
        sampling = SamplingParams(
            temperature=temperature, top_p=d.top_p, top_k=d.top_k, min_p=d.min_p, repeat_penalty=d.repeat_penalty
        )
        request = GenerationRequest(
            prompt=prompt, max_tokens=policy.cap_max_tokens(max_tokens), stop=(*stop, *manifest.stop), sampling=sampling,
            adapter=manifest.adapter, speculate=self.speculates(manifest, None, grounded=True),
        )
        return await self._launch(manifest, request, policy)

    def speculates(self, manifest: Manifest, asked: bool | None, *, grounded: bool) -> bool:
        """Whether a request speculates: as it asks, unless its model's switch (or the server's) is off;
        otherwise by the mode: `all` requests, or `grounded` answers only."""
        mode = manifest.speculation or self._speculation
        if mode == "off":
            return False
        if asked is not None:
            return asked
        return mode == "all" or grounded

    def _request(
        self,
        manifest: Manifest,
        prompt: str,
        max_tokens: int | None,
        request: ChatCompletionRequest | CompletionRequest,
        policy: RequestPolicy,
        json_schema: str | None = None,
        tools: ToolGrammar | None = None,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt,
            max_tokens=policy.cap_max_tokens(max_tokens if max_tokens is not None else manifest.sampling.max_tokens),
            stop=(*request.stop_list(), *manifest.stop),
            sampling=request.sampling(manifest.sampling),
            json_schema=json_schema,
            tools=tools,
            n=request.n,
            logprobs=request.logprob_count(),
            priority=request.priority_level,
            adapter=manifest.adapter,
            speculate=self.speculates(manifest, request.speculation, grounded=False),
        )

    def _cacheable(self, generation: GenerationRequest) -> bool:
        return (
            self._cache is not None and self._cache.enabled and deterministic(generation)
            and generation.n == 1 and generation.logprobs is None
        )

    async def _start(
        self,
        manifest: Manifest,
        prompt: str,
        max_tokens: int | None,
        request: ChatCompletionRequest | CompletionRequest,
        policy: RequestPolicy,
        cache_scope: str | None,
        json_schema: str | None = None,
        tools: ToolGrammar | None = None,
        attempt: Attempt | None = None,
    ) -> Generation:
        generation = self._request(manifest, prompt, max_tokens, request, policy, json_schema, tools)
        try:
            if cache_scope is None or not self._cacheable(generation):
                return await self._launch(manifest, generation, policy, attempt)
            return await self._cached(manifest, generation, policy, cache_scope, attempt)
        except ContextLengthExceeded as exc:
            # the engine cannot tell which request field held the prompt
            exc.param = "prompt" if isinstance(request, CompletionRequest) else "messages"
            raise

    def _cache_hit(
        self, manifest: Manifest, request: GenerationRequest, policy: RequestPolicy, tenant: str
    ) -> Generation | None:
        if not self._cacheable(request):
            return None
        assert self._cache is not None
        answer = self._cache.get(self._cache.key(scope_of(tenant, manifest.id, request), request.prompt))
        return None if answer is None else self._from_cache(manifest, answer, policy)

    @staticmethod
    def _from_cache(manifest: Manifest, answer: CachedAnswer, policy: RequestPolicy) -> Generation:
        final = Chunk(text=answer.text, finish_reason=answer.finish_reason, usage=answer.usage)  # type: ignore[arg-type]
        generation = Generation(manifest, final, _nothing())
        generation.cached = True
        policy.served_from_cache()
        generation.observe(policy.on_chunk)
        return generation

    async def _cached(
        self, manifest: Manifest, request: GenerationRequest, policy: RequestPolicy, tenant: str,
        attempt: Attempt | None = None,
    ) -> Generation:
        cache = self._cache
        assert cache is not None
        scope = scope_of(tenant, manifest.id, request)
        key = cache.key(scope, request.prompt)
        answer = cache.get(key)
        vector = None
        if answer is None and cache.semantic_threshold > 0 and self._embed_prompt is not None:
            vector = await self._embed_prompt(request.prompt)
            answer = None if vector is None else cache.get_similar(scope, vector)
        if answer is not None:
            return self._from_cache(manifest, answer, policy)
        generation = await self._launch(manifest, request, policy, attempt)
        parts: list[str] = []

        def remember(chunk: Chunk) -> None:
            parts.append(chunk.text)
            if chunk.finish_reason is not None and chunk.usage is not None:
                cache.put(key, scope, CachedAnswer("".join(parts), chunk.finish_reason, chunk.usage), vector)

        generation.observe(remember)
        return generation

    async def _launch(
        self, manifest: Manifest, generation: GenerationRequest, policy: RequestPolicy, attempt: Attempt | None = None
    ) -> Generation:
        policy.allow_model(manifest)
        attempt = attempt or Attempt()
        # The lease keeps the model loaded until the stream ends; `_run` releases it, whichever way it ends.
        lease = await self._registry.acquire(manifest, timeout_s=attempt.load_wait_s)
        try:
            engine: ChatEngine = lease.engine
            # Tokenised once, off the event loop; the engine takes the ids instead of tokenising again.
            ids = tuple(await asyncio.to_thread(engine.tokenize, generation.prompt))
            generation = msgspec.structs.replace(generation, prompt_ids=ids)
            if attempt.logprobs and generation.logprobs is None:
                generation = msgspec.structs.replace(generation, logprobs=0)
            prompt_tokens = len(ids)
            if attempt.fit_context and prompt_tokens + (generation.max_tokens or 0) > engine.n_ctx:
                raise ContextLengthExceeded(
                    f"The prompt ({prompt_tokens} tokens) and max_tokens ({generation.max_tokens or 0}) do not fit "
                    f"the context of model {manifest.id} ({engine.n_ctx} tokens)."
                )
            # Without max_tokens a generation may fill the context: that is what it reserves.
            limit = generation.max_tokens if generation.max_tokens is not None else engine.n_ctx - prompt_tokens
            # Off the loop: reserving journals the request (an fsync'd SQLite write).
            await asyncio.to_thread(policy.reserve, manifest, prompt_tokens, max(0, limit) * generation.n)
        except BaseException:
            lease.release()
            raise
        rest = self._run(engine, generation, lease)
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            raise EngineError("generation produced nothing") from None
        except BaseException:
            await rest.aclose()
            raise
        generation = Generation(manifest, first, rest)
        first_filter = policy.output_filter()
        if first_filter is not None:
            spare = [first_filter]
            generation.filter_output(lambda: spare.pop() if spare else policy.output_filter())
        generation.observe(policy.on_chunk)
        return generation

    async def _run(self, engine: ChatEngine, request: GenerationRequest, lease: EngineLease) -> AsyncIterator[Chunk]:
        """Submit to the engine and yield its chunks as they arrive from the engine's thread.

        Closing this iterator (client gone, error) sets `cancel`; the engine frees the sequence's
        slot at its next step. The engine's lease is released when the iterator ends.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | ApplianceError] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Chunk | ApplianceError) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                cancel.set()

        try:
            # Off the event loop: submitting compiles the request's grammar (response_format, tools).
            await asyncio.to_thread(engine.submit, request, emit, cancel)
            while True:
                item = await queue.get()
                if isinstance(item, ApplianceError):
                    raise item
                yield item
                if item.usage is not None:
                    return
        finally:
            cancel.set()
            lease.release()


async def _nothing() -> AsyncIterator[Chunk]:
    return
    yield  # an async generator that yields nothing
