"""The real server and RPC worker run under the kernel-side sandbox their systemd units ask for.

No running systemd is needed: tests/systemd_sandbox.py reads systemd/appliance.service and
systemd/appliance-peer.service, asks `systemd-analyze syscall-filter` what the syscall groups hold, and
rebuilds the unit's seccomp filters with libseccomp (SystemCallFilter= with SystemCallErrorNumber=,
SystemCallArchitectures=native, MemoryDenyWriteExecute=, RestrictAddressFamilies=, RestrictNamespaces=,
LockPersonality=), drops every capability, sets no-new-privileges and the umask, and (as root) mounts a
private /proc with the unit's hidepid=, then execs the process.

- a probe shows the filters bite: W+X memory, a foreign socket family, setuid and unshare are refused,
  while a ctypes callback still works (libffi's memfd fallback);
- `appliance serve` answers /health, a greedy completion on gemma3-270m, an embedding on
  all-minilm-l6-v2, and a document ingest + bm25/vector/hybrid search, with no traceback and no
  onnxruntime cpuinfo failure in its log, and stops on SIGTERM;
- `appliance peer serve` under the peer unit's sandbox computes a split model's completion for a head.

Needs systemd-analyze (Debian: systemd) and libseccomp.so.2 (Debian: libseccomp2); skipped without them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from appliance.engines import rpc
from appliance.modelstore.manifest import MANIFEST_NAME, read_manifest
from tests.e2e.conftest import Server, fresh_data_dir, free_port, stop_server
from tests.systemd_sandbox import find_libseccomp, spec_from_unit, write_spec

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "tests" / "systemd_sandbox.py"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = [
    pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: systemd)"),
    pytest.mark.skipif(find_libseccomp() is None, reason="libseccomp.so.2 is not installed (Debian: libseccomp2)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux-only"),
]


def sandboxed(spec: Path, *cmd: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), str(spec), "--", *cmd]


@pytest.fixture(scope="module")
def server_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = spec_from_unit(REPO / "systemd" / "appliance.service", ANALYZE)
    return write_spec(spec, tmp_path_factory.mktemp("spec") / "appliance.json")


@pytest.fixture(scope="module")
def peer_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = spec_from_unit(REPO / "systemd" / "appliance-peer.service", ANALYZE)
    return write_spec(spec, tmp_path_factory.mktemp("spec") / "appliance-peer.json")


_PROBE = r"""
import ctypes, errno, json, mmap, os, socket
out = {}
libc = ctypes.CDLL(None, use_errno=True)
compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
values = (ctypes.c_int * 4)(3, 1, 4, 2)
libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), compare(lambda a, b: a[0] - b[0]))
out["ctypes_callback"] = list(values)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx_mmap"] = "allowed"
except OSError as e:
    out["wx_mmap"] = errno.errorcode[e.errno]
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    out["netlink"] = "allowed"
except OSError as e:
    out["netlink"] = errno.errorcode[e.errno]
try:
    os.setuid(0)
    out["setuid"] = "allowed"
except OSError as e:
    out["setuid"] = errno.errorcode[e.errno]
