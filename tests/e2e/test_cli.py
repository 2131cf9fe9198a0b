"""The `appliance` command as an operator runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import free_port, start_server, stop_server
from tests.tinygguf import write_tiny_gguf


def appliance(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_every_command() -> None:
    out = appliance("--help").stdout
    for word in ("serve", "models", "version"):
        assert word in out
    serve = appliance("serve", "--help").stdout
    for flag in ("--host", "--port", "--data-dir", "--config", "--load"):
        assert flag in serve
    models = appliance("models", "--help").stdout
    for verb in ("list", "import", "verify", "remove", "install-defaults"):
        assert verb in models
    assert appliance("version").stdout.strip()


def test_models_import_list_verify_remove(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = {"APPLIANCE_DATA_DIR": str(data)}
    r = appliance("models", "import", str(gguf), "--id", "tiny", "--alias", "little", env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(appliance("models", "list", "--json", env=env).stdout)
    assert [(m["id"], m["format"], m["aliases"]) for m in listed] == [("tiny", "gguf", ["little"])]
    assert appliance("models", "verify", env=env).returncode == 0
    # Corrupt the stored copy: verify must fail loudly.
    stored = data / "models" / "tiny" / "tiny.gguf"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    r = appliance("models", "verify", "tiny", env=env)
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert appliance("models", "remove", "little", env=env).returncode == 0
    assert json.loads(appliance("models", "list", "--json", env=env).stdout) == []


def test_import_errors_are_clear_and_leave_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"APPLIANCE_DATA_DIR": str(data)}
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    cases = [
        ([str(cut)], "GGUF"),
        ([str(gguf), "--sha256", "ab" * 32], "sha256"),
        ([str(gguf), "--id", "../../etc"], "invalid model id"),
        ([str(tmp_path / "missing.gguf")], "does not exist"),
    ]
    for args, needle in cases:
        r = appliance("models", "import", *args, env=env)
        assert r.returncode != 0
        assert needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    models = data / "models"
    assert not models.exists() or os.listdir(models) == []


def test_serve_refuses_bad_settings_clearly(tmp_path: Path) -> None:
    r = appliance("serve", env={"APPLIANCE_PORT": "eighty", "APPLIANCE_DATA_DIR": str(tmp_path)}, timeout=30)
    assert r.returncode != 0
    assert "port" in r.stderr and "Traceback" not in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nport = 'x'\n")
    r = appliance("serve", "--config", str(cfg), env={"APPLIANCE_DATA_DIR": str(tmp_path)}, timeout=30)
    assert r.returncode != 0 and "port" in r.stderr


def test_serve_with_settings_file_and_no_models(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "empty"}"\n[server]\nport = {port}\n')
    srv = start_server(tmp_path / "ignored", tmp_path / "log", "--config", str(cfg))
    try:
        # The flags win over the file: start_server passes its own --port and --data-dir.
        assert httpx.get(f"{srv.url}/v1/models").json()["data"] == []
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    finally:
        stop_server(srv)
