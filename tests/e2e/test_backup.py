"""Backup of a serving, ingesting, metering appliance; restore elsewhere; everything acknowledged is there."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import fresh_data_dir, start_server, stop_server

pytestmark = pytest.mark.e2e


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_backup_while_serving_then_restore(data_dir: Path, tmp_path: Path) -> None:
    server = start_server(fresh_data_dir(data_dir, tmp_path / "data"), tmp_path / "server.log")
    url = server.url
    acked_docs: list[tuple[str, float]] = []
    metered: list[float] = []
    stop = threading.Event()
    errors: list[str] = []

    def ingest() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/v1/collections", json={"name": "live"}).raise_for_status()
            i = 0
            while not stop.is_set() and i < 60:
                text = f"# Part {i}\n\nPart number {i} carries the marker word quartz{i}x and a gasket.\n"
                r = http.post("/v1/collections/live/documents", files={"files": (f"part{i}.md", text.encode())})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                acked_docs.append((r.json()["results"][0]["document_id"], time.time()))
                i += 1

    def generate() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                r = http.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "Oil", "max_tokens": 4})
                if r.status_code == 200:
                    metered.append(time.time())

    threads = [threading.Thread(target=ingest), threading.Thread(target=generate)]
    for t in threads:
        t.start()
    try:
        while len(acked_docs) < 5 and not errors:
            time.sleep(0.1)
        backup_started = time.time()
        made = cli("backup", tmp_path / "snap.tar", "--data-dir", tmp_path / "data")
        assert made.returncode == 0, made.stderr
        # The server kept ingesting while the backup ran.
        while len(acked_docs) < 10 and not errors:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert any(ts > backup_started for _, ts in acked_docs), "ingestion went on while the backup ran"
    before = [doc for doc, ts in acked_docs if ts < backup_started]
    requests_before = sum(1 for ts in metered if ts < backup_started)
    stop_server(server)

    restored = tmp_path / "restored"
    out = cli("restore", tmp_path / "snap.tar", "--data-dir", restored)
    assert out.returncode == 0, out.stderr
    verify = cli("--data-dir", restored, "usage", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = int(verify.stdout.split("ok: ")[1].split()[0])
    assert records >= requests_before + len(before), verify.stdout

    again = start_server(restored, tmp_path / "restored.log")
    try:
        with httpx.Client(base_url=again.url, timeout=60) as http:
            listed = {d["id"] for d in http.get("/v1/collections/live/documents").json()["data"]}
            assert set(before) <= listed
            for doc in before:
                n = doc.split("part")[1].split(".")[0]
                bm25 = http.post("/v1/collections/live/search",
                                 json={"query": f"quartz{n}x", "mode": "bm25", "top_k": 1}).json()["data"]
                assert bm25 and bm25[0]["document_id"] == doc, (doc, bm25)
                vec = http.post("/v1/collections/live/search", json={
                    "query": f"marker word quartz{n}x", "mode": "vector", "top_k": 1,
                    "filter": {"document_id": doc}}).json()["data"]
                assert vec and vec[0]["document_id"] == doc, (doc, vec)
    finally:
        stop_server(again)
