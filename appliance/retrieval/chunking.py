"""Structure-aware, token-aware chunking with the embedding model's own tokenizer.

Sections (pages, headings) are never merged; inside a section, paragraphs are packed into chunks of
at most `max_tokens` tokens as the embedding model counts them (special tokens included), with about
`overlap_tokens` of the previous chunk repeated at the start of the next. A paragraph too long for one
chunk is split at sentences, then words, then characters, so no chunk is ever truncated by the model.
A section's opening headings always share a chunk with body text: a chunk of headings alone would be
retrieved and cited as a source while saying nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import msgspec

from appliance.retrieval.parsing import Section

CountTokens = Callable[[list[str]], list[int]]
"""Tokens of each text *without* special tokens."""

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORDS = re.compile(r"(?<=\S)\s+(?=\S)")
SECTION_SEPARATOR = "\n\n"


class Chunk(msgspec.Struct, frozen=True):
    text: str
    start: int
    """Character offset of the chunk in the document's full text."""
    end: int
    page: int | None
    heading: str | None
    tokens: int
    content_hash: str


def full_text(sections: list[Section]) -> str:
    return SECTION_SEPARATOR.join(s.text for s in sections)


class Chunker:
    def __init__(self, count_tokens: CountTokens, *, max_tokens: int = 256, special_tokens: int = 2, overlap_tokens: int = 32) -> None:
        self._count = count_tokens
        self._special = special_tokens
        self.max_tokens = max_tokens
        self._budget = max_tokens - special_tokens
        self._overlap = min(overlap_tokens, self._budget // 4)

    def fit_header(self, header: str, tokens: int) -> str:
        """`header` cut at a word boundary to at most `tokens` tokens."""
        words = header.split()
        while words and self._count([" ".join(words)])[0] > tokens:
            words = words[: min(len(words) - 1, len(words) * 3 // 4)]
        return " ".join(words)

    def behind_header(self, header: str, chunk: Chunk) -> str:
        """`header`, a line break and the chunk, within the window: the chunk's last words give way when
        both do not fit (they open the next chunk anyway, which overlaps this one)."""
        if not header:
            return chunk.text
        text = f"{header}\n{chunk.text}"
        room = self.max_tokens - self._special
        if chunk.tokens + self._count([header])[0] <= self.max_tokens - 1 and self._count([text])[0] <= room:
            return text
        words = chunk.text.split(" ")
        lo, hi = 0, len(words)  # the most words that fit: binary search on the tokenizer's count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._count([f"{header}\n{' '.join(words[:mid])}"])[0] <= room:
                lo = mid
            else:
                hi = mid - 1
        return f"{header}\n{' '.join(words[:lo])}"

    def chunk(self, sections: list[Section]) -> list[Chunk]:
        chunks: list[Chunk] = []
        offset = 0
        for section in sections:
            chunks.extend(self._section(section, offset))
            offset += len(section.text) + len(SECTION_SEPARATOR)
        return chunks

    def _section(self, section: Section, base: int) -> list[Chunk]:
        units = self._units(section.text)  # (start, end, tokens) spans of the section text
        chunks: list[Chunk] = []
        i = 0
        while i < len(units):
            j, used = i, 0
            while j < len(units) and used + units[j][2] <= self._budget:
                used += units[j][2]
                j += 1
            j = max(j, i + 1)
            start, end = units[i][0], units[j - 1][1]
            text = section.text[start:end].strip()
            # A single unit was counted already; joined units are counted again (seams can add tokens).
            tokens = (units[i][2] if j - i == 1 else self._count([text])[0]) + self._special
            while tokens > self.max_tokens and j - i > 1:
                # Joining units can add a token or two at the seams: drop units until it fits.
                j -= 1
                end = units[j - 1][1]
                text = section.text[start:end].strip()
                tokens = self._count([text])[0] + self._special
            if end <= section.heading_chars < units[-1][1]:
                # Only headings, and body follows: split the next unit finer so some of it fits with
                # them; if it cannot be, leave them out (each chunk still carries its `heading`).
                finer = self._finer(section.text, units[j])
                if len(finer) > 1:
                    units[j : j + 1] = finer
                else:
                    i = j
                continue
            if text:
                lead = len(section.text[start:end]) - len(section.text[start:end].lstrip())
                s = base + start + lead
                chunks.append(Chunk(text, s, s + len(text), section.page, section.heading, tokens, content_digest(text)))
            if j >= len(units):
                break
            # Overlap: restart at the latest units that fit in the overlap budget (always progressing).
            back, carried = j, 0
            while back - 1 > i and carried + units[back - 1][2] <= self._overlap:
                back -= 1
                carried += units[back][2]
            i = back
        return chunks

    def _units(self, text: str) -> list[tuple[int, int, int]]:
        """Spans that each fit the budget: paragraphs, else sentences, else words, else characters."""
        spans = _split(text, 0, len(text), _PARAGRAPHS)
        return self._fit(text, spans, (_SENTENCES, _WORDS))

    def _finer(self, text: str, unit: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """A unit as its sentences, else its words; itself when it has only one word."""
        a, b, _ = unit
        for pattern, rest in ((_SENTENCES, (_WORDS,)), (_WORDS, ())):
            spans = _split(text, a, b, pattern)
            if len(spans) > 1:
                return self._fit(text, spans, rest)
        return [unit]

    def _fit(self, text: str, spans: list[tuple[int, int]], finer: tuple[re.Pattern[str], ...]) -> list[tuple[int, int, int]]:
        counts = self._count([text[a:b] for a, b in spans]) if spans else []
        out: list[tuple[int, int, int]] = []
        for (a, b), n in zip(spans, counts):
            if n <= self._budget:
                out.append((a, b, n))
            elif finer:
                out.extend(self._fit(text, _split(text, a, b, finer[0]), finer[1:]))
            else:
                out.extend(self._hard_split(text, a, b))
        return out

    def _hard_split(self, text: str, a: int, b: int) -> list[tuple[int, int, int]]:
        out = []
        step = max(1, self._budget)  # one token is at least one character
        while a < b:
            end = min(b, a + step * 4)
            while True:
                n = self._count([text[a:end]])[0]
                if n <= self._budget or end - a <= 1:
                    break
                end = a + max(1, (end - a) * 3 // 4)
            out.append((a, end, n))
            a = end
        return out


def _split(text: str, a: int, b: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    spans, start = [], a
    for match in pattern.finditer(text, a, b):
        if match.start() > start:
            spans.append((start, match.start()))
        start = match.end()
    if start < b:
        spans.append((start, b))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def content_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
