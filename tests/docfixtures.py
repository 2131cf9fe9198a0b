"""Small real documents made with the libraries themselves (PDF with fpdf2, DOCX with python-docx)."""

from __future__ import annotations

import io


def make_pdf(pages: list[str]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_encrypted_pdf(text: str) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_encryption(owner_password="owner", user_password="secret")
    pdf.set_font("Helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_docx(heading: str, paragraphs: list[str]) -> bytes:
    from docx import Document

    doc = Document()
    doc.add_heading(heading, level=1)
    for p in paragraphs:
        doc.add_paragraph(p)
    buf = io.BytesIO()
    doc.save(buf)
    return buf.getvalue()


HTML = b"""<html><head><title>Pump manual</title><style>p{color:red}</style><script>var x=1;</script></head>
<body><nav>Home | About</nav><h1>Centrifugal pump maintenance</h1>
<p>Inspect the impeller every 500 operating hours for cavitation damage.</p>
<h2>Seals</h2><p>Replace the mechanical seal when leakage exceeds ten drops per minute.</p></body></html>"""

MARKDOWN = b"""# Boiler safety

Never operate the boiler with the pressure relief valve blocked.

## Water treatment

Test the feedwater hardness weekly and keep it below 2 ppm.
"""
