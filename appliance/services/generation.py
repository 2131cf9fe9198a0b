"""Chat and text completions: resolve the model, build the prompt, run the engine off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.engines.registry import ModelRegistry
from appliance.errors import ApplianceError, EngineError
from appliance.modelstore.manifest import Manifest
from appliance.protocol.openai import ChatCompletionRequest, CompletionRequest
from appliance.types import Chunk, GenerationRequest, Usage

log = logging.getLogger(__name__)
_END = object()


class Generation:
    """A started generation: the first chunk is already computed, so errors surface before streaming."""

    def __init__(self, manifest: Manifest, first: Chunk, rest: AsyncIterator[Chunk]) -> None:
        self.manifest = manifest
        self._first: Chunk | None = first
        self._rest = rest

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.finish_reason is not None:
                return
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._rest.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> tuple[str, str, Usage]:
        parts: list[str] = []
        try:
            async for chunk in self:
                parts.append(chunk.text)
                if chunk.finish_reason is not None and chunk.usage is not None:
                    return "".join(parts), chunk.finish_reason, chunk.usage
        finally:
            await self.aclose()
        raise EngineError("generation ended without a final chunk")


class GenerationService:
    def __init__(self, registry: ModelRegistry, *, max_workers: int = 64) -> None:
        self._registry = registry
        # Generations wait on a per-model lock inside their thread; a dedicated pool keeps them
        # from starving the default executor that other blocking work uses.
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate")
        self._templates = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def render_chat(self, manifest: Manifest, request: ChatCompletionRequest) -> str:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(request.messages)]
        if messages[-1]["role"] == "assistant":
            # A trailing assistant message is a prefill: continue it rather than open a new turn.
            add_generation_prompt = False
        else:
            add_generation_prompt = True
        try:
            template = self._templates.from_string(manifest.chat_template or "")
            prompt = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as exc:
            log.error("chat template of %s failed: %s", manifest.id, exc)
            raise EngineError(f"the chat template of model {manifest.id} failed to render") from None
        if not add_generation_prompt:
            prompt = prompt.rstrip()
            for marker in manifest.stop:
                if prompt.endswith(marker):
                    prompt = prompt[: -len(marker)]
        return prompt

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        request.check()
        manifest = self._registry.resolve(request.model, kinds=("chat",))
        prompt = self.render_chat(manifest, request)
        return await self._start(manifest, prompt, request.token_limit, request)

    async def complete(self, request: CompletionRequest) -> Generation:
        request.check()
        manifest = self._registry.resolve(request.model, kinds=("chat", "completion"))
        return await self._start(manifest, request.prompt_text, request.max_tokens, request)

    async def _start(
        self,
        manifest: Manifest,
        prompt: str,
        max_tokens: int | None,
        request: ChatCompletionRequest | CompletionRequest,
    ) -> Generation:
        engine = await self._registry.engine(manifest)
        generation = GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens if max_tokens is not None else manifest.sampling.max_tokens,
            stop=(*request.stop_list(), *manifest.stop),
            sampling=request.sampling(manifest.sampling),
        )
        rest = self._run(engine, generation)
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            raise EngineError("generation produced nothing") from None
        except BaseException:
            await rest.aclose()
            raise
        return Generation(manifest, first, rest)

    async def _run(self, engine: object, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Iterate the engine's blocking generator on a worker thread, yielding chunks here.

        Closing this iterator (client gone, error) sets `cancel`, and the engine stops at its next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for chunk in engine.generate(request, cancel):  # type: ignore[attr-defined]
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                    if cancel.is_set():
                        break
            except BaseException as exc:  # delivered to the awaiting side and raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        loop.run_in_executor(self._pool, work)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, ApplianceError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineError("generation failed") from item
                yield item  # type: ignore[misc]
        finally:
            cancel.set()

