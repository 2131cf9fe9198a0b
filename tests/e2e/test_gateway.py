"""The gateway on the real server process: keys from the CLI, tenant isolation, budgets under
concurrency, metering of abandoned and crashed streams, tamper detection, the public-bind refusal."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import Server, fresh_data_dir, start_server, stop_server

pytestmark = pytest.mark.e2e
MODEL = "gemma3-270m"


def cli(data: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "--data-dir", str(data), *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class Keys:
    admin: str
    a: str
    b: str
    small: str


@pytest.fixture(scope="module")
def setup(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keys]:
    base = tmp_path_factory.mktemp("gateway")
    data = fresh_data_dir(data_dir, base / "data")
    for args in (["ops"], ["team-a"], ["team-b"], ["small", "--daily-tokens", "100"]):
        cli(data, "tenants", "create", *args)
    keys = Keys()
    keys.admin = cli(data, "keys", "create", "--tenant", "ops", "--role", "admin").stdout.strip()
    keys.a = cli(data, "keys", "create", "--tenant", "team-a").stdout.strip()
    keys.b = cli(data, "keys", "create", "--tenant", "team-b").stdout.strip()
    keys.small = cli(data, "keys", "create", "--tenant", "small").stdout.strip()
    return data, keys


@pytest.fixture(scope="module")
def gw(setup: tuple[Path, Keys], tmp_path_factory: pytest.TempPathFactory) -> Server:
    data, _ = setup
    srv = start_server(data, tmp_path_factory.mktemp("gw-log") / "server.log")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log.read_text()


def _http(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _client(server: Server, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_needs_a_valid_key(gw: Server, setup: tuple[Path, Keys]) -> None:
    _, keys = setup
    out = _client(gw, keys.a).completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        _client(gw, "ak_00000000." + "A" * 43).models.list()
    assert httpx.get(f"{gw.url}/health").status_code == 200


def test_tenants_cannot_see_each_others_collections(gw: Server, setup: tuple[Path, Keys]) -> None:
    _, keys = setup
    a, b = _http(gw, keys.a), _http(gw, keys.b)
    assert a.post("/v1/collections", json={"name": "secret-a"}).status_code == 201
    r = a.post("/v1/collections/secret-a/documents", json={"id": "plan", "text": "The launch code word is BLUEBIRD."})
    assert r.status_code == 200, r.text
    assert [h["document_id"] for h in a.post("/v1/collections/secret-a/search", json={"query": "launch code"}).json()["data"]] == ["plan"]
    # B cannot list, read, search, ask over or delete A's collection, nor learn that it exists.
    assert "secret-a" not in {c["name"] for c in b.get("/v1/collections").json()["data"]}
    for method, path, body in (
        ("GET", "/v1/collections/secret-a/documents", None),
        ("POST", "/v1/collections/secret-a/search", {"query": "launch code"}),
        ("POST", "/v1/collections/secret-a/ask", {"question": "What is the launch code word?"}),
        ("DELETE", "/v1/collections/secret-a/documents/plan", None),
        ("DELETE", "/v1/collections/secret-a", None),
    ):
        r = b.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "collection_not_found"
    chat = b.post("/v1/chat/completions", json={
        "model": MODEL, "collection": "secret-a", "messages": [{"role": "user", "content": "launch code?"}]})
    assert chat.status_code == 404
    # B may use the same name for its own collection: names live in each tenant's namespace.
    assert b.post("/v1/collections", json={"name": "secret-a"}).status_code == 201
    assert b.post("/v1/collections/secret-a/search", json={"query": "launch code"}).json()["data"] == []
    # A's collection and document are untouched.
    assert [d["id"] for d in a.get("/v1/collections/secret-a/documents").json()["data"]] == ["plan"]
    # Usage: B sees only its own tenant.
    assert b.get("/v1/usage", params={"tenant": "team-a"}).status_code == 403


def test_concurrent_requests_cannot_overspend_the_budget(gw: Server, setup: tuple[Path, Keys]) -> None:
    data, keys = setup
    client = _client(gw, keys.small)

    def one(i: int) -> str:
        try:
            client.completions.create(model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=24, temperature=0)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded"
            return "budget"

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert results.count("ok") >= 1 and results.count("budget") >= 1
    db = sqlite3.connect(data / "gateway.db")
    spent = db.execute(
        "SELECT SUM(prompt_tokens + completion_tokens) FROM usage WHERE tenant = 'small'"
    ).fetchone()[0]
    assert spent <= 100  # reservations held the line: never more than the budget was served


def test_abandoned_stream_is_metered_for_what_was_generated(gw: Server, setup: tuple[Path, Keys]) -> None:
    data, keys = setup
    client = _client(gw, keys.a)
    stream = client.completions.create(
        model=MODEL, prompt="A long story:", max_tokens=200, temperature=0, stream=True,
        extra_headers={"X-Request-Id": "abandon-0001"},
    )
    received = 0
    for chunk in stream:
        received += 1
        if received == 6:
            break
    stream.close()
    db = sqlite3.connect(data / "gateway.db")
    for _ in range(50):
        row = db.execute(
            "SELECT outcome, completion_tokens FROM usage WHERE request_id = 'abandon-0001'"
        ).fetchone()
        if row:
            break
        import time

        time.sleep(0.1)
    assert row is not None
    outcome, tokens = row
    assert outcome == "cancelled" and 5 <= tokens < 200


def test_a_crash_mid_stream_loses_no_usage_and_the_chain_verifies(
    data_dir: Path, setup: tuple[Path, Keys], tmp_path: Path
) -> None:
    _, keys = setup
    data = fresh_data_dir(data_dir, tmp_path / "data")
    cli(data, "tenants", "create", "crashy")
    key = cli(data, "keys", "create", "--tenant", "crashy").stdout.strip()
    srv = start_server(data, tmp_path / "a.log")
    client = _client(srv, key)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                              extra_headers={"X-Request-Id": "before-crash"})
    stream = client.completions.create(model=MODEL, prompt="A long story:", max_tokens=300, temperature=0,
                                       stream=True, extra_headers={"X-Request-Id": "during-crash"})
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 30:  # the in-flight journal is checkpointed about once a second
            break
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    srv = start_server(data, tmp_path / "b.log")
    try:
        db = sqlite3.connect(data / "gateway.db")
        rows = dict(db.execute("SELECT request_id, outcome FROM usage WHERE tenant = 'crashy'").fetchall())
        assert rows["before-crash"] == "ok"
        assert rows["during-crash"] == "interrupted"
        tokens = db.execute("SELECT completion_tokens FROM usage WHERE request_id = 'during-crash'").fetchone()[0]
        assert tokens >= 1
        assert db.execute("SELECT COUNT(*) FROM usage_inflight").fetchone()[0] == 0
        assert "ok:" in cli(data, "usage", "verify").stdout
    finally:
        stop_server(srv)


def test_usage_verify_detects_edited_deleted_and_reordered_records(
    gw: Server, setup: tuple[Path, Keys], tmp_path: Path
) -> None:
    data, keys = setup
    for _ in range(6):
        assert _http(gw, keys.a).get("/v1/models").status_code == 200
    head = cli(data, "usage", "verify").stdout.split("head ")[1].strip()
    report = cli(data, "usage", "report", "--format", "csv", "--group-by", "tenant").stdout
    assert report.splitlines()[0].startswith("tenant,requests,prompt_tokens")
    assert "team-a" in report

    def tampered(name: str, sql: str) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / name
        copy.mkdir()
        for name in ("gateway.db", "gateway.db-wal"):  # the -shm index is rebuilt from the WAL
            if (data / name).exists():
                shutil.copy(data / name, copy / name)
        db = sqlite3.connect(copy / "gateway.db")
        db.executescript(sql)
        db.commit()
        db.close()
        return cli(copy, "usage", "verify", check=False)

    edited = tampered("edited", "UPDATE usage SET completion_tokens = completion_tokens + 1 WHERE seq = 2;")
    assert edited.returncode == 1 and "record 2" in edited.stderr and "edited" in edited.stderr
    deleted = tampered("deleted", "DELETE FROM usage WHERE seq = 3;")
    assert deleted.returncode == 1 and "record 3" in deleted.stderr
    reordered = tampered(
        "reordered",
        "UPDATE usage SET seq = -1 WHERE seq = 2; UPDATE usage SET seq = 2 WHERE seq = 3;"
        " UPDATE usage SET seq = 3 WHERE seq = -1;"
    )
    assert reordered.returncode == 1 and "record 2" in reordered.stderr
    truncated = tampered("truncated", "DELETE FROM usage WHERE seq = (SELECT MAX(seq) FROM usage);")
    copy = tmp_path / "truncated"
    assert truncated.returncode == 0  # a shorter chain is still a chain...
    anchored = cli(copy, "usage", "verify", "--expect-head", head, check=False)
    assert anchored.returncode == 1 and "removed from the end" in anchored.stderr  # ...unless anchored
    assert "TAMPERED" not in anchored.stderr  # every remaining record verifies; the anchor is what is missing
    wrong = cli(copy, "usage", "verify", "--expect-head", "0000", check=False)
    assert wrong.returncode == 1 and "not a head hash" in wrong.stderr and "removed" not in wrong.stderr


def test_refuses_a_public_address_without_keys(data_dir: Path, tmp_path: Path) -> None:
    data = fresh_data_dir(data_dir, tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--host", "0.0.0.0", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "refusing to listen on 0.0.0.0" in proc.stderr and "keys create" in proc.stderr
