"""`appliance doctor` on real directories, files, sockets, HTTP servers and child processes.

Each check takes what it reads as parameters (meminfo text, cpuinfo text, a port), so a test hands
it a small machine or a hostile data dir without touching the real one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import __version__
from appliance.cli import main
from appliance.doctor import (
    BuildProbe,
    MemoryInfo,
    ModelMemory,
    check_clock,
    check_cpu,
    check_data_dir,
    check_data_format,
    check_disk,
    check_exposure,
    check_gpu,
    check_memory,
    check_models,
    check_peer,
    check_port,
    check_rpc_worker,
    ClockState,
    estimate_models_memory,
    failed,
    GpuFacts,
    parse_meminfo,
    parse_system_info,
    probe_argv,
    probe_build,
    probe_port,
    render,
)
from appliance.errors import AuthenticationFailed
from appliance.modelstore.store import ModelStore
from appliance.peering.auth import SignatureVerifier
from appliance.peering.cluster import STATE_PATH
from appliance.settings import PeerSettings, load_settings
from tests.tinygguf import write_tiny_gguf

CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    return d


@pytest.fixture
def tiny_model(data_dir: Path, tmp_path: Path) -> Path:
    """A registered tiny GGUF; returns the registered file."""
    store = ModelStore(data_dir / "models")
    manifest = store.import_model(write_tiny_gguf(tmp_path / "tiny.gguf"), model_id="tiny")
    return store.path_of(manifest, manifest.file)


# -- data dir ----------------------------------------------------------------------------------


def test_data_dir_owned_by_another_user_fails_with_the_fix(data_dir: Path) -> None:
    if os.geteuid() == 0:
        os.chown(data_dir, 65534, 65534)
        runner = 0
    else:
        runner = os.getuid() + 1  # not root: the same question, asked as another user would
    check = check_data_dir(data_dir, runner)
    assert check.status == "FAIL"
    assert "owned by" in check.detail
    assert check.fix is not None and "chown -R" in check.fix and "sudo -u" in check.fix


def test_private_data_dir_of_the_runner_is_ok(data_dir: Path) -> None:
    check = check_data_dir(data_dir, os.getuid())
    assert (check.status, check.fix) == ("ok", None)
    assert "mode 0700" in check.detail and "writable" in check.detail


def test_world_writable_fails_and_world_readable_warns(data_dir: Path) -> None:
    data_dir.chmod(0o777)
    writable = check_data_dir(data_dir, os.getuid())
    assert writable.status == "FAIL" and "world-writable" in writable.detail and "chmod 750" in (writable.fix or "")
    data_dir.chmod(0o755)
    readable = check_data_dir(data_dir, os.getuid())
    assert readable.status == "warn" and "chmod 750" in (readable.fix or "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a file to another user")
def test_file_inside_owned_by_someone_else_fails(data_dir: Path) -> None:
    db = data_dir / "gateway.db"
    db.write_bytes(b"")
    os.chown(db, 65534, 65534)
    check = check_data_dir(data_dir, 0)
    assert check.status == "FAIL" and "gateway.db" in check.detail and f"chown -R root {data_dir}" in (check.fix or "")


def test_data_format_newer_than_this_release_fails(data_dir: Path) -> None:
    assert check_data_format(data_dir).status == "ok"
    (data_dir / "data-format.json").write_text('{"format": 99, "written_by": "9.0.0"}')
    check = check_data_format(data_dir)
    assert check.status == "FAIL" and "9.0.0" in check.detail


def test_missing_data_dir_is_a_warning(tmp_path: Path) -> None:
    assert check_data_dir(tmp_path / "not-yet", os.getuid()).status == "warn"


# -- model files -------------------------------------------------------------------------------


def test_registered_model_with_matching_size_is_ok(data_dir: Path, tiny_model: Path) -> None:
    [check] = check_models(data_dir)
    assert (check.name, check.status) == ("model tiny", "ok")
    [full] = check_models(data_dir, full=True)
    assert full.status == "ok" and "sha256 verified" in full.detail


def test_truncated_model_fails_naming_the_file_and_the_fix(data_dir: Path, tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    tiny_model.write_bytes(data[:-100])
    [check] = check_models(data_dir)
    assert check.status == "FAIL"
    assert str(tiny_model) in check.detail and "truncated" in check.detail
    assert check.fix is not None and "models remove tiny" in check.fix and "models import" in check.fix


def test_full_rehash_finds_a_changed_byte_the_size_check_misses(data_dir: Path, tiny_model: Path) -> None:
    data = bytearray(tiny_model.read_bytes())
    data[-1] ^= 0xFF
    tiny_model.write_bytes(bytes(data))
    assert check_models(data_dir)[0].status == "ok"
    [full] = check_models(data_dir, full=True)
    assert full.status == "FAIL" and "sha256" in full.detail


def test_missing_model_file_and_broken_manifest_fail(data_dir: Path, tiny_model: Path) -> None:
    tiny_model.unlink()
    broken = data_dir / "models" / "broken"
    broken.mkdir()
    (broken / "manifest.toml").write_text("id = 'broken'\n")
    checks = {c.name: c for c in check_models(data_dir)}
    assert checks["model tiny"].status == "FAIL" and "missing" in checks["model tiny"].detail
    assert checks["model broken"].status == "FAIL" and "manifest" in checks["model broken"].detail


def test_no_models_is_a_warning_with_install_defaults(data_dir: Path) -> None:
    [check] = check_models(data_dir)
    assert check.status == "warn" and "install-defaults" in (check.fix or "")


# -- memory ------------------------------------------------------------------------------------

MEMINFO_SMALL = "MemTotal:        1024 kB\nMemFree:          512 kB\nMemAvailable:     768 kB\n"
MEMINFO_BIG = "MemTotal:    67108864 kB\nMemFree:     60000000 kB\nMemAvailable: 64000000 kB\n"


def test_memory_too_small_fails_with_the_estimate(data_dir: Path, tiny_model: Path) -> None:
    settings = load_settings(env={}, overrides={(None, "data_dir"): str(data_dir)})
    needs = estimate_models_memory(ModelStore(settings.models_dir), settings)
    assert [m.model_id for m in needs] == ["tiny"] and needs[0].total > 1 << 20
    check = check_memory(needs, parse_meminfo(MEMINFO_SMALL))
    assert check.status == "FAIL"
    assert "tiny:" in check.detail and "weights" in check.detail and "1 MiB RAM" in check.detail
    assert check.fix is not None and "n_ctx" in check.fix
    assert check_memory(needs, parse_meminfo(MEMINFO_BIG)).status == "ok"


def test_model_split_over_rpc_workers_is_not_counted_here(data_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "split.toml"
    config.write_text(f'data_dir = "{data_dir}"\n[models.rpc.tiny]\npeers = ["127.0.0.1:50052"]\n')
    settings = load_settings(config=config, env={})
    [split] = estimate_models_memory(ModelStore(settings.models_dir), settings)
    [whole] = estimate_models_memory(ModelStore(settings.models_dir), load_settings(env={}, overrides={(None, "data_dir"): str(data_dir)}))
    assert split.total == 0 < whole.total and "RPC workers" in split.explanation


def test_memory_counts_the_cgroup_limit_and_max_memory() -> None:
    model = ModelMemory(model_id="big", total=3 << 30, explanation="big: 3 GiB")
    limited = parse_meminfo(MEMINFO_BIG, cgroup_limit=2 << 30)
    assert limited.ram == 2 << 30 and limited.available == 2 << 30
    check = check_memory([model], limited)
    assert check.status == "FAIL" and "cgroup limit" in check.detail
    # With models.max_memory each model must fit the limit on its own.
    over = check_memory([model], parse_meminfo(MEMINFO_BIG), max_memory=1 << 30)
    assert over.status == "FAIL" and "big alone exceeds models.max_memory" in over.detail
    assert check_memory([model], parse_meminfo(MEMINFO_BIG), max_memory=4 << 30).status == "ok"


def test_meminfo_parsing() -> None:
    info = parse_meminfo(MEMINFO_SMALL)
    assert info == MemoryInfo(total=1024 * 1024, available=768 * 1024)


# -- disk, CPU, GPU, clock ---------------------------------------------------------------------


def test_disk_thresholds(data_dir: Path) -> None:
    assert check_disk(data_dir, warn_below=0, fail_below=0).status == "ok"
    assert check_disk(data_dir, warn_below=1 << 62, fail_below=0).status == "warn"
    assert check_disk(data_dir / "absent" / "deeper", warn_below=0, fail_below=1 << 62).status == "FAIL"


def test_real_build_probe_matches_this_cpu() -> None:
    probe = probe_build(probe_argv())
    assert probe.returncode == 0, probe.stderr
    assert "CPU" in parse_system_info(probe.system_info)
    assert check_cpu(probe, CPUINFO).status == "ok"


def test_build_for_an_instruction_the_cpu_lacks_fails() -> None:
    probe = BuildProbe(system_info="CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | OPENMP = 1 |")
    old_cpu = "processor : 0\nflags : fpu sse sse2 pni avx\n"
    check = check_cpu(probe, old_cpu)
    assert check.status == "FAIL" and "AVX2" in check.detail and "AVX512" not in check.detail
    assert "GGML_NATIVE" in (check.fix or "")


def test_build_that_dies_with_sigill_fails() -> None:
    probe = probe_build([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    check = check_cpu(probe, CPUINFO)
    assert check.status == "FAIL" and "SIGILL" in check.detail


def test_gpu_lines() -> None:
    assert check_gpu(GpuFacts(), "auto")[0].detail == "no GPU: CPU inference"
    facts = GpuFacts(driver="NVRM version: 580", gpus=["H100, 81559 MiB, 580"],
                     cuda_builds={"/x/libggml-cuda.so": ["libcublas.so.13"]})
    statuses = [c.status for c in check_gpu(facts, "auto")]
    assert statuses == ["ok", "FAIL"]
    assert check_gpu(GpuFacts(driver="NVRM"), "auto")[0].status == "warn"


def test_clock_matters_only_with_peers() -> None:
    unsynced = ClockState(synchronised=False)
    assert check_clock(unsynced, cluster_enabled=False, max_age_s=60).status == "ok"
    assert check_clock(unsynced, cluster_enabled=True, max_age_s=60).status == "warn"


# -- network -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """A stand-in peer: /health and /version as the appliance answers them, and the state route behind
    the real SignatureVerifier, all on a clock `clock_offset` seconds off."""

    clock_offset = 0.0
    verifier_secret = "s" * 32

    def do_GET(self) -> None:  # noqa: N802
        now = time.time() + self.clock_offset
        if self.path == "/health":
            self._json(200, {"status": "ok", "models": {}})
        elif self.path == "/version":
            self._json(200, {"version": __version__, "llama_cpp_python": "0.3.36", "onnxruntime": None})
        elif self.path == STATE_PATH:
            verifier = SignatureVerifier(
                lambda node: self.verifier_secret if node == "a:1" else None,
                paths=frozenset({STATE_PATH}), max_age_s=60, clock=lambda: now,
            )
            try:
                verifier.verify({k.lower(): v for k, v in self.headers.items()}, "GET", self.path)
            except AuthenticationFailed as exc:
                self._json(401, {"error": {"message": exc.message, "type": "authentication_error"}})
                return
            self._json(200, {"node": "node-b", "health": "ok", "models": [], "time": now})
        else:
            self._json(404, {})

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(time.time() + self.clock_offset, usegmt=True)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_port_free_in_use_and_taken_by_an_appliance(http_server: ThreadingHTTPServer) -> None:
    port = free_port()
    assert check_port(probe_port("127.0.0.1", port), "127.0.0.1", port).status == "ok"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        check = check_port(probe_port("127.0.0.1", taken, timeout=0.5), "127.0.0.1", taken)
    assert check.status == "FAIL" and "in use" in check.detail and "ss -ltnp" in (check.fix or "")
    busy = http_server.server_address[1]
    running = check_port(probe_port("127.0.0.1", busy), "127.0.0.1", busy)
    assert running.status == "warn" and "already running" in running.detail


def test_exposure_without_keys_fails(data_dir: Path) -> None:
    assert check_exposure("127.0.0.1", data_dir).status == "ok"
    check = check_exposure("0.0.0.0", data_dir)
    assert check.status == "FAIL" and "keys create" in (check.fix or "")
    assert not (data_dir / "gateway.db").exists()  # doctor never creates the database


def _peer(port: int) -> PeerSettings:
    return PeerSettings(name="node-b", url=f"http://127.0.0.1:{port}", secret="s" * 32)


def test_peer_unreachable_warns() -> None:
    check = check_peer(_peer(free_port()), secret="s" * 32, node="a:1", max_age_s=60, timeout=1)
    assert check.status == "warn" and "unreachable" in check.detail


def test_peer_that_accepts_our_signature_is_ok(http_server: ThreadingHTTPServer) -> None:
    check = check_peer(_peer(http_server.server_address[1]), secret="s" * 32, node="a:1", max_age_s=60, timeout=2)
    assert check.status == "ok", check.detail
    assert "accepts our signature" in check.detail and f"appliance {__version__}" in check.detail


def test_peer_refusing_our_secret_fails(http_server: ThreadingHTTPServer) -> None:
    check = check_peer(_peer(http_server.server_address[1]), secret="t" * 32, node="a:1", max_age_s=60, timeout=2)
    assert check.status == "FAIL" and "refuses our signature: Invalid cluster signature" in check.detail
    assert "same secret" in (check.fix or "")


def test_peer_clock_skew_warns_then_fails(http_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port = http_server.server_address[1]
    monkeypatch.setattr(_Handler, "clock_offset", 40.0)
    skewed = check_peer(_peer(port), secret="s" * 32, node="a:1", max_age_s=60, timeout=2)
    assert skewed.status == "warn" and "clock +40.0 s" in skewed.detail and "NTP" in (skewed.fix or "")
    monkeypatch.setattr(_Handler, "clock_offset", 300.0)
    refused = check_peer(_peer(port), secret="s" * 32, node="a:1", max_age_s=60, timeout=2)
    # Its Date header still tells the skew when it refuses the signature for it.
    assert refused.status == "FAIL" and "s off" in refused.detail and "clock +300" in refused.detail.replace("+299", "+300")


def test_rpc_worker_not_listening_fails() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    check = check_rpc_worker("tiny", endpoint, timeout=1, registered=True, server_running=False)
    assert check.status == "FAIL" and "unreachable" in check.detail and "peer serve" in (check.fix or "")


# -- the command -------------------------------------------------------------------------------


def _invoke(data_dir: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    config = tmp_path / "appliance.toml"
    config.write_text(f'data_dir = "{data_dir}"\n[server]\nport = {free_port()}\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(config), *args])
    return result.exit_code, result.stdout


def test_json_shape_and_exit_0_when_nothing_fails(data_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    code, out = _invoke(data_dir, tmp_path, "--json")
    checks = json.loads(out)
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert all(c["status"] in ("ok", "warn", "FAIL") for c in checks)
    names = [c["name"] for c in checks]
    for expected in ("cpu", "memory", "disk", "data dir", "model tiny", "gpu", "port", "clock", "peers"):
        assert expected in names
    assert [c for c in checks if c["status"] == "FAIL"] == [] and code == 0


def test_exit_1_on_a_fail(data_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    tiny_model.write_bytes(tiny_model.read_bytes()[:-10])
    code, out = _invoke(data_dir, tmp_path)
    assert code == 1
    assert any(line.startswith("FAIL") and "model tiny" in line for line in out.splitlines())
    assert "fix: appliance --data-dir" in out and out.rstrip().endswith("blocked")


def test_bad_settings_are_a_fail_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 0\n")
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exit_code == 1 and result.stdout.startswith("FAIL")


def test_render_puts_the_fix_under_the_line() -> None:
    from appliance.doctor import Check

    text = render([Check(name="a", status="FAIL", detail="broken", fix="mend it"), Check(name="bb", status="ok", detail="fine")])
    assert text.splitlines() == ["FAIL  a   broken", "          fix: mend it", "ok    bb  fine", "1 FAIL, 1 ok: blocked"]
    assert failed([Check(name="a", status="warn", detail="")]) is False


APPLIANCE = Path(sys.executable).parent / "appliance"


@pytest.mark.skipif(not APPLIANCE.exists(), reason="the appliance console script is not installed")
def test_installed_command_probes_like_the_frozen_binary_and_sets_the_exit_code(
    data_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # `appliance doctor --probe-cpu` is the child a PyInstaller binary starts (sys.executable is the binary).
    probe = probe_build([str(APPLIANCE), "doctor", "--probe-cpu"])
    assert probe.returncode == 0 and "CPU" in parse_system_info(probe.system_info), probe.stderr
    config = tmp_path / "appliance.toml"
    config.write_text(f'data_dir = "{data_dir}"\n[server]\nport = {free_port()}\n')
    run = lambda: subprocess.run(  # noqa: E731
        [str(APPLIANCE), "doctor", "--json", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    ok = run()
    assert ok.returncode == 0, ok.stdout
    assert {c["status"] for c in json.loads(ok.stdout)} <= {"ok", "warn"}
    tiny_model.unlink()
    missing = run()
    assert missing.returncode == 1
    assert [c["name"] for c in json.loads(missing.stdout) if c["status"] == "FAIL"] == ["model tiny"]
