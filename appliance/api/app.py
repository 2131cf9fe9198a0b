"""The Litestar application factory. Long-lived objects are built here and injected, never global."""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata, resources
from typing import Any

import numpy as np
from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException

from appliance import __version__
from appliance.api.errors import handle_appliance_error, handle_http_exception, handle_unexpected
from appliance.api.admin import AdminController, metrics, usage_report
from appliance.api.cluster import cluster_state
from appliance.api.documents import DocumentsController
from appliance.api.feedback import feedback
from appliance.api.gateway import context_of, gateway_middleware
from appliance.api.ollama import OllamaController
from appliance.api.responses import create_response
from appliance.api.openai import OpenAIController
from appliance.api.rerank import rerank
from appliance.api.openapi import HealthReport, VersionInfo, openapi_handlers
from appliance.engines.memory import estimate_models, max_memory_bytes
from appliance.engines.registry import ModelRegistry
from appliance.errors import ApplianceError
from appliance.observability.metrics import Metrics
from appliance.peering.cluster import Cluster
from appliance.policy.gateway import Gateway, RequestContext, loopback_host
from appliance.services.ask import AskService
from appliance.services.cache import ResponseCache
from appliance.services.documents import DocumentService
from appliance.services.embeddings import EmbeddingService
from appliance.services.generation import GenerationService
from appliance.services.routing import RoutingService
from appliance.services.injection_classifier import injection_classifier
from appliance.services.rerank import RerankService
from appliance.settings import Settings

log = logging.getLogger(__name__)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


_HEALTH = {"response": HealthReport, "responses": {503: HealthReport}, "summary": "Can the server serve?"}


@get("/health", sync_to_thread=False, opt=_HEALTH)
def health(registry: ModelRegistry, cluster: Cluster) -> Response[dict[str, object]]:
    status = registry.health()
    models = registry.status()
    # `ok` means the server can serve: with models.load = "lazy" (or after an unload) a model waits,
    # `pending` or `unloaded`, until its first request loads it. `waiting` names those models.
    waiting = sorted(m for m, s in models.items() if s["state"] in ("pending", "unloaded"))
    body: dict[str, object] = {"status": status, "waiting": waiting, "models": models}
    if cluster.enabled:
        body["cluster"] = cluster.health()  # a peer that is down does not make this node unhealthy
    return Response(body, status_code=200 if status == "ok" else 503)


