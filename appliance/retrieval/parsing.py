"""Turn uploaded files into text sections (with page numbers and headings) using well-kept parsers."""

from __future__ import annotations

import io
import re
from pathlib import PurePath

import msgspec

from appliance.errors import InvalidRequest


class DocumentError(InvalidRequest):
    """One file could not be ingested; the others in the batch still are."""

    code = "document_rejected"


class Section(msgspec.Struct, frozen=True):
    text: str
    page: int | None = None
    heading: str | None = None
    heading_chars: int = 0
    """Length of the headings that open `text`: the chunker keeps them with the body that follows."""
    outer_headings: tuple[str, ...] = ()
    """Headings above `heading` that had no body of their own and were carried into this section,
    outermost first ("Manual" for "# Manual" then "## Pumps"); a document's title is the first."""


SUPPORTED = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def parse(name: str, data: bytes) -> list[Section]:
    suffix = PurePath(name).suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(f"{name}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUPPORTED)}")
    if not data:
        raise DocumentError(f"{name}: the file is empty")
    if suffix == ".pdf":
        sections = _pdf(name, data)
    elif suffix == ".docx":
        sections = _docx(name, data)
    elif suffix in (".html", ".htm"):
        sections = _html(name, data)
    else:
        sections = _markdown(_decode(name, data))
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise DocumentError(f"{name}: no text could be extracted")
    return sections


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DocumentError(f"{name}: not valid UTF-8 text") from None


def _markdown(text: str) -> list[Section]:
    """Split at headings; plain text is one section. Paragraphs are kept for the chunker."""
    headed = _HeadedSections("\n")
    for line in text.replace("\r\n", "\n").split("\n"):
        match = _MD_HEADING.match(line)
        if match:
            headed.heading(line, match.group(2))
        else:
            headed.body(line)
    return headed.done()


class _HeadedSections:
    """Sections split at headings, each opening with its heading.

    A heading with no body before the next heading is carried into the next section (nested headings
    such as "# Manual" then "## Pumps"), so no section is headings alone, unless the whole document is.
    """

    def __init__(self, joiner: str) -> None:
        self._joiner = joiner
        self._sections: list[Section] = []
        self._titles: list[str] = []
        self._headings: list[str] = []
        self._body: list[str] = []

    def heading(self, text: str, title: str) -> None:
        if "".join(self._body).strip():
            self._flush()
        self._body = []  # blank lines between two headings
        self._headings.append(text)
        self._titles.append(title)

    def body(self, text: str) -> None:
        self._body.append(text)

    def done(self) -> list[Section]:
        # Headings at the very end head nothing and are left out, unless they are the whole document:
        # then they are kept, so it can still be found.
        if "".join(self._body).strip() or (self._headings and not self._sections):
            self._flush()
        return self._sections

    def _flush(self) -> None:
        head = self._joiner.join(self._headings)
        text = self._joiner.join([*self._headings, *self._body]).strip("\n")
        heading = self._titles[-1] if self._titles else None  # None: text before the first heading
        outer = tuple(self._titles[:-1])
        self._sections.append(Section(text, heading=heading, heading_chars=len(head), outer_headings=outer))
        self._headings, self._titles, self._body = [], [], []


def _html(name: str, data: bytes) -> list[Section]:
    from selectolax.lexbor import LexborHTMLParser

    try:
        tree = LexborHTMLParser(data)
    except Exception as exc:
        raise DocumentError(f"{name}: unreadable HTML ({exc})") from None
    for node in tree.css("script, style, noscript, template, nav, footer"):
        node.decompose()
    root = tree.body or tree.root
    if root is None:
        return []
    headed = _HeadedSections("\n\n")
    for node in root.css("h1, h2, h3, h4, h5, h6, p, li, pre, td, th, blockquote, dt, dd"):
        text = node.text(separator=" ", strip=True)
        if not text:
            continue
        if node.tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            headed.heading(text, text)
        else:
            headed.body(text)
    sections = headed.done()
    if not sections:
        text = root.text(separator=" ", strip=True)
        sections = [Section(text)] if text else []
    return sections


def _pdf(name: str, data: bytes) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name}: the PDF is encrypted")
        return [Section(page.extract_text() or "", page=i + 1) for i, page in enumerate(reader.pages)]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"{name}: corrupt or unreadable PDF ({exc})") from None


def _docx(name: str, data: bytes) -> list[Section]:
    import zipfile

    from docx import Document

    try:
        doc = Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DocumentError(f"{name}: corrupt or unreadable DOCX ({exc})") from None
    headed = _HeadedSections("\n\n")
    for para in doc.paragraphs:
        text = para.text.strip()
        if not text:
            continue
        style = (para.style.name if para.style is not None else "") or ""
        if style.lower().startswith(("heading", "title")):
            headed.heading(text, text)
        else:
            headed.body(text)
    for table in doc.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells if c.text.strip()]
            if cells:
                headed.body(" | ".join(cells))
    return headed.done()
