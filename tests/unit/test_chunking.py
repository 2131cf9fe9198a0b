"""Parsing into sections and chunking them: a heading never becomes a chunk, and so a source, on its own."""

from __future__ import annotations

import re

import pytest

from appliance.retrieval.chunking import Chunk, Chunker
from appliance.retrieval.parsing import Section, parse

MD_HEADING = re.compile(r"^#{1,6}\s")


def words(max_tokens: int = 40, overlap: int = 4) -> Chunker:
    """Counts a word as a token, as test_collection does."""
    return Chunker(lambda texts: [len(t.split()) for t in texts], max_tokens=max_tokens, overlap_tokens=overlap)


def only_headings(chunk: Chunk) -> bool:
    return all(MD_HEADING.match(line) for line in chunk.text.splitlines() if line.strip())


MANUAL = """# Pump manual

## Maintenance

### Oil

Pumps need oil every week.

### Seals
## Valves

Valves need grease every month.

# Appendix
"""


def test_a_heading_without_body_is_carried_into_the_next_section() -> None:
    sections = parse("manual.md", MANUAL.encode())
    assert sections == [
        Section("# Pump manual\n## Maintenance\n### Oil\n\nPumps need oil every week.", heading="Oil",
                heading_chars=len("# Pump manual\n## Maintenance\n### Oil"),
                outer_headings=("Pump manual", "Maintenance")),
        Section("### Seals\n## Valves\n\nValves need grease every month.", heading="Valves",
                heading_chars=len("### Seals\n## Valves"), outer_headings=("Seals",)),
    ], "the trailing '# Appendix' heads nothing and is left out"
    chunks = words().chunk(sections)
    assert [c.heading for c in chunks] == ["Oil", "Valves"]
    assert not any(only_headings(c) for c in chunks)


def test_headings_stay_with_the_start_of_a_paragraph_too_long_to_join_them() -> None:
    body = "Pumps need oil every week and the filter is changed monthly. Check the seals at the same time."
    sections = parse("m.md", f"# Manual\n\n## Pumps\n\n{body}\n".encode())
    chunks = words(max_tokens=14, overlap=2).chunk(sections)
    assert len(chunks) > 1 and not any(only_headings(c) for c in chunks)
    assert chunks[0].text.startswith("# Manual\n## Pumps\n\nPumps need oil")
    assert all(c.tokens <= 14 for c in chunks)
    assert "seals at the same time." in chunks[-1].text


def test_a_document_of_only_headings_keeps_one_chunk() -> None:
    chunks = words().chunk(parse("toc.md", b"# Contents\n\n## Part one\n## Part two\n"))
    assert [(c.text, c.heading) for c in chunks] == [("# Contents\n## Part one\n## Part two", "Part two")]


def test_text_before_the_first_heading_has_no_heading() -> None:
    sections = parse("notes.txt", b"Read this first.\n\n# Pumps\n\nPumps need oil.\n")
    assert [(s.heading, s.heading_chars, s.outer_headings) for s in sections] == [(None, 0, ()), ("Pumps", 7, ())]


def test_html_headings_are_carried_the_same_way() -> None:
    html = b"<h1>Manual</h1><h2>Pumps</h2><p>Pumps need oil.</p><h2>Valves</h2><p>Valves need grease.</p><h2>End</h2>"
    sections = parse("m.html", html)
    assert [(s.text, s.heading) for s in sections] == [
        ("Manual\n\nPumps\n\nPumps need oil.", "Pumps"),
        ("Valves\n\nValves need grease.", "Valves"),
    ]
    assert sections[0].outer_headings == ("Manual",)
    chunks = words(max_tokens=5, overlap=0).chunk(sections)
    assert all(c.text not in ("Manual", "Pumps", "Manual\n\nPumps", "Valves") for c in chunks), chunks


@pytest.mark.parametrize("max_tokens", [4, 6, 9, 40])
def test_no_chunk_is_only_headings_at_any_size(max_tokens: int) -> None:
    text = MANUAL + "\n".join(f"## Step {n}\n\nTurn the valve {n} times and wait for the gauge." for n in range(5))
    chunks = words(max_tokens=max_tokens, overlap=1).chunk(parse("steps.md", text.encode()))
    assert chunks and not any(only_headings(c) for c in chunks)
    assert all(c.tokens <= max_tokens for c in chunks)


def test_sections_stored_before_heading_chars_chunk_as_before() -> None:
    """Documents ingested earlier decode with heading_chars 0: their chunks do not change."""
    section = Section("# Pumps\n\nPumps need oil.", heading="Pumps")
    assert [c.text for c in words().chunk([section])] == ["# Pumps\n\nPumps need oil."]


def test_docx_headings_are_carried_the_same_way() -> None:
    import io

    from docx import Document

    doc = Document()
    doc.add_heading("Manual", 0)
    doc.add_heading("Pumps", 1)
    doc.add_paragraph("Pumps need oil.")
    doc.add_heading("Valves", 1)
    buf = io.BytesIO()
    doc.save(buf)
    sections = parse("m.docx", buf.getvalue())
    assert [(s.text, s.heading, s.outer_headings) for s in sections] == [
        ("Manual\n\nPumps\n\nPumps need oil.", "Pumps", ("Manual",))
    ]