_PAGE_HEADERS = {
    # Air-gapped page: nothing but this server, ever.
    # frame-ancestors: no other page may frame this one (clickjacking); X-Frame-Options for old browsers.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def _page_handler() -> Any:
    page = (resources.files("appliance") / "web" / "index.html").read_bytes()

    @get("/", sync_to_thread=False, opt={"response": str, "media_type": "text/html", "summary": "Document Q&A page"})
    def index() -> Response[bytes]:
        return Response(page, media_type=MediaType.HTML, headers=_PAGE_HEADERS)  # Litestar adds the charset

    return index


@get("/version", sync_to_thread=False, opt={"response": VersionInfo, "summary": "Versions of the appliance and its engines"})
def version() -> dict[str, object]:
    return {
        "version": __version__,
        "llama_cpp_python": _package_version("llama_cpp_python"),
        "onnxruntime": _package_version("onnxruntime") or _package_version("onnxruntime-gpu"),
    }


async def _resume(documents: DocumentService) -> None:
    try:
        await documents.resume()
    except ApplianceError as exc:
        log.error("resuming interrupted ingestion failed: %s", exc.message)
    except Exception:
        log.exception("resuming interrupted ingestion failed")


def _prompt_embedder(registry: ModelRegistry, settings: Settings) -> Any:
    """Embeds prompts for the semantic cache with the retrieval embedding model (unit length)."""

    async def embed(text: str) -> np.ndarray | None:
        try:
            manifest = registry.resolve(settings.retrieval.embedding_model, kinds=("embedding",))
            lease = await registry.acquire(manifest)
        except ApplianceError:
            return None
        with lease as engine:
            vector = np.asarray((await asyncio.to_thread(engine.embed, [text])).vectors[0], dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm else None

    return embed


def _request_context(request: Request) -> RequestContext:
    return context_of(request.scope)


def create_app(settings: Settings, registry: ModelRegistry) -> Litestar:
    """Raises SettingsError when a setting names a model the registry cannot serve for it."""
    if limit := max_memory_bytes(settings.models):
        registry.limit_memory(limit, estimate_models(registry.manifests(), settings.models_dir, settings.models))
    gateway = Gateway(
        settings.data_dir,
        settings.gateway,
        open_mode_allowed=loopback_host(settings.server.host),
        metrics=Metrics(registry.status, registry.memory),
        injection_classifier=injection_classifier(settings.gateway, registry),
        retrieved_injection_classifier=injection_classifier(settings.gateway, registry, retrieved=True),
    )
    gateway.replay_interrupted()
    cache = ResponseCache(
        ttl_s=settings.gateway.cache_ttl_s,
        max_entries=settings.gateway.cache_max_entries,
        semantic_threshold=settings.gateway.semantic_cache_threshold,
    )
    generation = GenerationService(
        registry, cache, embed_prompt=_prompt_embedder(registry, settings), speculation=settings.models.speculation
    )
    routing = RoutingService(settings.routing, registry, generation, slots=settings.models.parallel,
                             peers=settings.cluster.enabled and bool(settings.cluster.peers))
    embeddings = EmbeddingService(registry, max_inputs=settings.models.max_embedding_inputs)
    reranker = RerankService(registry, default_model=settings.retrieval.rerank_model)
    documents = DocumentService(
        settings.data_dir / "collections",
        registry,
        embedding_model=settings.retrieval.embedding_model,
        reranker=reranker,
        on_search=lambda mode, seconds: gateway.metrics.retrieval.labels(mode=mode).observe(seconds),
        context_headers=settings.retrieval.context_headers,
        fusion=settings.retrieval.fusion,
    )

    ask = AskService(
        documents, generation, registry, default_model=settings.retrieval.answer_model,
        answer_mode=settings.retrieval.answer_mode,
    )
    cluster = Cluster(settings.cluster, registry, port=settings.server.port)

    background: list[asyncio.Task[None]] = []

    async def start_loading() -> None:
        if settings.models.load == "startup":
            registry.load_all()
        if settings.retrieval.resume_on_start and any(m.kind == "embedding" for m in registry.manifests()):
            asyncio.get_running_loop().create_task(_resume(documents))
        background.append(asyncio.get_running_loop().create_task(gateway.metrics.loop_lag.run()))

    async def shutdown() -> None:
        for task in background:
            task.cancel()
        await routing.close()
        documents.close()
        registry.close()
        gateway.close()

    def const(value: object) -> Provide:
        return Provide(lambda: value, sync_to_thread=False, use_cache=True)

    return Litestar(
        route_handlers=[
            _page_handler(), health, version, metrics, usage_report,
            OpenAIController, create_response, feedback, OllamaController, rerank, DocumentsController, AdminController, cluster_state, *openapi_handlers(_PAGE_HEADERS),
        ],
        middleware=[gateway_middleware(gateway, peer_auth=cluster.verifier)],
        dependencies={
            "ctx": Provide(_request_context, sync_to_thread=False),
            "gateway": const(gateway),
            "registry": const(registry),
            "generation_service": const(generation),
            "routing_service": const(routing),
            "embedding_service": const(embeddings),
            "rerank_service": const(reranker),
            "document_service": const(documents),
            "ask_service": const(ask),
            "cluster": const(cluster),
        },
        exception_handlers={
            ApplianceError: handle_appliance_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        on_startup=[start_loading, cluster.start],
        on_shutdown=[cluster.stop, shutdown],
        request_max_body_size=settings.server.max_body_bytes,
        state=State({"settings": settings}),
        openapi_config=None,
        logging_config=None,  # the CLI configures logging (JSON lines, PII redaction)
        debug=False,
    )
