"""Which models this node serves, their load state, and the loaded engines.

Models are read from the store once at start-up. Loading runs on one background thread, so a
large model never blocks the event loop and /health can say "loading" meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, Protocol

from appliance.errors import ApplianceError, EngineError, ModelNotFound, ModelUnavailable, UnsupportedForModel
from appliance.modelstore.manifest import Manifest, ModelKind
from appliance.types import Chunk, Embeddings, GenerationRequest

log = logging.getLogger(__name__)
LoadState = Literal["pending", "loading", "ready", "failed"]


class ChatEngine(Protocol):
    model_id: str
    n_ctx: int

    def submit(
        self, request: GenerationRequest, emit: Callable[[Chunk | ApplianceError], None], cancel: threading.Event
    ) -> None:
        """Queue a generation; `emit` gets each Chunk (the last has finish_reason) or one error.

        Raises at once for requests that can never run (context length, full queue).
        """

    def close(self) -> None: ...


class EmbeddingEngine(Protocol):
    model_id: str

    def embed(self, texts: list[str]) -> Embeddings: ...


class ClassifierEngine(Protocol):
    model_id: str
    labels: list[str]

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """{label: probability} per text; never refuses a long text."""


EngineFactory = Callable[[Manifest], Any]
"""Builds the engine for a manifest (blocking; runs on the loader thread)."""


class _Slot:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.state: LoadState = "pending"
        self.engine: Any = None
        self.error: str | None = None
        self.future: Future[Any] | None = None
        self.load_seconds: float | None = None


class ModelRegistry:
    def __init__(self, manifests: list[Manifest], factory: EngineFactory, *, load_timeout_s: float) -> None:
        self._slots = {m.id: _Slot(m) for m in manifests}
        self._names: dict[str, str] = {}
        for m in manifests:
            for name in m.names():
                self._names.setdefault(name, m.id)
        self._factory = factory
        self._timeout = load_timeout_s
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._lock = threading.Lock()

    # -- lookup --------------------------------------------------------------------------------

    def manifests(self) -> list[Manifest]:
        return [s.manifest for s in self._slots.values()]

    def resolve(self, name: str, *, kinds: tuple[ModelKind, ...] | None = None) -> Manifest:
        model_id = self._names.get(name)
        if model_id is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        manifest = self._slots[model_id].manifest
        if kinds is not None and manifest.kind not in kinds:
            raise UnsupportedForModel(
                f"The model '{name}' is a {manifest.kind} model and cannot serve this endpoint "
                f"(it needs a {' or '.join(kinds)} model).",
                param="model",
            )
        return manifest

    # -- loading -------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Queue every model for loading (start-up mode); returns at once."""
        for slot in self._slots.values():
            self._submit(slot)

    def _submit(self, slot: _Slot) -> Future[Any]:
        with self._lock:
            if slot.future is None:
                slot.future = self._loader.submit(self._load, slot)
            return slot.future

    def _load(self, slot: _Slot) -> Any:
        slot.state = "loading"
        started = time.perf_counter()
        log.info("model %s: loading", slot.manifest.id)
        try:
            slot.engine = self._factory(slot.manifest)
        except ApplianceError as exc:
            slot.state, slot.error = "failed", exc.message
            log.error("model %s: failed to load: %s", slot.manifest.id, exc.message)
            raise
        except Exception as exc:
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("model %s: failed to load", slot.manifest.id)
            raise EngineError(f"model {slot.manifest.id} failed to load") from exc
        slot.load_seconds = time.perf_counter() - started
        slot.state = "ready"
        log.info("model %s: ready in %.1f s", slot.manifest.id, slot.load_seconds)
        return slot.engine

    def loaded(self, manifest: Manifest) -> Any | None:
        """The engine if it is ready, else None at once (never waits); starts loading it if nothing has."""
        slot = self._slots[manifest.id]
        if slot.state == "ready":
            return slot.engine
        if slot.state == "pending":
            self._submit(slot)
        return None

    async def engine(self, manifest: Manifest) -> Any:
        """The loaded engine, loading it first if needed (lazy mode) and waiting at most the timeout."""
        slot = self._slots[manifest.id]
        if slot.state == "ready":
            return slot.engine
        if slot.state == "failed":
            raise ModelUnavailable(f"The model '{manifest.id}' failed to load: {slot.error}")
        future = asyncio.wrap_future(self._submit(slot))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            raise ModelUnavailable(f"The model '{manifest.id}' is still loading; retry shortly.") from None
        except ApplianceError:
            raise ModelUnavailable(f"The model '{manifest.id}' failed to load: {slot.error}") from None

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for model_id, s in self._slots.items():
            # An engine can lose its footing after loading (a split model's RPC worker died): `failure`.
            error = s.error or getattr(s.engine, "failure", None)
            out[model_id] = {"state": s.state, "kind": s.manifest.kind, "error": error, "load_seconds": s.load_seconds}
            stats = getattr(s.engine, "stats", None)
            if stats is not None:
                out[model_id]["engine"] = stats.snapshot()
        return out

    def health(self) -> Literal["ok", "loading", "degraded"]:
        states = {s.state for s in self._slots.values()}
        if "failed" in states or any(getattr(s.engine, "failure", None) for s in self._slots.values()):
            return "degraded"
        if "loading" in states or any(s.state == "pending" and s.future is not None for s in self._slots.values()):
            return "loading"
        return "ok"

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        for slot in self._slots.values():
            close = getattr(slot.engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", slot.manifest.id)