out["unshare"] = libc.unshare(0x10000000) == 0 or errno.errorcode[ctypes.get_errno()]
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out["status"] = {k: status[k].strip() for k in ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff", "CapBnd")}
out["umask"] = os.umask(0)
print(json.dumps(out))
"""


def test_the_filters_bite_and_ctypes_callbacks_still_work(server_spec: Path) -> None:
    cmd = sandboxed(server_spec, sys.executable, "-c", _PROBE)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ctypes_callback"] == [1, 2, 3, 4]  # libffi fell back to its memfd trampolines
    assert out["wx_mmap"] == "EPERM"  # MemoryDenyWriteExecute=
    assert out["netlink"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=
    assert out["setuid"] == "EPERM"  # ~@privileged, with SystemCallErrorNumber=EPERM
    assert out["unshare"] == "EPERM"  # RestrictNamespaces=
    assert out["status"]["NoNewPrivs"] == "1" and out["status"]["Seccomp"] == "2"
    assert int(out["status"]["Seccomp_filters"]) >= 5
    assert int(out["status"]["CapEff"], 16) == 0 and int(out["status"]["CapBnd"], 16) == 0
    assert out["umask"] == 0o077


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} under the sandbox:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"server did not become healthy under the sandbox:\n{log.read_text()}")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


@pytest.fixture(scope="module")
def sandboxed_server(
    data_dir: Path, server_spec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("sandboxed")
    data = fresh_data_dir(data_dir, base / "data")
    log = base / "server.log"
    port = free_port()
    serve = ["serve", "--port", str(port), "--data-dir", str(data)]
    cmd = sandboxed(server_spec, sys.executable, "-m", "appliance", *serve)
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=base)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    _wait_healthy(proc, server.url, log)
    server.data = data  # type: ignore[attr-defined]
    yield server
    if proc.poll() is None:
        stop_server(server)


def test_server_runs_confined(sandboxed_server: Server) -> None:
    status = _status(sandboxed_server.proc.pid)  # the launcher exec'd the server: same pid
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["Seccomp_filters"]) >= 5
    assert int(status["CapEff"], 16) == 0


def test_completion_under_the_sandbox(sandboxed_server: Server) -> None:
    body = {"model": "gemma3-270m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{sandboxed_server.url}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["text"].strip() and answer.json()["usage"]["completion_tokens"] == 8


def test_embedding_under_the_sandbox(sandboxed_server: Server) -> None:
    body = {"model": "all-minilm-l6-v2", "input": ["a relief valve", "a pressure relief valve"]}
    answer = httpx.post(f"{sandboxed_server.url}/v1/embeddings", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert [len(v) for v in vectors] == [384, 384]
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert sum(a * b for a, b in zip(*vectors)) > 0.7


def test_ingest_and_search_under_the_sandbox(sandboxed_server: Server) -> None:
    url = sandboxed_server.url
    assert httpx.post(f"{url}/v1/collections", json={"name": "manuals"}, timeout=30).status_code == 201
    text = (
        "# Relief valve\n\nThe relief valve opens at 8 bar and closes again at 6 bar.\n\n"
        "# Pump\n\nThe pump runs at 1450 rpm.\n"
    )
    files = {"file": ("valves.md", text.encode(), "text/markdown")}
    ingest = httpx.post(f"{url}/v1/collections/manuals/documents", files=files, timeout=120)
    assert ingest.status_code == 200, ingest.text
    assert ingest.json()["ingested"] == 1 and ingest.json()["failed"] == 0
    for mode in ("bm25", "vector", "hybrid"):
        query = {"query": "at what pressure does the relief valve open", "mode": mode}
        found = httpx.post(f"{url}/v1/collections/manuals/search", json=query, timeout=60)
        assert found.status_code == 200, found.text
        hits = found.json()["data"]
        assert hits and hits[0]["document_id"] == "valves.md" and "8 bar" in hits[0]["text"], (mode, hits)
    # UMask=0077: what the server created is private to its user.
    collections = sandboxed_server.data / "collections"  # type: ignore[attr-defined]
    created = [p for p in collections.rglob("*") if p.is_file()]
    assert created and all(p.stat().st_mode & 0o077 == 0 for p in created), [oct(p.stat().st_mode) for p in created]


def test_server_log_is_clean_and_it_stops_on_sigterm(sandboxed_server: Server) -> None:
    sandboxed_server.proc.send_signal(signal.SIGTERM)
    sandboxed_server.proc.wait(20)
    log = sandboxed_server.log.read_text()
    assert "Traceback" not in log
    # What ProcSubset=pid would break (see the unit): onnxruntime's CPU detection reads /proc/cpuinfo.
    assert "cpuinfo" not in log, re.findall(r".*cpuinfo.*", log)


# --- the RPC worker under appliance-peer.service's sandbox ----------------------------------------


def _link_model(models: Path, source: str, new_id: str) -> None:
    manifest = read_manifest(models / source / MANIFEST_NAME)
    (models / new_id).mkdir()
    (models / new_id / manifest.file.name).symlink_to((models / source / manifest.file.name).resolve())
    renamed = msgspec.structs.replace(manifest, id=new_id, aliases=[])
    (models / new_id / MANIFEST_NAME).write_bytes(msgspec.toml.encode(renamed))


def test_rpc_worker_serves_a_split_model_under_the_sandbox(data_dir: Path, peer_spec: Path, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    cache = tmp_path / "cache"
    cache.mkdir()
    worker_log = tmp_path / "worker.log"
    cmd = ["peer", "serve", "--bind", endpoint, "--threads", "1", "--cache-dir", str(cache)]
    worker = subprocess.Popen(sandboxed(peer_spec, sys.executable, "-m", "appliance", *cmd),
                              stdout=worker_log.open("wb"), stderr=subprocess.STDOUT)
    head = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None, worker_log.read_text()
            try:
                rpc.probe(endpoint, timeout=2)
                break
            except Exception:
                assert time.monotonic() < deadline, f"worker did not answer:\n{worker_log.read_text()}"
                time.sleep(0.3)
        status = _status(worker.pid)
        assert status["Seccomp"] == "2" and int(status["CapEff"], 16) == 0

        data = fresh_data_dir(data_dir, tmp_path / "head")
        _link_model(data / "models", "gemma3-270m", "gemma-split")
        config = tmp_path / "appliance.toml"
        config.write_text(
            f'[models]\nparallel = 1\nn_ctx = 1024\nthreads = 1\n[models.rpc.gemma-split]\npeers = ["{endpoint}"]\n'
        )
        port = free_port()
        head_log = tmp_path / "head.log"
        serve = ["serve", "--port", str(port), "--data-dir", str(data), "--config", str(config)]
        head_cmd = [sys.executable, "-m", "appliance", *serve]
        head = subprocess.Popen(head_cmd, stdout=head_log.open("wb"), stderr=subprocess.STDOUT)
        _wait_healthy(head, f"http://127.0.0.1:{port}", head_log)
        body = {"model": "gemma-split", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=180)
        assert answer.status_code == 200, f"{answer.text}\nworker:\n{worker_log.read_text()}"
        assert answer.json()["choices"][0]["text"].strip()
        assert worker.poll() is None, worker_log.read_text()
        assert "Traceback" not in worker_log.read_text()
    finally:
        for proc in (head, worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
