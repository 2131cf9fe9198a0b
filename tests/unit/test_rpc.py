"""RPC peering without native code: worker bind rules, endpoint and settings validation, the
Python-side RPC hello against fake workers (a mismatch, an old protocol, a silent or absent worker)."""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from importlib import util
from pathlib import Path

import pytest

from appliance.engines import rpc
from appliance.errors import PeerUnavailable, SettingsError
from appliance.peering.worker import UNAUTHENTICATED_FLAG, parse_bind
from appliance.settings import load_settings

# -- worker bind ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("127.0.0.1:50052", "127.0.0.1:50052"), ("localhost:6000", "127.0.0.1:6000"), ("127.8.9.10:1", "127.8.9.10:1")],
)
def test_loopback_binds_are_accepted(given: str, expected: str) -> None:
    assert parse_bind(given, allow_public=False) == expected


@pytest.mark.parametrize("address", ["0.0.0.0:50052", "192.168.1.20:50052", "10.0.0.1:1"])
def test_a_network_bind_is_refused_without_the_flag_and_says_why(address: str) -> None:
    with pytest.raises(SettingsError) as err:
        parse_bind(address, allow_public=False)
    message = err.value.message
    assert "no authentication" in message and UNAUTHENTICATED_FLAG in message and "SSH tunnel" in message


def test_the_flag_allows_a_network_bind() -> None:
    assert parse_bind("0.0.0.0:50052", allow_public=True) == "0.0.0.0:50052"


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("unix:/run/appliance/rpc.sock", "IPv4 TCP only"),
        ("/run/rpc.sock", "IPv4 TCP only"),
        ("[::1]:50052", "IPv6"),
        ("worker.lan:50052", "IPv4 address"),
        ("127.0.0.1", "ADDRESS:PORT"),
        ("127.0.0.1:0", "ADDRESS:PORT"),
        ("127.0.0.1:70000", "ADDRESS:PORT"),
    ],
)
def test_binds_ggml_cannot_serve_are_refused(address: str, why: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(why)):
        parse_bind(address, allow_public=True)


def test_endpoints_parse_as_ggml_does() -> None:
    assert rpc.parse_endpoint("10.1.2.3:50052") == ("10.1.2.3", 50052)
    assert rpc.parse_endpoint("worker-2:7") == ("worker-2", 7)
    for bad in ("10.1.2.3", ":5", "h:", "h:x", "h:0", "[::1]:5"):
        with pytest.raises(ValueError):
            rpc.parse_endpoint(bad)


# -- settings ------------------------------------------------------------------------------------


def _settings(tmp_path: Path, body: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "appliance.toml"
    path.write_text(body)
    return load_settings(config=path, env={})


def test_split_settings_are_read_per_model(tmp_path: Path) -> None:
    s = _settings(
        tmp_path,
        '[models.rpc.gemma3-270m]\npeers = ["127.0.0.1:50052", "127.0.0.1:50053"]\ntensor_split = [1, 3]\n',
    )
    split = s.models.rpc["gemma3-270m"]
    assert split.peers == ["127.0.0.1:50052", "127.0.0.1:50053"]
    assert split.tensor_split == [1.0, 3.0] and split.offload_layers == -1


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("peers = []", "length >= 1"),
        ('peers = ["127.0.0.1:1", "127.0.0.1:1"]', "listed twice"),
        ('peers = ["127.0.0.1:99999"]', "outside 1-65535"),
        ('peers = ["[::1]:5"]', "matching regex"),
        ('peers = ["127.0.0.1:5"]\ntensor_split = [0, 0]', "positive sum"),
        ('peers = ["127.0.0.1:5"]\nport = 3', "unknown field"),
    ],
)
def test_bad_split_settings_stop_the_server_with_a_reason(tmp_path: Path, body: str, why: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(why)):
        _settings(tmp_path, f"[models.rpc.m]\n{body}\n")


# -- protocol version ----------------------------------------------------------------------------


def test_the_protocol_version_is_the_installed_headers() -> None:
    spec = util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed")
    header = Path(next(iter(spec.submodule_search_locations))).parent / "include" / "ggml-rpc.h"
    if not header.exists():
        pytest.skip("llama-cpp-python installed without its headers")
    text = header.read_text()
    version = tuple(
        int(re.search(rf"#define RPC_PROTO_{part}_VERSION\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        for part in ("MAJOR", "MINOR", "PATCH")
    )
    assert version == rpc.PROTO_VERSION


# -- the hello against fake workers --------------------------------------------------------------


@pytest.fixture
def fake_worker() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """A TCP server on loopback that treats each connection with the given function."""
    servers: list[socket.socket] = []

    def start(handle: Callable[[socket.socket], None]) -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def loop() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    handle(conn)

        threading.Thread(target=loop, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


def _read_hello(conn: socket.socket) -> bytes:
    data = b""
    while len(data) < 1 + 8 + 24:
        part = conn.recv(64)
        if not part:
            break
        data += part
    return data


def _answer(version: tuple[int, int, int]) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        hello = _read_hello(conn)
        assert hello[0] == 14 and struct.unpack("<Q", hello[1:9])[0] == 24
        conn.sendall(struct.pack("<Q", 28) + bytes([*version, 0]) + bytes(24))

    return handle


def test_a_worker_of_this_protocol_passes(fake_worker) -> None:  # type: ignore[no-untyped-def]
    endpoint = fake_worker(_answer(rpc.PROTO_VERSION))
    assert rpc.probe(endpoint, timeout=2) == rpc.PROTO_VERSION


@pytest.mark.parametrize("version", [(6, 0, 0), (7, 1, 0), (7, 0, 1)])
def test_a_version_mismatch_is_named(fake_worker, version: tuple[int, int, int]) -> None:  # type: ignore[no-untyped-def]
    endpoint = fake_worker(_answer(version))
    with pytest.raises(PeerUnavailable) as err:
        rpc.probe(endpoint, timeout=2)
    message = err.value.message
    assert ".".join(map(str, version)) in message and ".".join(map(str, rpc.PROTO_VERSION)) in message
    assert "same llama.cpp build" in message
    assert err.value.status == 503 and err.value.code == "peer_unavailable"


def test_an_older_protocol_that_hangs_up_on_the_hello_is_a_mismatch(fake_worker) -> None:  # type: ignore[no-untyped-def]
    # Workers before protocol 3.x expect an empty hello and close the connection on ours.
    endpoint = fake_worker(lambda conn: _read_hello(conn) and None)
    with pytest.raises(PeerUnavailable, match="another llama.cpp build"):
        rpc.probe(endpoint, timeout=2)


def test_an_old_three_byte_answer_is_a_mismatch(fake_worker) -> None:  # type: ignore[no-untyped-def]
    endpoint = fake_worker(lambda conn: _read_hello(conn) and conn.sendall(struct.pack("<Q", 3) + bytes([3, 0, 0])))
    with pytest.raises(PeerUnavailable, match=r"protocol 3\.0\.0"):
        rpc.probe(endpoint, timeout=2)


def test_a_silent_worker_times_out(fake_worker) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    endpoint = fake_worker(lambda conn: stop.wait(5) and None)
    with pytest.raises(PeerUnavailable, match="did not answer the RPC hello within 0.5 s"):
        rpc.probe(endpoint, timeout=0.5)
    stop.set()


def test_an_absent_worker_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed on exit: nothing listens there afterwards
    with pytest.raises(PeerUnavailable, match=f"127.0.0.1:{port} is unreachable"):
        rpc.probe(f"127.0.0.1:{port}", timeout=1)
    assert not rpc.listening(f"127.0.0.1:{port}", timeout=1)

