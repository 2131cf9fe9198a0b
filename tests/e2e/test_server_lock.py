"""A running server owns its data directory's collections: CLI writes are refused with the way round
(`ingest --url`), which sends the files to the server so its vector index sees them too."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import fresh_data_dir, start_server

HARBOUR = "The harbour master keeps the tide tables for the northern quay in a blue ledger."


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_cli_writes_beside_a_running_server(data_dir: Path, tmp_path: Path) -> None:
    data = fresh_data_dir(data_dir, tmp_path / "data")
    doc = tmp_path / "harbour.txt"
    doc.write_text(HARBOUR)
    server = start_server(data, tmp_path / "server.log")
    try:
        refused = cli("ingest", "notes", doc, "--create", "--data-dir", data)
        assert refused.returncode == 1, refused.stderr
        assert "an appliance server is running" in refused.stderr
        assert f"--url {server.url}" in refused.stderr  # the way round, with the server's own address
        assert not (data / "collections" / "default" / "notes").exists()
        made = cli("collections", "create", "other", "--data-dir", data)
        assert made.returncode == 1 and "an appliance server is running" in made.stderr

        second = cli("serve", "--port", "1", "--data-dir", data, timeout=60)
        assert second.returncode == 1
        assert f"in use by another appliance server (pid {server.proc.pid}, {server.url})" in second.stderr

        sent = cli("ingest", "notes", doc, "--create", "--url", server.url)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.split()[:2] == ["ingested", "harbour.txt"]
        again = cli("ingest", "notes", doc, "--url", server.url)
        assert again.returncode == 0 and again.stdout.split()[:2] == ["unchanged", "harbour.txt"]
        # the server's own vector index has the document (a CLI write beside it would not)
        resp = httpx.post(f"{server.url}/v1/collections/notes/search",
                          json={"query": "who keeps the tide tables", "mode": "vector", "top_k": 1}, timeout=60)
        assert resp.status_code == 200 and resp.json()["data"][0]["source"] == "harbour.txt"

        missing = cli("ingest", "nowhere", doc, "--url", server.url)
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "nowhere" in missing.stderr
    finally:
        # kill -9: the kernel drops the lock with the process, nothing stale is left behind
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
    local = cli("ingest", "notes", doc, "--data-dir", data)
    assert local.returncode == 0, local.stderr
    assert local.stdout.split()[:2] == ["unchanged", "harbour.txt"]


def test_ingest_url_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("text")
    out = cli("ingest", "notes", doc, "--url", "http://127.0.0.1:9", timeout=60)
    assert out.returncode == 1 and "cannot reach the server at http://127.0.0.1:9" in out.stderr


@pytest.fixture(autouse=True)
def _no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)
