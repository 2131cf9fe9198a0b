"""kill -9 a real server while it ingests, restart it, and check what it promised still holds."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import Server, fresh_data_dir, start_server

WORDS = "valve pump boiler seal impeller bearing gasket turbine compressor filter nozzle flange".split()


def doc_text(i: int) -> str:
    rng = random.Random(i)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(120)) + f" marker{i}." for _ in range(4)]
    return "\n\n".join(paragraphs)


def ingest_until_killed(server: Server, start: int, reported: list[str], stop: threading.Event) -> None:
    i = start
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                r = client.post(f"{server.url}/v1/collections/crash/documents", json={"id": f"doc{i}", "text": doc_text(i)})
            except httpx.HTTPError:
                return
            if r.status_code == 200 and r.json()["ingested"] == 1:
                reported.append(f"doc{i}")
            i += 1


def visible_chunks(server: Server, doc_id: str, mode: str) -> int:
    r = httpx.post(
        f"{server.url}/v1/collections/crash/search",
        json={"query": f"marker{doc_id[3:]} valve pump", "mode": mode, "top_k": 50, "filter": {"document_id": doc_id}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return len(r.json()["data"])


def test_kill_during_ingest_loses_nothing_reported(data_dir: Path, tmp_path: Path) -> None:
    work = fresh_data_dir(data_dir, tmp_path / "data")
    reported: list[str] = []
    attempted = 0
    rng = random.Random(7)
    no_resume = tmp_path / "no-resume.toml"
    no_resume.write_text("[retrieval]\nresume_on_start = false\n")
    for cycle in range(4):
        # Resuming stays off until the last start, so interrupted documents can be seen staying hidden.
        extra = () if cycle == 3 else ("--config", str(no_resume))
        server = start_server(work, tmp_path / f"log{cycle}", *extra)
        try:
            if cycle == 0:
                assert httpx.post(f"{server.url}/v1/collections", json={"name": "crash"}).status_code == 201
            # After a restart: everything reported before is searchable both ways, nothing else half-visible.
            for doc_id in reported:
                assert visible_chunks(server, doc_id, "bm25") >= 1, doc_id
                assert visible_chunks(server, doc_id, "vector") >= 1, doc_id
            docs = {d["id"]: d for d in httpx.get(f"{server.url}/v1/collections/crash/documents").json()["data"]}
            for i in range(attempted):
                doc_id = f"doc{i}"
                if doc_id in reported:
                    continue
                state = docs.get(doc_id, {}).get("state")
                if state != "ready":  # in flight when killed: invisible until resumed
                    assert visible_chunks(server, doc_id, "bm25") == 0, doc_id
                    assert visible_chunks(server, doc_id, "vector") == 0, doc_id
            if cycle == 3:
                # Resumed in the background: the interrupted documents become ready.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    docs = httpx.get(f"{server.url}/v1/collections/crash/documents").json()["data"]
                    if all(d["state"] == "ready" for d in docs):
                        break
                    time.sleep(0.5)
                assert all(d["state"] == "ready" for d in docs)
                for d in docs:
                    assert visible_chunks(server, d["id"], "bm25") == d["chunks"]
                break
            stop = threading.Event()
            start = attempted
            worker = threading.Thread(target=ingest_until_killed, args=(server, start, reported, stop))
            worker.start()
            time.sleep(1.5 + rng.random() * 2.5)
            server.proc.kill()  # SIGKILL: no cleanup of any kind
            server.proc.wait()
            stop.set()
            worker.join(30)
            attempted = start + 1 + max((int(d[3:]) for d in reported if int(d[3:]) >= start), default=start)
            attempted += 1  # the request in flight at the kill
        finally:
            if server.proc.poll() is None:
                server.proc.terminate()
                server.proc.wait(15)
    assert len(reported) >= 3
