"""The bundled model split over llama.cpp RPC workers: three `appliance peer serve` processes on
loopback and the real `appliance serve` head, which also serves the model whole on its own CPU.

- greedy output of the split model is identical to the single-node output computed with the same CPU
  kernels (RPC workers cannot use llama.cpp's repacked CPU weight layouts, which the head's own
  engine uses by default: those can differ at near-tie tokens);
- a worker running another RPC protocol, or none at all, is named in /health and the model's errors;
- killing a worker mid-stream ends that stream with a clear error, /health turns degraded, the head
  keeps serving its other models, and the split model comes back once the worker is restarted;
- a worker that stops answering (SIGSTOP, as a host that vanished) fails the stream after the stall
  timeout instead of hanging it, and the model comes back when the worker answers again.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from appliance.engines import rpc
from appliance.modelstore.manifest import MANIFEST_NAME, read_manifest
from tests.e2e.conftest import Server, fresh_data_dir, free_port, stop_server

SPLIT = "gemma-split"
MISMATCHED = "gemma-mismatched"
ABSENT = "gemma-absent"
STALL_S = 10
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at", "Once upon a time, in a small village,"]


class Worker:
    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.log = log
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "appliance", "peer", "serve", "--bind", self.endpoint, "--threads", "1"]
        proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log.read_text()
            try:
                rpc.probe(self.endpoint, timeout=2)
                return proc
            except Exception:
                time.sleep(0.2)
        proc.kill()
        raise RuntimeError(f"worker {self.endpoint} did not start:\n{self.log.read_text()}")

    def restart(self) -> None:
        self.proc = self._start()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


class FakeWorker:
    """Answers the RPC hello with protocol 6.0.0, as a worker of an older llama.cpp build would."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(64)
                    conn.sendall(struct.pack("<Q", 28) + bytes([6, 0, 0, 0]) + bytes(24))
                except OSError:
                    pass


def _copy_model(models: Path, source: str, new_id: str) -> None:
    """Register the same GGUF file again under another id (a link, no copy)."""
    manifest = read_manifest(models / source / MANIFEST_NAME)
    target = models / new_id
    target.mkdir()
    (target / manifest.file.name).symlink_to((models / source / manifest.file.name).resolve())
    renamed = msgspec.structs.replace(manifest, id=new_id, aliases=[])
    (target / MANIFEST_NAME).write_bytes(msgspec.toml.encode(renamed))


def _start_head(data: Path, config: Path, log: Path) -> Server:
    """The head server, waited for until every model has loaded or failed (/health may stay 503)."""
    port = free_port()
    # debug: the layer placement checks read llama.cpp's model-loading lines, logged at debug
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--data-dir", str(data), "--config", str(config),
           "--log-level", "debug"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"head exited with {proc.returncode}:\n{log.read_text()}")
        try:
            models = httpx.get(f"{url}/health", timeout=2).json()["models"]
            if models and all(m["state"] in ("ready", "failed") for m in models.values()):
                return Server(url, proc, log)
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"head did not finish loading:\n{log.read_text()}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    base = tmp_path_factory.mktemp("workers")
    started = [Worker(free_port(), base / f"worker{i}.log") for i in range(3)]
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.terminate()
            w.proc.wait(10)


