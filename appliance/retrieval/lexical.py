"""BM25 over chunks with tantivy (the only module that imports it).

One writer per index directory (tantivy allows one). `with index.writer()` would commit even when
the block raises, so writes go through explicit commit/rollback here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import msgspec
import tantivy

log = logging.getLogger(__name__)
TITLE_BOOST = 2.0
HEADING_BOOST = 1.5


class LexicalHit(msgspec.Struct, frozen=True):
    chunk_id: int
    score: float


class LexicalResult(msgspec.Struct, frozen=True):
    hits: list[LexicalHit]
    terms: list[str]
    """The query's words as BM25 searched them (function words dropped; empty for query syntax)."""


class LexicalChunk(msgspec.Struct, frozen=True):
    chunk_id: int
    document_id: str
    title: str
    heading: str
    text: str


# Function words carry almost no BM25 weight but have the longest posting lists: dropping them from
# plain-text queries makes search several times cheaper on large collections. Queries using the query
# syntax (quotes, fields, operators, grouping) are left exactly as written.
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how i in is it its of on or that the this "
    "to was were what when where which who whom why will with".split()
)
_SYNTAX = re.compile(r'["():+\-^*~\[\]{}]|\b(AND|OR|NOT)\b')
# Punctuation that closes a sentence or a quotation, and that opens one; only a whole run next to a
# space or the text's edge counts, so "3.5" or "e.g." are not cut into "3." or "e.".
_CLOSING = re.compile(r"[.!?\u2026)\]}\"'\u201d\u2019\u00bb]+(?=\s|$)")
_OPENING = re.compile(r"(?:^|(?<=\s))[(\[{\"'\u201c\u2018\u00ab\u00bf\u00a1]+$")


def _drop_stopwords(text: str) -> str:
    if _SYNTAX.search(text):
        return text
    words = text.split()
    kept = [w for w in words if w.lower().strip(".,;!?'") not in _STOPWORDS]
    return " ".join(kept) if kept else text


def query_words(text: str) -> list[str]:
    """Lower-cased words of a plain-text query, as a rough stand-in for its BM25 terms."""
    return list(dict.fromkeys(w for w in (x.lower().strip(".,;:!?'\"()") for x in text.split()) if w))


def _with_punctuation(text: str, fragment: str) -> tuple[str, int]:
    """`fragment` of `text` with the punctuation around it, and how many characters it gained in front.

    tantivy's fragments run from the first token's start to the last token's end, and punctuation is
    no token: "Pumps need oil." came back as "Pumps need oil", "(see manual)" as "see manual".
    """
    at = text.find(fragment) if fragment else -1
    if at < 0:
        return fragment, 0
    end = at + len(fragment)
    closing = _CLOSING.match(text, end)
    opening = _OPENING.search(text, 0, at)
    start = opening.start() if opening else at
    return text[start : closing.end() if closing else end], at - start


def _schema() -> tantivy.Schema:
    b = tantivy.SchemaBuilder()
    b.add_unsigned_field("chunk_id", stored=True, indexed=True, fast=True)
    b.add_text_field("document_id", stored=False, tokenizer_name="raw")
    b.add_text_field("title", stored=False, tokenizer_name="en_stem")
    b.add_text_field("heading", stored=False, tokenizer_name="en_stem")
    b.add_text_field("text", stored=False, tokenizer_name="en_stem")  # the text lives in SQLite
    return b.build()


class LexicalIndex:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._schema = _schema()
        self._index = tantivy.Index(self._schema, path=str(path), reuse=True)
        self._writer: tantivy.IndexWriter | None = None

    def _w(self) -> tantivy.IndexWriter:
        if self._writer is None:
            self._writer = self._index.writer(heap_size=50_000_000, num_threads=1)
        return self._writer

    def add(self, chunks: list[LexicalChunk]) -> None:
        w = self._w()
        for c in chunks:
            doc = tantivy.Document()
            doc.add_unsigned("chunk_id", c.chunk_id)
            doc.add_text("document_id", c.document_id)
            doc.add_text("title", c.title)
            doc.add_text("heading", c.heading)
            doc.add_text("text", c.text)
            w.add_document(doc)

    def delete_document(self, document_id: str) -> None:
        self._w().delete_documents_by_term("document_id", document_id)

    def commit(self) -> None:
        self._w().commit()
        self._index.reload()

    def rollback(self) -> None:
        if self._writer is not None:
            self._writer.rollback()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.wait_merging_threads()
            self._writer = None

    def search(self, text: str, limit: int) -> LexicalResult:
        """BM25 with title and heading boosts. User syntax never raises: parsing is lenient."""
        plain = _drop_stopwords(text)
        query, _errors = self._index.parse_query_lenient(
            plain, ["text", "title", "heading"], field_boosts={"title": TITLE_BOOST, "heading": HEADING_BOOST}
        )
        searcher = self._index.searcher()
        result = searcher.search(query, limit)
        hits = []
        for score, address in result.hits:
            doc = searcher.doc(address)
            hits.append(LexicalHit(int(doc.get_first("chunk_id")), float(score)))
        return LexicalResult(hits, [] if _SYNTAX.search(text) else query_words(plain))

    def snippets(self, text: str, chunk_texts: list[str], max_chars: int = 240) -> list[tuple[str, list[tuple[int, int]]]]:
        """For each chunk text, a fragment with the query terms' ranges (as Python string indices)."""
        query, _ = self._index.parse_query_lenient(text, ["text"])
        generator = tantivy.SnippetGenerator.create(self._index.searcher(), query, self._schema, "text")
        generator.set_max_num_chars(max_chars)
        out = []
        for chunk_text in chunk_texts:
            doc = tantivy.Document()
            doc.add_text("text", chunk_text)
            snippet = generator.snippet_from_doc(doc)
            fragment = snippet.fragment()
            raw = fragment.encode("utf-8")
            # tantivy reports UTF-8 byte offsets; convert them before slicing Python strings.
            ranges = [
                (len(raw[: r.start].decode("utf-8", "ignore")), len(raw[: r.end].decode("utf-8", "ignore")))
                for r in snippet.highlighted()
            ]
            fragment, shift = _with_punctuation(chunk_text, fragment)
            out.append((fragment, [(a + shift, b + shift) for a, b in ranges]))
        return out

    def num_docs(self) -> int:
        return self._index.searcher().num_docs
