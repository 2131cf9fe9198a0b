"""A collection on disk: SQLite registry (the source of truth), a tantivy index and a usearch index.

Ingest protocol, crash-safe at every step:
  1. registry: the document row is written (or flipped) to `pending` with its text, and its new chunk
     rows are inserted with live = 0;
  2. tantivy: the document's old chunks are deleted, the new ones added, commit (atomic);
  3. usearch: old keys removed, new vectors added, saved to a temp file, fsynced, renamed;
  4. registry: old chunk rows deleted, new ones live = 1, document `ready`: only now is it reported.
Search only returns live chunks of ready documents, so nothing half-ingested is ever visible. On open,
documents left `pending` or `deleting` by a crash are scrubbed from both indexes; pending ones keep
their text so `resume` can ingest them again.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from appliance.retrieval.chunking import Chunk, Chunker, content_digest, full_text
from appliance.retrieval.fusion import Candidates, fuse_hybrid
from appliance.retrieval.lexical import LexicalChunk, LexicalIndex
from appliance.retrieval.parsing import Section
from appliance.retrieval.vector import VectorIndex
from appliance.types import SearchFilter
from appliance.storage.files import commit_lock
from appliance.storage.sqlite import connect, migrate

log = logging.getLogger(__name__)
Embed = Callable[[list[str]], np.ndarray]
COMPACT_TOMBSTONE_SHARE = 0.25
BATCH_CHUNKS = 2048  # chunks per commit of a large ingest


def _m1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE documents (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            source TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            content_hash TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'deleting')),
            chunk_count INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    conn.execute(
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            text TEXT NOT NULL,
            start INTEGER NOT NULL,
            end INTEGER NOT NULL,
            page INTEGER,
            heading TEXT,
            tokens INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            live INTEGER NOT NULL DEFAULT 0
        )"""
    )
    conn.execute("CREATE INDEX chunks_by_document ON chunks(document_id)")
    # The full text (kept for resuming) lives apart: large rows would slow every lookup of a document.
    conn.execute(
        """CREATE TABLE document_texts (
            id TEXT PRIMARY KEY REFERENCES documents(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            sections TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _m2(conn: sqlite3.Connection) -> None:
    # Recovery and resume look documents up by state at every open (data format 2, release 0.2).
    conn.execute("CREATE INDEX IF NOT EXISTS documents_by_state ON documents(state)")


MIGRATIONS = [_m1, _m2]


class DocumentInput(msgspec.Struct, frozen=True):
    id: str
    title: str
    source: str
    sections: list[Section]
    metadata: dict[str, Any] = {}


class IngestResult(msgspec.Struct):
    document_id: str
    status: str  # ingested | unchanged | failed
    chunks: int = 0
    error: str | None = None


class Hit(msgspec.Struct):
    chunk_id: int
    document_id: str
    title: str
    source: str
    page: int | None
    heading: str | None
    text: str
    start: int
    end: int
    score: float
    metadata: dict[str, Any]
    snippet: str = ""
    highlights: list[tuple[int, int]] = []


HEADER_TOKENS = 32
"""Most tokens of a chunk's contextual header (title, section heading) in its embedding window; at most
an eighth of the window. The chunks themselves are cut as without headers (BM25 sees the same chunks)."""


def context_header(title: str, heading: str | None) -> str:
    """What a chunk's embedding is told of where it comes from: "Title > Heading"."""
    parts = [p for p in (" ".join(title.split()), " ".join((heading or "").split())) if p]
    return " > ".join(dict.fromkeys(parts))


class Collection:
    def __init__(
        self, path: Path, *, embedding_model: str, ndim: int, chunker: Chunker, context_headers: bool = False,
        fusion: str = "fixed",
    ) -> None:
        """`context_headers`: embed each chunk of a *new* collection with its document title and section
        heading. A collection keeps what it was created with (meta `context_headers`; collections made
        before it existed have none and keep embedding the bare chunk), so its vectors never mix kinds.
        `fusion`: how hybrid search weighs its halves (fusion.FUSIONS), a query-time choice."""
        self.path = path
        self.name = path.name
        self.fusion = fusion
        path.mkdir(parents=True, exist_ok=True)
        self._db = connect(path / "registry.sqlite")
        migrate(self._db, MIGRATIONS)
        self._check_meta(embedding_model, ndim, context_headers)
        self._lexical = LexicalIndex(path / "lexical")
        self._vectors = VectorIndex(path / "vectors.usearch", ndim)
        self._header_tokens = min(HEADER_TOKENS, chunker.max_tokens // 8)
        self._chunker = chunker
        self._write = threading.Lock()  # one writer per collection
        self._vector_lock = threading.Lock()  # usearch: no search during add/remove
        self.recover()

    def _check_meta(self, model: str, ndim: int, context_headers: bool) -> None:
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            rows = {"embedding_model": model, "ndim": str(ndim), "tombstones": "0",
                    "context_headers": "1" if context_headers else "0"}
            self._db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(rows.items()))
        elif rows.get("embedding_model") != model or rows.get("ndim") != str(ndim):
            raise ValueError(
                f"collection {self.name} was built with {rows.get('embedding_model')} ({rows.get('ndim')} dims), "
                f"not {model} ({ndim} dims)"
            )
        elif "context_headers" not in rows:
            # Made before contextual headers: its vectors embed bare chunks, and new ones must match them.
            self._db.execute("INSERT INTO meta(key, value) VALUES ('context_headers', '0')")
            rows["context_headers"] = "0"
        self.context_headers = rows["context_headers"] == "1"

    def close(self) -> None:
        with self._write:
            self._lexical.close()
            self._db.close()

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> None:
        """Scrub what a crash left half-done from both indexes (see the module docstring)."""
        with self._write, commit_lock(self.path):
            stale = self._db.execute("SELECT id, state FROM documents WHERE state != 'ready'").fetchall()
            if not stale:
                return
            keys = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM chunks WHERE document_id IN ({','.join('?' * len(stale))})", [r[0] for r in stale]
                )
            ]
            for row in stale:
                self._lexical.delete_document(row[0])
            self._lexical.commit()
            with self._vector_lock:
                self._vectors.remove(keys)
                self._vectors.save()
            self._db.execute("BEGIN IMMEDIATE")
            for doc_id, state in stale:
                self._db.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
                if state == "deleting":
                    self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                else:
                    self._db.execute("UPDATE documents SET chunk_count = 0 WHERE id = ?", (doc_id,))
            self._db.execute("COMMIT")
            log.warning("collection %s: recovered %d interrupted documents", self.name, len(stale))

    def pending(self) -> list[DocumentInput]:
        rows = self._db.execute(
            "SELECT d.id, d.title, d.source, d.metadata, t.sections FROM documents d "
            "JOIN document_texts t ON t.id = d.id WHERE d.state = 'pending'"
        )
        return [
            DocumentInput(r[0], r[1], r[2], msgspec.json.decode(r[4], type=list[Section]), json.loads(r[3]))
            for r in rows.fetchall()
        ]

    # -- writes --------------------------------------------------------------------------------

    def ingest(
        self, docs: list[DocumentInput], embed: Embed, progress: Callable[[int], None] | None = None
    ) -> list[IngestResult]:
        """Chunk, embed and index documents; unchanged ones (same content hash) are skipped.

        Documents go through the commit protocol in batches (one tantivy commit and one usearch save
        per batch); a batch becomes visible all at once.
        """
        results: list[IngestResult] = []
        with self._write:
            batch: list[tuple[DocumentInput, str, list[Chunk]]] = []
            size = 0
            seen: set[str] = set()
            for doc in docs:
                if doc.id in seen:
                    results.append(IngestResult(doc.id, "failed", error="the same document id twice in one request"))
                    continue
                seen.add(doc.id)
                prepared = self._prepare(doc)
                if isinstance(prepared, IngestResult):
                    results.append(prepared)
                    if progress:
                        progress(1)
                    continue
                batch.append(prepared)
                size += len(prepared[2])
                if size >= BATCH_CHUNKS:
                    results += self._commit_batch(batch, embed, progress)
                    batch, size = [], 0
            if batch:
                results += self._commit_batch(batch, embed, progress)
            self._maybe_compact()
        order: dict[str, int] = {}
        for i, d in enumerate(docs):
            order.setdefault(d.id, i)
        return sorted(results, key=lambda r: (order.get(r.document_id, 0), r.status == "failed"))

    def _prepare(self, doc: DocumentInput) -> IngestResult | tuple[DocumentInput, str, list[Chunk]]:
        text = full_text(doc.sections)
        content_hash = content_digest(text + json.dumps(doc.metadata, sort_keys=True) + doc.title)
        row = self._db.execute("SELECT content_hash, state FROM documents WHERE id = ?", (doc.id,)).fetchone()
        if row is not None and row[0] == content_hash and row[1] == "ready":
            return IngestResult(doc.id, "unchanged", self._chunk_count(doc.id))
        chunks = self._chunker.chunk(doc.sections)
        if not chunks:
            return IngestResult(doc.id, "failed", error="no text to index")
        return doc, content_hash, chunks

    def _commit_batch(
        self, batch: list[tuple[DocumentInput, str, list[Chunk]]], embed: Embed, progress: Callable[[int], None] | None
    ) -> list[IngestResult]:
        vectors = embed([self._embedded_text(doc, c) for doc, _, chunks in batch for c in chunks])
        with commit_lock(self.path):
            return self._commit_embedded(batch, vectors, progress)

    def _embedded_text(self, doc: DocumentInput, chunk: Chunk) -> str:
        """The chunk as the embedding model sees it: behind its header when the collection uses them."""
        if not self.context_headers:
            return chunk.text
        header = self._chunker.fit_header(context_header(doc.title, chunk.heading), self._header_tokens)
        return self._chunker.behind_header(header, chunk)

    def _commit_embedded(
        self, batch: list[tuple[DocumentInput, str, list[Chunk]]], vectors: np.ndarray,
        progress: Callable[[int], None] | None,
    ) -> list[IngestResult]:
        now = time.time()
        # 1. registry: pending, new chunks not live.
        old_keys: list[int] = []
        new_keys: list[list[int]] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for doc, content_hash, chunks in batch:
                self._db.execute(
                    """INSERT INTO documents(id, title, source, metadata, content_hash, state, created, updated)
                       VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)
                       ON CONFLICT(id) DO UPDATE SET title=excluded.title, source=excluded.source,
                       metadata=excluded.metadata, content_hash=excluded.content_hash, state='pending',
                       updated=excluded.updated""",
                    (doc.id, doc.title, doc.source, json.dumps(doc.metadata), content_hash, now, now),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO document_texts(id, text, sections) VALUES (?, ?, ?)",
                    (doc.id, full_text(doc.sections), msgspec.json.encode(doc.sections).decode()),
                )
                old_keys += [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE document_id = ?", (doc.id,))]
                new_keys.append([self._insert_chunk(doc.id, i, c) for i, c in enumerate(chunks)])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        # 2. tantivy, one atomic commit for the batch.
        try:
            for (doc, _, chunks), keys in zip(batch, new_keys):
                self._lexical.delete_document(doc.id)
                self._lexical.add(
                    [LexicalChunk(k, doc.id, doc.title, c.heading or "", c.text) for k, c in zip(keys, chunks)]
                )
            self._lexical.commit()
        except BaseException:
            self._lexical.rollback()
            raise
        # 3. usearch: one save (temp file, fsync, rename).
        with self._vector_lock:
            self._vectors.remove(old_keys)
            self._vectors.add([k for keys in new_keys for k in keys], vectors)
            self._vectors.save()
        # 4. registry: live and ready; only now is the batch reported.
        self._db.execute("BEGIN IMMEDIATE")
        for (doc, _, _), keys in zip(batch, new_keys):
            self._db.execute("DELETE FROM chunks WHERE document_id = ? AND live = 1", (doc.id,))
            self._db.execute("UPDATE chunks SET live = 1 WHERE document_id = ?", (doc.id,))
            self._db.execute("UPDATE documents SET state = 'ready', chunk_count = ? WHERE id = ?", (len(keys), doc.id))
        if old_keys:
            self._add_tombstones(len(old_keys))
        self._db.execute("COMMIT")
        if progress:
            progress(len(batch))
        return [IngestResult(doc.id, "ingested", len(keys)) for (doc, _, _), keys in zip(batch, new_keys)]

    def _insert_chunk(self, doc_id: str, ordinal: int, c: Chunk) -> int:
        cur = self._db.execute(
            """INSERT INTO chunks(document_id, ordinal, text, start, end, page, heading, tokens, content_hash)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (doc_id, ordinal, c.text, c.start, c.end, c.page, c.heading, c.tokens, c.content_hash),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def _add_tombstones(self, n: int) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'tombstones'", (n,))

    def _chunk_count(self, doc_id: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks WHERE document_id = ? AND live = 1", (doc_id,)).fetchone()[0]

    def delete(self, doc_id: str) -> bool:
        with self._write:
            with commit_lock(self.path):
                if self._db.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is None:
                    return False
                self._db.execute("UPDATE documents SET state = 'deleting' WHERE id = ?", (doc_id,))
                keys = [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))]
                self._lexical.delete_document(doc_id)
                self._lexical.commit()
                with self._vector_lock:
                    self._vectors.remove(keys)
                    self._vectors.save()
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                self._add_tombstones(len(keys))
                self._db.execute("COMMIT")
            self._maybe_compact()
            return True

    def _maybe_compact(self) -> None:
        """usearch keeps removed vectors as tombstones: rebuild the index when they pile up."""
        tomb = int(self._db.execute("SELECT value FROM meta WHERE key = 'tombstones'").fetchone()[0])
        live = self._db.execute("SELECT COUNT(*) FROM chunks WHERE live = 1").fetchone()[0]
        if tomb < 64 or tomb < COMPACT_TOMBSTONE_SHARE * (live + tomb):
            return
        self.compact()

    def compact(self) -> None:
        with commit_lock(self.path):
            self._compact()

    def _compact(self) -> None:
        keys = [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE live = 1 ORDER BY id")]
        with self._vector_lock:
            vectors = self._vectors.get(keys) if keys else np.zeros((0, self._vectors.ndim), dtype=np.float32)
            self._vectors.reset()
            self._vectors.add(keys, vectors)
            self._vectors.save()
        self._db.execute("UPDATE meta SET value = '0' WHERE key = 'tombstones'")
        log.info("collection %s: vector index compacted to %d vectors", self.name, len(keys))

    # -- reads ---------------------------------------------------------------------------------

    def documents(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, title, source, metadata, state, chunk_count, created, updated FROM documents ORDER BY created"
        )
        return [
            {"id": r[0], "title": r[1], "source": r[2], "metadata": json.loads(r[3]), "state": r[4],
             "chunks": r[5], "created": r[6], "updated": r[7]}
            for r in rows.fetchall()
        ]

    def stats(self) -> dict[str, int]:
        docs = self._db.execute("SELECT COUNT(*) FROM documents WHERE state = 'ready'").fetchone()[0]
        chunks = self._db.execute("SELECT COUNT(*) FROM chunks WHERE live = 1").fetchone()[0]
        return {"documents": docs, "chunks": chunks}

    def candidates(
        self,
        query: str,
        *,
        mode: str,
        query_vector: np.ndarray | Callable[[], np.ndarray] | None,
        pool: int,
        flt: SearchFilter | None = None,
    ) -> Candidates:
        """Each half's own ranking (visible chunks only), before fusion."""
        lexical: list[tuple[int, float]] = []
        vector: list[tuple[int, float]] = []
        terms = 0
        if mode in ("bm25", "hybrid"):
            found = self._lexical.search(query, pool)
            lexical = [(h.chunk_id, h.score) for h in found.hits]
            terms = found.terms
        if mode in ("vector", "hybrid") and callable(query_vector):
            query_vector = query_vector()
        if mode in ("vector", "hybrid") and query_vector is not None:
            with self._vector_lock:
                vector = self._vectors.search(query_vector, pool)  # type: ignore[arg-type]
        visible = self._visible([k for k, _ in lexical] + [k for k, _ in vector], flt)
        return Candidates(
            [(k, sc) for k, sc in lexical if k in visible], [(k, sc) for k, sc in vector if k in visible],
            {k: visible[k] for k, _ in (*lexical, *vector) if k in visible}, terms,
        )

    def search(
        self,
        query: str,
        *,
        top_k: int,
        mode: str,
        query_vector: np.ndarray | Callable[[], np.ndarray] | None,
        flt: SearchFilter | None = None,
        snippets: bool = True,
    ) -> list[Hit]:
        """`query_vector` may be a function, called only when vectors are searched.

        Embedding the query on another thread while BM25 runs was measured slower on 2 cores
        (onnxruntime already uses every core), so it runs in line.
        """
        filtered = flt is not None and flt != SearchFilter()
        total = max(1, len(self._vectors))
        pool = total if filtered else min(total, max(50, top_k * 5))
        found = self.candidates(query, mode=mode, query_vector=query_vector, pool=pool, flt=flt)
        if mode == "bm25":
            ranked = found.lexical
        elif mode == "vector":
            ranked = found.vector
        else:
            ranked = fuse_hybrid(found, self.fusion)
        ranked = ranked[:top_k]
        details = self._details([k for k, _ in ranked])
        hits = []
        for key, score in ranked:
            hit = details[key]
            hit.score = round(float(score), 6)
            hits.append(hit)
        if snippets and hits:
            for hit, (fragment, ranges) in zip(hits, self._lexical.snippets(query, [h.text for h in hits])):
                hit.snippet, hit.highlights = fragment, ranges
        return hits

    def _visible(self, keys: Iterable[int], flt: SearchFilter | None) -> dict[int, str]:
        """The candidate chunk ids that are live, of ready documents, and pass the filter: their documents."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        # CROSS JOIN fixes the order: look the candidates up by id, then their documents by key.
        sql = (
            "SELECT c.id, c.document_id FROM chunks c CROSS JOIN documents d ON d.id = c.document_id "
            f"WHERE c.id IN ({','.join('?' * len(keys))}) AND c.live = 1 AND d.state = 'ready'"
        )
        args: list[Any] = list(keys)
        if flt is not None:
            if flt.document_id is not None:
                ids = [flt.document_id] if isinstance(flt.document_id, str) else flt.document_id
                sql += f" AND c.document_id IN ({','.join('?' * len(ids))})"
                args += ids
            if flt.source is not None:
                sql += " AND d.source = ?"
                args.append(flt.source)
            if flt.page_from is not None:
                sql += " AND c.page >= ?"
                args.append(flt.page_from)
            if flt.page_to is not None:
                sql += " AND c.page <= ?"
                args.append(flt.page_to)
            for key, value in flt.metadata.items():
                sql += " AND json_extract(d.metadata, ?) = ?"
                args += [f'$."{key}"', value]
        return {r[0]: r[1] for r in self._db.execute(sql, args).fetchall()}

    def chunks(self, keys: list[int]) -> dict[int, Hit]:
        """The chunks with these ids (scores 0), for tools that rank candidates themselves."""
        return self._details(keys)

    def chunk_texts(self, document_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT text FROM chunks WHERE document_id = ? AND live = 1 ORDER BY ordinal", (document_id,))]

    def _details(self, keys: list[int]) -> dict[int, Hit]:
        if not keys:
            return {}
        sql = (
            "SELECT c.id, c.document_id, d.title, d.source, c.page, c.heading, c.text, c.start, c.end, d.metadata "
            "FROM chunks c CROSS JOIN documents d ON d.id = c.document_id "
            f"WHERE c.id IN ({','.join('?' * len(keys))})"
        )
        return {
            r[0]: Hit(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], 0.0, json.loads(r[9]))
            for r in self._db.execute(sql, keys).fetchall()
        }

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
