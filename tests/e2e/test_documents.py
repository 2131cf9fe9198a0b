"""Collections, ingestion of real files and hybrid search through the real server."""

from __future__ import annotations

import httpx
import pytest

from tests.docfixtures import HTML, MARKDOWN, make_docx, make_encrypted_pdf, make_pdf
from tests.e2e.conftest import Server


@pytest.fixture
def col(server: Server) -> str:
    name = "manuals"
    httpx.delete(f"{server.url}/v1/collections/{name}")
    r = httpx.post(f"{server.url}/v1/collections", json={"name": name})
    assert r.status_code == 201, r.text
    return name


def upload(server: Server, name: str, files: list[tuple[str, bytes]]) -> dict:
    r = httpx.post(
        f"{server.url}/v1/collections/{name}/documents",
        files=[("files", (fn, data)) for fn, data in files],
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def search(server: Server, name: str, query: str, **kw: object) -> list[dict]:
    r = httpx.post(f"{server.url}/v1/collections/{name}/search", json={"query": query, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_ingest_every_format_and_search_each_mode(server: Server, col: str) -> None:
    pdf = make_pdf(["The compressor oil must be changed every 2000 hours.", "Page two covers the cooling fan belt tension."])
    docx = make_docx("Turbine startup", ["Open the steam valve slowly to warm the casing.", "Check bearing temperatures."])
    out = upload(
        server,
        col,
        [("pump.html", HTML), ("boiler.md", MARKDOWN), ("compressor.pdf", pdf), ("turbine.docx", docx),
         ("notes.txt", b"The forklift battery is charged overnight in bay 4.")],
    )
    assert out["ingested"] == 5 and out["failed"] == 0
    for mode in ("bm25", "vector", "hybrid"):
        hits = search(server, col, "how often should the mechanical seal be replaced", mode=mode, top_k=3)
        assert hits[0]["document_id"] == "pump.html", (mode, hits)
    pdf_hit = search(server, col, "cooling fan belt tension", top_k=1)[0]
    assert (pdf_hit["document_id"], pdf_hit["page"]) == ("compressor.pdf", 2)
    hit = search(server, col, "feedwater hardness", top_k=1)[0]
    assert hit["document_id"] == "boiler.md" and hit["heading"] == "Water treatment"
    assert hit["snippet"] and hit["highlights"]
    start, end = hit["highlights"][0]
    assert hit["snippet"][start:end].lower().startswith("feedwater")
    docs = httpx.get(f"{server.url}/v1/collections/{col}/documents").json()["data"]
    assert {d["id"] for d in docs} == {"pump.html", "boiler.md", "compressor.pdf", "turbine.docx", "notes.txt"}
    assert all(d["state"] == "ready" for d in docs)


def test_bad_files_fail_alone(server: Server, col: str) -> None:
    out = upload(
        server,
        col,
        [("good.txt", b"Lubricate the conveyor chain monthly."), ("empty.txt", b""), ("image.png", b"\x89PNG...."),
         ("broken.pdf", b"%PDF-1.4 garbage"), ("locked.pdf", make_encrypted_pdf("secret plans")),
         ("bad.docx", b"PK not really a zip")],
    )
    status = {r["source"]: r["status"] for r in out["results"]}
    assert status == {"good.txt": "ingested", "empty.txt": "failed", "image.png": "failed", "broken.pdf": "failed",
                      "locked.pdf": "failed", "bad.docx": "failed"}
    errors = {r["source"]: r["error"] for r in out["results"]}
    assert "encrypted" in errors["locked.pdf"] and "unsupported" in errors["image.png"] and "empty" in errors["empty.txt"]
    assert search(server, col, "conveyor chain", top_k=1)[0]["document_id"] == "good.txt"


def test_reingest_replace_skip_and_delete(server: Server, col: str) -> None:
    base = f"{server.url}/v1/collections/{col}/documents"
    r = httpx.post(base, json={"id": "policy", "title": "Leave policy", "text": "Staff get 25 days of annual leave."}).json()
    assert r["ingested"] == 1
    r = httpx.post(base, json={"id": "policy", "title": "Leave policy", "text": "Staff get 25 days of annual leave."}).json()
    assert r["unchanged"] == 1
    httpx.post(base, json={"id": "policy", "title": "Leave policy", "text": "Staff get 30 days of annual leave."})
    hits = search(server, col, "annual leave days", mode="bm25")
    assert [h["text"] for h in hits] == ["Staff get 30 days of annual leave."]
    assert httpx.delete(f"{base}/policy").status_code == 200
    assert search(server, col, "annual leave days") == []
    assert httpx.delete(f"{base}/policy").status_code == 404


def test_metadata_and_page_filters(server: Server, col: str) -> None:
    base = f"{server.url}/v1/collections/{col}/documents"
    for i, dept in enumerate(["finance", "legal", "finance"]):
        httpx.post(base, json={"id": f"memo{i}", "text": f"Memo {i}: the audit deadline is in March.", "metadata": {"dept": dept}})
    hits = search(server, col, "audit deadline", filter={"metadata": {"dept": "legal"}})
    assert [h["document_id"] for h in hits] == ["memo1"]
    hits = search(server, col, "audit deadline", filter={"document_id": ["memo0", "memo2"]}, top_k=10)
    assert {h["document_id"] for h in hits} == {"memo0", "memo2"}
    upload(server, col, [("manual.pdf", make_pdf(["alpha pressure gauge", "beta pressure gauge", "gamma pressure gauge"]))])
    hits = search(server, col, "pressure gauge", filter={"document_id": "manual.pdf", "page_from": 2, "page_to": 3}, top_k=10)
    assert sorted(h["page"] for h in hits) == [2, 3]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/collections", {"name": "../etc"}, 400),
        ("post", "/v1/collections", {"name": ""}, 400),
        ("post", "/v1/collections", {"nom": "x"}, 400),
        ("post", "/v1/collections/missing/search", {"query": "x"}, 404),
        ("get", "/v1/collections/missing/documents", None, 404),
        ("delete", "/v1/collections/missing", None, 404),
        ("post", "/v1/collections/manuals/search", {"query": ""}, 400),
        ("post", "/v1/collections/manuals/search", {"query": "x", "mode": "magic"}, 400),
        ("post", "/v1/collections/manuals/search", {"query": "x", "top_k": 0}, 400),
        ("post", "/v1/collections/manuals/search", {"query": "x", "filter": {"page_from": 3, "page_to": 1}}, 400),
        ("post", "/v1/collections/manuals/documents", {"text": "   "}, 400),
        ("post", "/v1/collections/manuals/documents", {"text": "x", "id": "a/b"}, 400),
    ],
)
def test_bad_input_is_rejected_clearly(server: Server, col: str, method: str, path: str, body: dict | None, status: int) -> None:
    r = getattr(httpx, method)(f"{server.url}{path}", **({"json": body} if body is not None else {}))
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_lenient_query_syntax_and_duplicate_collection(server: Server, col: str) -> None:
    httpx.post(f"{server.url}/v1/collections/{col}/documents", json={"text": "valve AND pump maintenance"})
    for q in ("valve AND (", 'title:"unclosed', "*** ??? ((("):
        assert httpx.post(f"{server.url}/v1/collections/{col}/search", json={"query": q}).status_code == 200
    r = httpx.post(f"{server.url}/v1/collections", json={"name": col})
    assert r.status_code == 409 and r.json()["error"]["code"] == "collection_exists"
    names = [c["name"] for c in httpx.get(f"{server.url}/v1/collections").json()["data"]]
    assert col in names


def test_ask_cites_sources_streams_and_admits_ignorance(server: Server, col: str) -> None:
    base = f"{server.url}/v1/collections/{col}"
    httpx.post(f"{base}/documents", json={"id": "lib", "title": "Library", "text": "The city library opens at 9 am on weekdays."})
    httpx.post(f"{base}/documents", json={"id": "pool", "title": "Pool", "text": "The swimming pool closes at 8 pm every day."})
    r = httpx.post(f"{base}/ask", json={"question": "When does the city library open on weekdays?", "max_tokens": 40}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "gemma3-270m"
    assert body["sources"][0]["document_id"] == "lib"
    assert "9" in body["answer"]
    assert body["citations"] and body["citations"][0]["document_id"] == "lib"
    assert body["citations"][0]["supported"] and body["grounded"]
    assert body["usage"]["completion_tokens"] > 0
    # Streaming: sources first, then text deltas, then the checked answer; the same text either way.
    events = []
    with httpx.stream("POST", f"{base}/ask", json={"question": "When does the city library open on weekdays?",
                                                    "max_tokens": 40, "stream": True}, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(__import__("json").loads(line[6:]))
    assert events[0]["type"] == "sources" and events[-1]["type"] == "done"
    streamed = "".join(e["text"] for e in events if e["type"] == "delta")
    assert streamed.strip() == events[-1]["answer"] == body["answer"]
    # Nothing relevant: no invented answer.
    r = httpx.post(f"{base}/ask", json={"question": "What is the airspeed velocity of an unladen swallow?"}, timeout=120)
    assert r.json()["sources"] == [] and r.json()["grounded"] is False
    assert "enough information" in r.json()["answer"]
    assert httpx.post(f"{server.url}/v1/collections/missing/ask", json={"question": "x"}).status_code == 404
    assert httpx.post(f"{base}/ask", json={"question": "  "}).status_code == 400


def test_chat_completions_with_a_collection_is_grounded(server: Server, col: str, client) -> None:  # type: ignore[no-untyped-def]
    httpx.post(f"{server.url}/v1/collections/{col}/documents", json={"id": "lib", "text": "The city library opens at 9 am on weekdays."})
    messages = [{"role": "user", "content": "When does the city library open on weekdays?"}]
    resp = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=40, extra_body={"collection": col})
    extra = resp.model_extra or {}
    assert "9" in resp.choices[0].message.content
    assert extra["citations"][0]["document_id"] == "lib" and extra["grounded"] is True
    stream = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=40, stream=True, extra_body={"collection": col})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == resp.choices[0].message.content
    assert (chunks[-1].model_extra or {})["citations"][0]["document_id"] == "lib"


def test_concurrent_first_opens_after_a_restart(data_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two collections opened at once by a freshly started server: no request hangs, the server keeps serving."""
    import concurrent.futures

    from tests.e2e.conftest import fresh_data_dir, start_server, stop_server

    data = fresh_data_dir(data_dir, tmp_path / "data")
    srv = start_server(data, tmp_path / "first.log")
    try:
        for name in ("alpha", "beta"):
            assert httpx.post(f"{srv.url}/v1/collections", json={"name": name}).status_code == 201
            upload(srv, name, [(f"{name}.txt", f"The {name} pump runs at 40 bar.".encode())])
    finally:
        stop_server(srv)
    # without the resume pass, no collection is open when the requests arrive
    config = tmp_path / "no-resume.toml"
    config.write_text("[retrieval]\nresume_on_start = false\n")
    srv = start_server(data, tmp_path / "second.log", "--config", str(config))
    try:
        def docs(name: str) -> int:
            return httpx.get(f"{srv.url}/v1/collections/{name}/documents", timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(docs, ["alpha", "beta"] * 4))
        assert codes == [200] * 8
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        missing = httpx.get(f"{srv.url}/v1/collections/gamma/documents", timeout=10)
        assert missing.status_code == 404 and "--create" in missing.json()["error"]["message"]
    finally:
        stop_server(srv)
