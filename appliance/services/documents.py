"""Document collections: create, ingest files or text, list, delete, search. No HTTP in here."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from appliance.engines.registry import ModelRegistry
from appliance.errors import CollectionExists, CollectionNotFound, DocumentNotFound, InvalidRequest, ModelUnavailable
from appliance.modelstore.manifest import Manifest
from appliance.retrieval.chunking import Chunker
from appliance.retrieval.collection import Collection, DocumentInput, Hit, IngestResult, SearchFilter
from appliance.retrieval.parsing import DocumentError, Section, parse
from appliance.services.rerank import RerankService

log = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DOC_ID = re.compile(r"^[^\x00-\x1f/\\]{1,200}$")
RERANK_CANDIDATES = 20
"""Fused hits a reranked search hands the cross-encoder (at least; top_k when it asks for more)."""


class FileResult(msgspec.Struct):
    document_id: str | None
    source: str
    status: str
    chunks: int = 0
    error: str | None = None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            "Collection names use letters, digits, '_' and '-' (at most 64, starting with a letter or digit).",
            param="name",
        )
    return name


def check_document_id(doc_id: str) -> str:
    if not _DOC_ID.match(doc_id):
        raise InvalidRequest("Document ids are 1-200 characters without control characters or slashes.", param="id")
    return doc_id


class DocumentService:
    def __init__(
        self,
        root: Path,
        registry: ModelRegistry,
        *,
        embedding_model: str,
        reranker: RerankService | None = None,
        on_search: Callable[[str, float], None] | None = None,
        context_headers: bool = False,
        fusion: str = "fixed",
    ) -> None:
        """`reranker`: serves searches that ask for `rerank` (with retrieval.rerank_model); None refuses them.
        `context_headers`: new collections embed chunks behind their title and heading (retrieval.context_headers);
        `fusion`: hybrid search's weighting, fixed or adaptive (retrieval.fusion)."""
        self._root = root
        self._registry = registry
        self._embedding_name = embedding_model
        self._reranker = reranker or RerankService(registry)
        self._on_search = on_search
        """Told each search's mode and seconds (the retrieval latency metric)."""
        self._context_headers = context_headers
        self._fusion = fusion
        self._open: dict[tuple[str, str], Collection] = {}
        self._opening: dict[tuple[str, str], asyncio.Lock] = {}
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _dir(self, tenant: str, name: str) -> Path:
        return self._root / tenant / check_name(name)

    async def embedder(self) -> tuple[Manifest, Any]:
        """The embedding model and its engine, unleased: for tools that load nothing else (CLI evaluation)."""
        manifest = self._registry.resolve(self._embedding_name, kinds=("embedding",))
        return manifest, await self._registry.engine(manifest)

    async def reranker_engine(self) -> Any:
        """The engine of retrieval.rerank_model, unleased: for tools that load nothing else (CLI evaluation)."""
        return await self._registry.engine(self._reranker.default())

    @staticmethod
    def chunker_for(engine: Any) -> Chunker:
        return Chunker(lambda texts: engine.count_tokens(texts, special=False), max_tokens=engine.max_length)

    def _leased_chunker(self, manifest: Manifest, max_tokens: int) -> Chunker:
        """A chunker that holds no engine: a collection outlives loads and unloads of its embedding model.

        It counts tokens only while an ingest holds a lease on the model, so the model is loaded.
        """

        def count(texts: list[str]) -> list[int]:
            lease = self._registry.try_acquire(manifest)
            if lease is None:
                raise ModelUnavailable(f"The model '{manifest.id}' is not loaded; retry shortly.", retry_after=1)
            with lease as engine:
                return engine.count_tokens(texts, special=False)

        return Chunker(count, max_tokens=max_tokens)

    @staticmethod
    def embed_fn(engine: Any) -> Callable[[list[str]], np.ndarray]:
        return lambda texts: np.asarray(engine.embed(texts).vectors, dtype=np.float32)

    async def _collection(self, tenant: str, name: str, *, create: bool = False) -> tuple[Collection, Manifest]:
        path = self._dir(tenant, name)
        key = (tenant, name)
        manifest = self._registry.resolve(self._embedding_name, kinds=("embedding",))
        # The threading lock guards the dicts only and is never held across an await; concurrent first
        # opens of one collection wait on that collection's asyncio gate, inside the event loop.
        with self._lock:
            col = self._open.get(key)
            gate = self._opening.setdefault(key, asyncio.Lock()) if col is None else None
        if gate is None:
            return col, manifest  # type: ignore[return-value]
        async with gate:
            with self._lock:
                col = self._open.get(key)
            if col is not None:
                return col, manifest
            if not path.exists() and not create:
                raise CollectionNotFound(_not_found(name), param="name")
            async with self._registry.use(manifest) as engine:
                max_tokens = engine.max_length
            col = await asyncio.to_thread(
                Collection,
                path,
                embedding_model=manifest.id,
                ndim=manifest.embedding_dim or 384,
                chunker=self._leased_chunker(manifest, max_tokens),
                context_headers=self._context_headers,
                fusion=self._fusion,
            )
            with self._lock:
                self._open[key] = col
                self._opening.pop(key, None)
        return col, manifest

    def close(self) -> None:
        with self._lock:
            for col in self._open.values():
                col.close()
            self._open.clear()

    # -- collections ---------------------------------------------------------------------------

    async def create(self, tenant: str, name: str) -> dict[str, Any]:
        if self._dir(tenant, name).exists():
            raise CollectionExists(f"Collection '{name}' already exists.", param="name")
        col, _ = await self._collection(tenant, name, create=True)
        return {"name": name, **col.stats()}

    def list(self, tenant: str) -> list[dict[str, Any]]:
        base = self._root / tenant
        if not base.is_dir():
            return []
        out = []
        for path in sorted(base.iterdir()):
            if path.is_dir() and _NAME.match(path.name):
                col = self._open.get((tenant, path.name))
                out.append({"name": path.name, **(col.stats() if col else {})})
        return out

    async def delete(self, tenant: str, name: str) -> None:
        path = self._dir(tenant, name)
        with self._lock:
            col = self._open.pop((tenant, name), None)
        if col is not None:
            await asyncio.to_thread(col.close)
        if not path.exists():
            raise CollectionNotFound(_not_found(name), param="name")
        trash = path.with_name(f".deleting-{path.name}")
        path.rename(trash)
        await asyncio.to_thread(shutil.rmtree, trash, True)

    # -- documents -----------------------------------------------------------------------------

    async def ingest(self, tenant: str, name: str, docs: list[DocumentInput]) -> list[IngestResult]:
        """Chunk, embed and index parsed documents (the one path every ingest takes)."""
        col, manifest = await self._collection(tenant, name)
        async with self._registry.use(manifest) as engine:
            return await asyncio.to_thread(col.ingest, docs, self.embed_fn(engine))

    async def ingest_files(self, tenant: str, name: str, files: list[tuple[str, bytes]]) -> list[FileResult]:
        if not files:
            raise InvalidRequest("No files were uploaded.", param="files")
        await self._collection(tenant, name)  # a missing collection fails before any parsing
        results: list[FileResult] = []
        inputs: list[tuple[int, DocumentInput]] = []
        for filename, data in files:
            source = Path(filename).name or "upload"
            try:
                sections = await asyncio.to_thread(parse, source, data)
            except DocumentError as exc:
                results.append(FileResult(None, source, "failed", error=exc.message))
                continue
            doc = DocumentInput(check_document_id(source), _title(source, sections), source, sections)
            results.append(FileResult(doc.id, source, "pending"))
            inputs.append((len(results) - 1, doc))
        done = await self.ingest(tenant, name, [d for _, d in inputs])
        for (i, _), res in zip(inputs, done):
            results[i] = FileResult(res.document_id, results[i].source, res.status, res.chunks, res.error)
        return results

    async def ingest_text(
        self, tenant: str, name: str, text: str, *, doc_id: str | None, title: str | None, metadata: dict[str, Any]
    ) -> IngestResult:
        if not text.strip():
            raise InvalidRequest("The document text is empty.", param="text")
        doc_id = check_document_id(doc_id or hashlib.sha256(text.encode()).hexdigest()[:16])
        [result] = await self.ingest(tenant, name, [DocumentInput(doc_id, title or doc_id, "text", [Section(text)], metadata)])
        return result

    async def documents(self, tenant: str, name: str) -> list[dict[str, Any]]:
        col, _ = await self._collection(tenant, name)
        return col.documents()

    async def delete_document(self, tenant: str, name: str, doc_id: str) -> None:
        col, _ = await self._collection(tenant, name)
        if not await asyncio.to_thread(col.delete, doc_id):
            raise DocumentNotFound(f"Document '{doc_id}' is not in collection '{name}'.", param="id")

    async def search(
        self, tenant: str, name: str, query: str, *, top_k: int, mode: str, flt: SearchFilter | None,
        rerank: bool = False,
    ) -> list[Hit]:
        """`rerank`: the cross-encoder reorders the best RERANK_CANDIDATES hits, and each hit's score becomes
        its relevance_score (0..1). Like the query's embedding, it is part of the search, not metered apart."""
        if not query.strip():
            raise InvalidRequest("The query is empty.", param="query")
        reranker = self._reranker.default() if rerank else None  # refused before any work
        col, manifest = await self._collection(tenant, name)
        async with self._registry.use(manifest) as engine:
            embed = self.embed_fn(engine)
            started = time.perf_counter()
            hits = await asyncio.to_thread(
                col.search, query, top_k=max(top_k, RERANK_CANDIDATES) if rerank else top_k, mode=mode,
                query_vector=lambda: embed([_clip(engine, query)])[0], flt=flt,
            )
        if reranker is not None and hits:
            ranking = await self._reranker.rerank(reranker, query, [h.text for h in hits], top_n=top_k)
            hits = [msgspec.structs.replace(hits[r.index], score=round(r.relevance_score, 6)) for r in ranking.results]
        if self._on_search is not None:
            self._on_search(f"{mode}+rerank" if rerank else mode, time.perf_counter() - started)
        return hits

    async def sentence_scores(self, question: str, sentences: list[str]) -> list[float]:
        """How well each sentence answers the question (higher is better): the cross-encoder's relevance
        when retrieval.rerank_model is set, else the cosine of the embedding model's vectors."""
        if not sentences:
            return []
        try:
            reranker = self._reranker.default()
        except InvalidRequest:
            reranker = None
        if reranker is not None:
            ranking = await self._reranker.rerank(reranker, question, sentences)
            scores = [0.0] * len(sentences)
            for r in ranking.results:
                scores[r.index] = r.relevance_score
            return scores
        manifest = self._registry.resolve(self._embedding_name, kinds=("embedding",))
        async with self._registry.use(manifest) as engine:
            embed = self.embed_fn(engine)
            vectors = await asyncio.to_thread(lambda: embed([_clip(engine, question), *(_clip(engine, s) for s in sentences)]))
        return [float(v) for v in vectors[1:] @ vectors[0]]

    async def resume(self) -> None:
        """Re-ingest documents a crash left pending (their text is kept in the registry)."""
        base = self._root
        if not base.is_dir():
            return
        for tenant_dir in base.iterdir():
            for path in tenant_dir.iterdir() if tenant_dir.is_dir() else []:
                if not _NAME.match(path.name):
                    continue
                col, _ = await self._collection(tenant_dir.name, path.name)
                pending = col.pending()
                if pending:
                    log.info("collection %s: resuming %d documents", path.name, len(pending))
                    await self.ingest(tenant_dir.name, path.name, pending)


def _not_found(name: str) -> str:
    return (
        f"Collection '{name}' does not exist. Create it first: POST /v1/collections {{\"name\": \"{name}\"}}, "
        "or add --create to `appliance ingest`."
    )


def _title(source: str, sections: list[Section]) -> str:
    for s in sections:
        if s.outer_headings:  # a document's first heading may have no body of its own: it was carried on
            return s.outer_headings[0]
        if s.heading:
            return s.heading
    return Path(source).stem


def _clip(engine: Any, query: str) -> str:
    """Queries longer than the encoder's window are cut to it rather than refused."""
    if engine.count_tokens([query], special=True)[0] <= engine.max_length:
        return query
    return engine.truncate(query)
