"""The real server's log at the default level: JSON lines only (llama.cpp's model loading included),
the address it listens on readable, what a user sent still masked."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server

pytestmark = pytest.mark.e2e
MODEL = "gemma3-270m"
USER_IP, USER_EMAIL = "203.0.113.9", "carol.white@example.com"


@pytest.fixture(scope="module")
def server_and_startup(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[str]]]:
    """The server, and its output once every model has loaded, before any API request."""
    base = tmp_path_factory.mktemp("server-log")
    srv = start_server(fresh_data_dir(data_dir, base / "data"), base / "server.log")
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{srv.url}/health", timeout=5).json()["status"] != "ok":
            assert time.monotonic() < deadline, srv.log.read_text()
            time.sleep(0.2)
        yield srv, srv.log.read_text(errors="replace").splitlines()
    finally:
        stop_server(srv)


def _records(lines: list[str]) -> list[dict[str, object]]:
    raw = [line for line in lines if not line.startswith("{")]
    assert not raw, f"{len(raw)} lines that are not JSON, the first: {raw[:5]}"
    return [json.loads(line) for line in lines if line.strip()]


def test_every_line_before_the_first_request_is_json(server_and_startup: tuple[Server, list[str]]) -> None:
    _, startup = server_and_startup
    records = _records(startup)
    assert any(str(r["message"]).startswith(f"model {MODEL}: ready in") for r in records)
    # llama.cpp's model loading (hundreds of lines) is debug: at info only its warnings and errors show.
    from_llama = [r for r in records if r["logger"] == "llama_cpp"]
    assert all(r["level"] in ("warning", "error") for r in from_llama), from_llama
    assert not any("llama_model_loader" in str(r["message"]) for r in records)


def test_the_log_says_where_the_server_listens(server_and_startup: tuple[Server, list[str]]) -> None:
    srv, startup = server_and_startup
    port = urlsplit(srv.url).port
    messages = [str(r["message"]) for r in _records(startup)]
    assert any("serving" in m and f" on http://127.0.0.1:{port} (data in" in m for m in messages), messages
    assert any(m.startswith(f"Uvicorn running on http://127.0.0.1:{port}") for m in messages), messages
    assert not any("[IP_ADDRESS" in m for m in messages), messages


def test_what_a_user_sent_stays_out_of_the_log(server_and_startup: tuple[Server, list[str]]) -> None:
    srv, _ = server_and_startup
    reply = srv.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"I am {USER_EMAIL}, writing from {USER_IP}. Say hi."}],
        max_tokens=8,
    )
    assert reply.choices[0].message is not None
    bad = httpx.post(
        f"{srv.url}/v1/chat/completions",
        json={"model": f"{USER_EMAIL} at {USER_IP}", "messages": [{"role": "user", "content": USER_IP}]},
        timeout=30,
    )
    assert bad.status_code == 404
    time.sleep(0.5)
    lines = srv.log.read_text(errors="replace").splitlines()
    records = _records(lines)
    assert any(r["logger"] == "appliance.access" for r in records)
    text = "\n".join(lines)
    assert USER_IP not in text and USER_EMAIL not in text
