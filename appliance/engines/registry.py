"""Which models this node serves, their load state, and the loaded engines.

Models are read from the store once at start-up. Loading runs on one background thread, so a
large model never blocks the event loop and /health can say "loading" meanwhile.

With a memory limit (`models.max_memory`, see `limit_memory`) models are loaded when they fit: a model
that does not fit beside the loaded ones first unloads the least recently used idle ones. Engines are
therefore used through leases (`acquire`, `use`, `try_acquire`): a model with an open lease or a
request waiting for it is never unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Literal, Protocol

import msgspec

from appliance.engines.memory import MemoryEstimate, format_bytes, release_freed_memory
from appliance.errors import (
    ApplianceError,
    EngineError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    UnsupportedForModel,
)
from appliance.modelstore.manifest import Manifest, ModelKind
from appliance.types import AdapterRef, Chunk, Embeddings, EngineStats, GenerationRequest

log = logging.getLogger(__name__)
LoadState = Literal["pending", "loading", "ready", "failed", "unloaded"]
RETRY_AFTER_S = 2
"""Retry-After of a request that found no room for its model: in-flight requests usually end within seconds."""


class Engine(Protocol):
    """What the registry needs of every engine it loads."""

    model_id: str

    @property
    def failure(self) -> str | None:
        """Why a loaded engine cannot serve now (a split model's RPC worker died); None when it can."""

    def engine_stats(self) -> EngineStats | None:
        """Counters for /health and /metrics; None for engines without a scheduler (encoders)."""

    def close(self) -> None:
        """Free the model's memory; called once, when no request holds the engine."""


class ChatEngine(Engine, Protocol):
    n_ctx: int

    def tokenize(self, text: str) -> list[int]: ...

    def submit(
        self, request: GenerationRequest, emit: Callable[[Chunk | ApplianceError], None], cancel: threading.Event
    ) -> None:
        """Queue a generation; `emit` gets each Chunk (the last has usage) or one error.

        Raises at once for requests that can never run (context length, full queue).
        """


class EmbeddingEngine(Engine, Protocol):
    max_length: int

    def embed(self, texts: list[str]) -> Embeddings: ...

    def count_tokens(self, texts: list[str], *, special: bool = True) -> list[int]: ...


class ClassifierEngine(Engine, Protocol):
    labels: list[str]

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """{label: probability} per text; never refuses a long text."""


class RerankEngine(Engine, Protocol):
    """A cross-encoder: scores (query, document) pairs, each cut to `max_length` tokens, never refused."""

    max_length: int

    def count_tokens(self, query: str, documents: list[str]) -> int:
        """Tokens of all the (query, document) pairs as the model sees them."""

    def score(self, query: str, documents: list[str]) -> list[float]:
        """One relevance logit (log-odds) per document, in order; higher is more relevant."""


AnyEngine = ChatEngine | EmbeddingEngine | ClassifierEngine | RerankEngine


EngineFactory = Callable[[Manifest], AnyEngine]
"""Builds the engine for a manifest (blocking; runs on the loader thread)."""


class _Slot:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.state: LoadState = "pending"
        self.engine: Any = None
        self.error: str | None = None
        self.future: Future[Any] | None = None
        self.load_seconds: float | None = None
        self.estimate: MemoryEstimate | None = None
        """None: outside the memory limit (no limit, or a split model whose weights live on workers)."""
        self.leases = 0
        """Open leases: requests using the engine (streams until they end or are cancelled)."""
        self.waiters = 0
        """Requests waiting for this model to load: they pin it like leases do."""
        self.last_used = 0.0
        self.never_fits = False
        """Its own estimate exceeds the memory limit: failed for good, whatever else is loaded."""
        self.loads = 0
        self.unloads = 0

    @property
    def counted(self) -> bool:
        """Its estimate counts against the limit: loaded, loading or queued to load."""
        return self.estimate is not None and self.future is not None and self.state != "failed"

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.leases == 0 and self.waiters == 0


class EngineLease:
    """One use of a loaded engine; the registry does not unload the model until it is released.

    `release` is idempotent, so an error path and a `finally` may both call it.
    """

    def __init__(self, engine: Any, release: Callable[[], None]) -> None:
        self.engine = engine
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Any:
        return self.engine

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ModelRegistry:
    def __init__(
        self,
        manifests: list[Manifest],
        factory: EngineFactory,
        *,
        load_timeout_s: float,
        n_ctx: int | None = None,
        models_dir: Path | None = None,
    ) -> None:
        """`n_ctx`: the per-sequence context the engines are built with (settings `models.n_ctx`);
        `models_dir`: where LoRA adapters' files are (the model store's root)."""
        self._n_ctx = n_ctx
        self._models_dir = models_dir
        # A LoRA adapter has no engine of its own: requests for BASE:ADAPTER run on the base model's.
        self._slots = {m.id: _Slot(m) for m in manifests if m.kind != "adapter"}
        self._adapters: dict[str, Manifest] = {}
        self._names: dict[str, str] = {}
        for m in manifests:
            for name in m.names():
                if m.kind == "adapter":
                    self._adapters.setdefault(name, m)
                else:
                    self._names.setdefault(name, m.id)
        self._factory = factory
        self._timeout = load_timeout_s
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        # Guards slot states, lease counts and the waiter list; never held across an await or a load.
        self._lock = threading.Lock()
        self._limit = 0
        self._changed: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- lookup --------------------------------------------------------------------------------

    def manifests(self) -> list[Manifest]:
        """The models with an engine (LoRA adapters are not among them: see `adapters`)."""
        return [s.manifest for s in self._slots.values()]

    def adapters(self) -> list[Manifest]:
        """Every LoRA adapter whose base model is here, as the manifest `resolve("BASE:ADAPTER")` gives."""
        found = {m.id: m for m in self._adapters.values() if m.base in self._slots}
        return [self._adapted(self._slots[m.base].manifest, m) for m in found.values()]  # type: ignore[index]

    def resolve(
        self, name: str, *, kinds: tuple[ModelKind, ...] | None = None, adapter: str | None = None
    ) -> Manifest:
        """The manifest serving model `name`: a model id or alias, or `BASE:ADAPTER` (the base model with
        a LoRA adapter); `adapter` names one as a request field does."""
        model_id = self._names.get(name)
        if model_id is None:
            base, _, tail = name.rpartition(":")
            if base in self._names and self._slots[self._names[base]].manifest.kind in ("chat", "completion"):
                return self.resolve(base, kinds=kinds, adapter=self._check_adapter_name(base, tail, adapter))
            if name in self._adapters:
                found = self._adapters[name]
                raise UnsupportedForModel(
                    f"'{name}' is a LoRA adapter of {found.base}: use the model '{found.base}:{found.id}' "
                    f"(or the model '{found.base}' with \"adapter\": \"{found.id}\").",
                    param="model",
                )
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        manifest = self._slots[model_id].manifest
        if adapter is not None:
            manifest = self._adapted(manifest, self._adapter_for(manifest, adapter))
        if kinds is not None and manifest.kind not in kinds:
            raise UnsupportedForModel(
                f"The model '{name}' is a {manifest.kind} model and cannot serve this endpoint "
                f"(it needs a {' or '.join(kinds)} model).",
                param="model",
            )
        return manifest

    def check_adapter(self, name: str | None) -> None:
        """Raise 400 unless `name` (when given) is a LoRA adapter this server has (a tenant's default)."""
        if name is not None and name not in self._adapters:
            known = sorted({m.id for m in self._adapters.values()})
            raise InvalidRequest(
                f"There is no adapter '{name}' ({'adapters: ' + ', '.join(known) if known else 'no adapters are imported'}).",
                param="default_adapter",
            )

    def with_default_adapter(self, manifest: Manifest, adapter: str | None) -> Manifest:
        """`manifest` with a tenant's default adapter when the request named none and the adapter is
        one of this model's; otherwise `manifest` as it is."""
        found = self._adapters.get(adapter) if adapter is not None else None
        if manifest.adapter is not None or found is None or found.base != manifest.id:
            return manifest
        return self._adapted(manifest, found)

    def _check_adapter_name(self, base: str, tail: str, adapter: str | None) -> str:
        if tail not in self._adapters:
            known = sorted({m.id for m in self._adapters.values() if m.base == self._names[base]})
            raise ModelNotFound(
                f"The model '{base}:{tail}' does not exist: {base} has no adapter '{tail}' "
                f"({'its adapters: ' + ', '.join(known) if known else 'it has no adapters'}).",
                param="model",
            )
        if adapter is not None and self._adapters.get(adapter) is not self._adapters[tail]:
            raise InvalidRequest(
                f"The model '{base}:{tail}' names adapter '{tail}' and the request's \"adapter\" names '{adapter}'.",
                param="adapter",
            )
        return tail

    def _adapter_for(self, manifest: Manifest, name: str) -> Manifest:
        found = self._adapters.get(name)
        if found is None:
            raise ModelNotFound(f"The adapter '{name}' does not exist.", param="adapter")
        if found.base != manifest.id:
            raise InvalidRequest(
                f"The adapter '{name}' is for model {found.base}, not {manifest.id}.", param="adapter"
            )
        return found

    def _adapted(self, base: Manifest, adapter: Manifest) -> Manifest:
        root = self._models_dir if self._models_dir is not None else Path()
        path = root / adapter.id / adapter.file.name
        return msgspec.structs.replace(
            base,
            id=f"{base.id}:{adapter.id}",
            aliases=[],
            base=base.id,
            adapter=AdapterRef(adapter.id, str(path)),
            description=f"{base.id} with the LoRA adapter {adapter.id}",
            created=adapter.created,
        )

    def context_window(self, manifest: Manifest) -> int | None:
        """Prompt plus completion tokens one request to this model can use."""
        return manifest.context_window(self._n_ctx)

    # -- the memory limit ----------------------------------------------------------------------

    def limit_memory(self, limit: int, estimates: Mapping[str, MemoryEstimate]) -> None:
        """Keep the estimates of loaded models within `limit` bytes (before loading starts).

        Models without an estimate stay outside the limit. A model whose own estimate exceeds the
        limit can never load: it is marked failed with both figures, and the log says so now.
        """
        self._limit = limit
        for model_id, estimate in estimates.items():
            slot = self._slots[model_id]
            slot.estimate = estimate
            if estimate.total > limit:
                slot.state, slot.never_fits = "failed", True
                slot.error = (
                    f"it can never fit: it needs about {format_bytes(estimate.total)} and models.max_memory "
                    f"is {format_bytes(limit)}"
                )
                log.error("model %s can never load: %s (%s)", model_id, slot.error, estimate.explain())
            else:
                log.info("model %s: %s", model_id, estimate.explain())
        log.info("models may use %s together (models.max_memory)", format_bytes(limit))

    def _used(self) -> int:
        return sum(s.estimate.total for s in self._slots.values() if s.counted and s.estimate is not None)

    def _victims(self, slot: _Slot) -> list[_Slot] | None:
        """The least recently used idle models to unload so `slot` fits; None if even all of them won't do."""
        if slot.estimate is None or not self._limit:
            return []
        short = self._used() + slot.estimate.total - self._limit
        victims: list[_Slot] = []
        for candidate in sorted(
            (s for s in self._slots.values() if s.idle and s.estimate is not None and s is not slot),
            key=lambda s: s.last_used,
        ):
            if short <= 0:
                break
            victims.append(candidate)
            short -= candidate.estimate.total if candidate.estimate is not None else 0
        return victims if short <= 0 else None

    # -- loading -------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Queue every model for loading (start-up mode); returns at once.

        Under a memory limit only what fits is loaded, in registry order; the rest loads on first use.
        """
        with self._lock:
            for slot in self._slots.values():
                if slot.state != "pending" or slot.future is not None:
                    continue
                if slot.estimate is not None and self._used() + slot.estimate.total > self._limit:
                    slot.state = "unloaded"
                    log.info(
                        "model %s does not fit beside the models loaded first (%s of %s in use): loads on first use",
                        slot.manifest.id, format_bytes(self._used()), format_bytes(self._limit),
                    )
                    continue
                self._submit(slot, [])

    def _start_load(self, slot: _Slot) -> Future[Any] | None:
        """Under the lock: queue `slot`'s load, unloading idle models to make room; None: no room now."""
        if slot.future is not None:
            return slot.future
        victims = self._victims(slot)
        if victims is None:
            return None
        engines = []
        for victim in victims:
            engines.append((victim.manifest.id, victim.engine))
            victim.engine, victim.state, victim.future = None, "unloaded", None
            victim.unloads += 1
            log.info("model %s: unloading (least recently used, idle) to make room for %s", victim.manifest.id, slot.manifest.id)
        return self._submit(slot, engines)

    def _submit(self, slot: _Slot, to_close: list[tuple[str, Any]]) -> Future[Any]:
        # The loader thread closes the unloaded engines before it loads: memory is freed before it is taken.
        slot.future = self._loader.submit(self._load, slot, to_close)
        return slot.future

    def _load(self, slot: _Slot, to_close: list[tuple[str, Any]]) -> Any:
        for model_id, engine in to_close:
            self._close_engine(model_id, engine)
        if to_close:
            release_freed_memory()
        slot.state = "loading"
        started = time.perf_counter()
        log.info("model %s: loading", slot.manifest.id)
        try:
            engine = self._factory(slot.manifest)
        except ApplianceError as exc:
            self._set_failed(slot, exc.message)
            log.error("model %s: failed to load: %s", slot.manifest.id, exc.message)
            raise
        except Exception as exc:
            self._set_failed(slot, f"{type(exc).__name__}: {exc}")
            log.exception("model %s: failed to load", slot.manifest.id)
            raise EngineError(f"model {slot.manifest.id} failed to load") from exc
        with self._lock:
            slot.engine = engine
            slot.load_seconds = time.perf_counter() - started
            slot.state = "ready"
            slot.loads += 1
            slot.last_used = time.monotonic()
            self._notify()
        log.info("model %s: ready in %.1f s", slot.manifest.id, slot.load_seconds)
        return engine

    def _set_failed(self, slot: _Slot, error: str) -> None:
        with self._lock:
            slot.state, slot.error = "failed", error
            self._notify()

    @staticmethod
    def _close_engine(model_id: str, engine: AnyEngine | None) -> None:
        if engine is None:
            return
        try:
            engine.close()
        except Exception:
            log.exception("closing %s failed", model_id)

    # -- leases --------------------------------------------------------------------------------

    def _lease(self, slot: _Slot) -> EngineLease:
        """Under the lock, on a ready slot."""
        slot.leases += 1
        slot.last_used = time.monotonic()
        return EngineLease(slot.engine, lambda: self._release(slot))

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.leases -= 1
            slot.last_used = time.monotonic()
            self._notify()

    def _notify(self) -> None:
        """Under the lock: wake every request waiting for room (they re-check; few ever wait)."""
        for loop, waiter in self._changed:
            loop.call_soon_threadsafe(_wake, waiter)
        self._changed.clear()

    def try_acquire(self, manifest: Manifest) -> EngineLease | None:
        """A lease if the model is ready, else None at once (never waits); starts loading it if it can."""
        slot = self._slots[manifest.engine_id]
        with self._lock:
            if slot.state == "ready":
                return self._lease(slot)
            if slot.state in ("pending", "unloaded"):
                self._start_load(slot)
        return None

    async def acquire(self, manifest: Manifest, *, timeout_s: float | None = None) -> EngineLease:
        """A lease on the loaded engine, loading it first if needed and waiting at most `timeout_s`
        (default load_timeout_s; a routed request waits less, then tries its next candidate).

        Raises ModelUnavailable when the model failed to load, is still loading at the deadline, or
        no room could be made (every other model in use) before it.
        """
        slot = self._slots[manifest.engine_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout if timeout_s is None else timeout_s)
        pinned = False
        try:
            while True:
                with self._lock:
                    if pinned:
                        slot.waiters, pinned = slot.waiters - 1, False
                    if slot.state == "ready":
                        return self._lease(slot)
                    if slot.state == "failed":
                        what = "cannot load" if slot.never_fits else "failed to load"
                        raise ModelUnavailable(f"The model '{manifest.id}' {what}: {slot.error}")
                    future = self._start_load(slot)
                    if future is not None:
                        slot.waiters, pinned = slot.waiters + 1, True
                        changed = None
                    else:
                        changed = loop.create_future()
                        self._changed.append((loop, changed))
                remaining = deadline - loop.time()
                if future is not None:
                    await self._wait_loaded(slot, future, remaining)
                elif not await _wait(changed, remaining):
                    raise self._no_room(slot)
        finally:
            if pinned:
                with self._lock:
                    slot.waiters -= 1
                    self._notify()

    async def _wait_loaded(self, slot: _Slot, future: Future[Any], timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(timeout, 0))
        except TimeoutError:
            raise ModelUnavailable(
                f"The model '{slot.manifest.id}' is still loading; retry shortly.", retry_after=RETRY_AFTER_S
            ) from None
        except ApplianceError:
            raise ModelUnavailable(f"The model '{slot.manifest.id}' failed to load: {slot.error}") from None

    def _no_room(self, slot: _Slot) -> ModelUnavailable:
        with self._lock:
            busy = [s.manifest.id for s in self._slots.values() if s.counted and not s.idle and s is not slot]
            used = self._used()
        need = slot.estimate.total if slot.estimate is not None else 0
        return ModelUnavailable(
            f"The model '{slot.manifest.id}' needs about {format_bytes(need)} and {format_bytes(used)} of "
            f"models.max_memory ({format_bytes(self._limit)}) is held by models in use ({', '.join(busy) or 'none'}); "
            "retry shortly.",
            retry_after=RETRY_AFTER_S,
        )

    @asynccontextmanager
    async def use(self, manifest: Manifest) -> AsyncIterator[Any]:
        """`async with registry.use(manifest) as engine:` a lease for the duration of the block."""
        lease = await self.acquire(manifest)
        try:
            yield lease.engine
        finally:
            lease.release()

    async def engine(self, manifest: Manifest) -> Any:
        """The loaded engine without a lease, for a process that serves nothing else (CLI tools).

        Under a memory limit another model's load may unload it: requests use `acquire` or `use`.
        """
        lease = await self.acquire(manifest)
        lease.release()
        return lease.engine

    def unload(self, manifest: Manifest) -> bool:
        """Unload an idle model now (Ollama's keep_alive); its next request loads it again.

        False, and nothing changes, when it is not loaded or is in use (a lease or a waiting request).
        The loader thread closes the engine, so a load queued after this one finds the memory freed.
        """
        slot = self._slots[manifest.engine_id]
        with self._lock:
            if not slot.idle:
                return False
            engine, slot.engine, slot.state, slot.future = slot.engine, None, "unloaded", None
            slot.unloads += 1
            self._notify()
        log.info("model %s: unloading (keep_alive)", manifest.id)

        def close() -> None:
            self._close_engine(manifest.id, engine)
            release_freed_memory()

        try:
            self._loader.submit(close)
        except RuntimeError:  # the registry is closing: its loader takes no more work
            self._close_engine(manifest.id, engine)
        return True

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for model_id, s in self._slots.items():
            # An engine can lose its footing after loading (a split model's RPC worker died): `failure`.
            engine = s.engine
            error = s.error or (engine.failure if engine is not None else None)
            out[model_id] = {
                "state": s.state, "kind": s.manifest.kind, "error": error, "load_seconds": s.load_seconds,
                "loads": s.loads, "unloads": s.unloads, "in_use": s.leases,
            }
            if s.estimate is not None:
                out[model_id]["memory_estimate_bytes"] = s.estimate.total
            stats = engine.engine_stats() if engine is not None else None
            if stats is not None:
                out[model_id]["engine"] = stats
        return out

    def memory(self) -> dict[str, int]:
        """The limit and the estimated bytes of the models loaded or loading under it (0, 0 without one)."""
        with self._lock:
            return {"limit_bytes": self._limit, "used_bytes": self._used() if self._limit else 0}

    def health(self) -> Literal["ok", "loading", "degraded"]:
        # An unloaded model is not a fault: it loads again on its next request.
        states = {s.state for s in self._slots.values()}
        if "failed" in states or any(s.engine is not None and s.engine.failure for s in self._slots.values()):
            return "degraded"
        if "loading" in states or any(s.state == "pending" and s.future is not None for s in self._slots.values()):
            return "loading"
        return "ok"

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        for slot in self._slots.values():
            self._close_engine(slot.manifest.id, slot.engine)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _wait(waiter: asyncio.Future[None] | None, timeout: float) -> bool:
    """False when `timeout` passed first."""
    if waiter is None or timeout <= 0:
        return False
    try:
        await asyncio.wait_for(waiter, timeout)
    except TimeoutError:
        return False
    return True