@pytest.fixture(scope="module")
def head(data_dir: Path, workers: list[Worker], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("head")
    data = fresh_data_dir(data_dir, base / "data")
    for model_id in (SPLIT, MISMATCHED, ABSENT):
        _copy_model(data / "models", "gemma3-270m", model_id)
    fake = FakeWorker()
    with socket.create_server(("127.0.0.1", 0)) as s:
        absent = f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    peers = json.dumps([w.endpoint for w in workers])
    config = base / "appliance.toml"
    config.write_text(
        "[models]\nparallel = 2\nn_ctx = 1024\nthreads = 1\n"
        f'[models.rpc.{SPLIT}]\npeers = {peers}\ntensor_split = [1, 2, 1]\nstall_timeout_s = {STALL_S}\n'
        f'[models.rpc.{MISMATCHED}]\npeers = ["{fake.endpoint}"]\n'
        f'[models.rpc.{ABSENT}]\npeers = ["{absent}"]\nconnect_timeout_s = 1\n'
    )
    server = _start_head(data, config, base / "head.log")
    server.fake = fake  # type: ignore[attr-defined]
    yield server
    stop_server(server)
    fake.server.close()
    text = server.log.read_text()
    at = text.find("Traceback")
    assert at < 0, f"the head logged an unexpected traceback:\n{text[max(0, at - 1500) : at + 4000]}"


def _complete(server: Server, model: str, prompt: str, max_tokens: int = 32) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def _health(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/health", timeout=10).json()


_SINGLE_NODE = """
import json, sys, ctypes
import llama_cpp
import appliance.engines.llama  # loads the backend modules of a GGML_BACKEND_DL (portable) build
path, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
mp = llama_cpp.llama_model_default_params()
mp.n_gpu_layers = 0
mp.use_extra_bufts = False  # the plain CPU layout, as on an RPC worker
model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
vocab = llama_cpp.llama_model_get_vocab(model)
out = []
for prompt in prompts:
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_threads, cp.n_threads_batch, cp.flash_attn_type = 1024, 1, 1, 0
    ctx = llama_cpp.llama_init_from_model(model, cp)
    data = prompt.encode()
    buf = (llama_cpp.llama_token * 256)()
    k = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 256, True, True)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    tokens, text, piece = (llama_cpp.llama_token * k)(*buf[:k]), b"", ctypes.create_string_buffer(256)
    for _ in range(n):
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(tokens))) == 0
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        size = llama_cpp.llama_token_to_piece(vocab, token, piece, 256, 0, True)
        text += piece.raw[:size]
        tokens = (llama_cpp.llama_token * 1)(token)
    out.append(text.decode("utf-8", "replace"))
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_free(ctx)
print(json.dumps(out))
"""


def _single_node(model_path: Path, prompts: list[str], n: int) -> list[str]:
    """Greedy continuations on this node's CPU alone, in a separate process."""
    cmd = [sys.executable, "-c", _SINGLE_NODE, str(model_path), str(n), json.dumps(prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_split_greedy_output_is_identical_to_the_single_node_output(
    head: Server, workers: list[Worker], data_dir: Path
) -> None:
    state = _health(head)["models"][SPLIT]
    assert state["state"] == "ready" and state["error"] is None, state
    devices = state["engine"]["rpc"]["devices"]
    assert [d["endpoint"] for d in devices] == [w.endpoint for w in workers]
    manifest = read_manifest(data_dir / "models" / "gemma3-270m" / MANIFEST_NAME)
    single = _single_node(data_dir / "models" / "gemma3-270m" / manifest.file.name, PROMPTS, 32)
    for prompt, expected in zip(PROMPTS, single, strict=True):
        split = _complete(head, SPLIT, prompt)
        assert split.status_code == 200, split.text
        assert split.json()["choices"][0]["text"] == expected, prompt
        assert split.json()["usage"]["completion_tokens"] == 32
    # tensor_split = [1, 2, 1] over Gemma's 18 layers + the output layer: llama.cpp puts layers 0-4 on
    # the first worker, 5-14 on the second and the rest with the output matrix on the third.
    placed = dict(re.findall(r"llama_kv_cache: layer +(\d+): dev = (RPC\d+)", head.log.read_text()))
    counts = [sum(1 for dev in placed.values() if dev == f"RPC{i}") for i in range(3)]
    assert counts == [5, 10, 3], placed


def test_a_protocol_mismatch_and_an_absent_worker_are_named(head: Server) -> None:
    health = _health(head)
    assert health["status"] == "degraded"
    mismatch = health["models"][MISMATCHED]["error"]
    fake = head.fake.endpoint  # type: ignore[attr-defined]
    assert f"RPC worker {fake} speaks RPC protocol 6.0.0, this node {'.'.join(map(str, rpc.PROTO_VERSION))}" in mismatch
    assert "same llama.cpp build" in mismatch
    assert "is unreachable" in health["models"][ABSENT]["error"]
    # a split model whose workers were never reached still reports whole statistics (typed, zeros)
    absent = health["models"][ABSENT]["engine"]
    assert absent["queue_depth"] == 0 and absent["prefix_hit_tokens"] == 0 and absent["rpc"]["state"] == "down"
    scrape = httpx.get(f"{head.url}/metrics", timeout=10)
    assert scrape.status_code == 200 and f'appliance_queue_depth{{model="{ABSENT}"}} 0.0' in scrape.text
    response = _complete(head, MISMATCHED, "Hello")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "peer_unavailable" and "protocol 6.0.0" in error["message"]
    assert _complete(head, "gemma3-270m", "Hello", 4).status_code == 200


def _stream_until_error(server: Server, model: str, on_first_chunk: Any) -> list[dict[str, Any]]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 3:
                on_first_chunk()
    return events


def test_killing_a_worker_fails_the_split_model_clearly_and_the_head_keeps_serving(
    head: Server, workers: list[Worker]
) -> None:
    victim = workers[1]
    expected = _complete(head, SPLIT, PROMPTS[0]).json()["choices"][0]["text"]
    local = _complete(head, "gemma3-270m", PROMPTS[0]).json()["choices"][0]["text"]
    started = time.monotonic()
    events = _stream_until_error(head, SPLIT, victim.kill)
    assert time.monotonic() - started < 60
    assert "error" in events[-1], events[-1]
    error = events[-1]["error"]
    assert error["code"] == "peer_unavailable" and f"RPC worker {victim.endpoint} is unreachable" in error["message"]

    health = _health(head)
    assert health["status"] == "degraded"
    assert f"{victim.endpoint} is unreachable" in health["models"][SPLIT]["error"]
    response = _complete(head, SPLIT, "Hello")
    assert response.status_code == 503 and response.json()["error"]["code"] == "peer_unavailable"
    # The head's other models are untouched.
    assert _complete(head, "gemma3-270m", PROMPTS[0]).json()["choices"][0]["text"] == local
    embeddings = httpx.post(f"{head.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["hi"]}, timeout=60)
    assert embeddings.status_code == 200 and len(embeddings.json()["data"][0]["embedding"]) == 384

    # The worker comes back (systemd restarts it): the head reloads the split model by itself.
    victim.restart()
    _wait_recovered(head, SPLIT)
    assert _complete(head, SPLIT, PROMPTS[0]).json()["choices"][0]["text"] == expected
    assert _health(head)["models"][SPLIT]["engine"]["rpc"]["loads"] == 2


def _wait_recovered(server: Server, model: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _health(server)["models"][model]["error"] is not None:
        assert time.monotonic() < deadline, _health(server)["models"][model]
        time.sleep(0.5)


def test_a_worker_that_stops_answering_fails_the_stream_after_the_stall_timeout(
    head: Server, workers: list[Worker]
) -> None:
    _wait_recovered(head, SPLIT)
    victim = workers[2]
    started = time.monotonic()
    try:
        events = _stream_until_error(head, SPLIT, victim.freeze)
        waited = time.monotonic() - started
        error = events[-1]["error"]
        assert error["code"] == "peer_unavailable" and "no answer from the workers" in error["message"]
        assert f"RPC worker {victim.endpoint} accepted the connection but did not answer" in error["message"]
        assert STALL_S <= waited < STALL_S + 30, waited
        assert "no answer from the workers" in _health(head)["models"][SPLIT]["error"]
    finally:
        victim.thaw()
    _wait_recovered(head, SPLIT)
    assert _complete(head, SPLIT, PROMPTS[2]).status_code == 200


def test_registering_a_worker_twice_lists_its_devices_once(tmp_path: Path) -> None:
    worker = Worker(free_port(), tmp_path / "worker.log")
    try:
        code = (
            "from appliance.engines import rpc\n"
            f"a = rpc.register_peers(['{worker.endpoint}'], timeout=5)\n"
            f"b = rpc.register_peers(['{worker.endpoint}'], timeout=5)\n"
            "print(len(a), len(b), a[0].name, a[0].type, a[0].endpoint, a == b,"
            " any(d.endpoint for d in rpc.local_devices()))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "1", "RPC0", "GPU", worker.endpoint, "True", "False"]
    finally:
        worker.kill()


def test_the_worker_refuses_a_network_address_without_the_flag() -> None:
    cmd = [sys.executable, "-m", "appliance", "peer", "serve", "--bind", f"0.0.0.0:{free_port()}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "no authentication" in out.stderr and "--i-understand-rpc-is-unauthenticated" in out.stderr
