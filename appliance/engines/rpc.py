"""llama.cpp's RPC backend (ggml-rpc) through ctypes. The only module that calls ggml's RPC functions.

A worker node runs `start_worker`, which hands its CPU or GPU devices to ggml's RPC server. A head
node registers its workers with `register_peers`; each worker's devices then appear in ggml's
device registry and llama.cpp spreads a model's layers over them like over local GPUs.

What ggml does on failure decides how this is used (ggml-rpc.cpp, llama.cpp as vendored by
llama-cpp-python 0.3.36):

- `ggml_backend_rpc_add_server` on a worker that cannot be reached, or that answers the hello with
  another protocol version, calls GGML_ABORT: the whole process dies. `probe` therefore checks a
  worker from Python (TCP connect plus the RPC hello) before anything is registered.
- A worker that dies while a model uses it makes the next RPC call fail, and RPC_STATUS_ASSERT
  aborts the process too; a worker that stops answering (host down, cable pulled) blocks it forever,
  as the client has no timeouts. A model split over workers therefore runs in a child process
  (engines/split.py), never in the server process.
- Once registered, RPC devices count as GPUs for every model loaded later in the same process.

The worker speaks IPv4 TCP only (ggml binds with inet_addr and has no Unix-socket transport) and
serves one client connection at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import EngineError, PeerUnavailable

log = logging.getLogger(__name__)

PROTO_VERSION = (7, 0, 0)
"""RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of ggml-rpc.h in the llama.cpp this appliance is built with.

The header is installed with llama-cpp-python (site-packages/include/ggml-rpc.h); a unit test keeps
this constant equal to it.
"""
MAX_SERVERS = 16
"""GGML_RPC_MAX_SERVERS."""
_CMD_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
_CONN_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE: rpc_msg_hello_req is these bytes, rpc_msg_hello_rsp 4 more
_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}


@dataclass(frozen=True)
class Device:
    """A ggml backend device: local (CPU, CUDA0...) or a worker's (RPC0, RPC1...)."""

    name: str
    description: str
    type: str
    memory_free: int
    memory_total: int
    handle: int
    """The ggml_backend_dev_t pointer, for llama_model_params.devices."""
    endpoint: str | None = None
    """host:port of the worker that owns it; None for a local device."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` as ggml parses it (split at the first colon); IPv6 literals are not supported by ggml."""
    host, sep, port_text = text.strip().partition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not host:port (for example 127.0.0.1:50052)")
    if ":" in port_text or "[" in host:
        raise ValueError(f"{text!r}: IPv6 addresses are not supported by llama.cpp's RPC transport")
    return host, int(port_text)


# -- Python-side checks (no ggml) ----------------------------------------------------------------


def probe(endpoint: str, timeout: float) -> tuple[int, int, int]:
    """Check that a worker is reachable and speaks this build's RPC protocol; returns its version.

    Raises PeerUnavailable with the reason. Costs one short-lived connection, which the worker serves
    like any client: a worker busy with another head's connection does not answer until it is free.
    """
    host, port = parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise PeerUnavailable(f"RPC worker {endpoint} is unreachable (no answer to connect in {timeout:g} s)") from None
    except OSError as exc:
        raise PeerUnavailable(f"RPC worker {endpoint} is unreachable ({exc.strerror or exc})") from None
    with sock:
        sock.settimeout(timeout)
        hello = bytes([_CMD_HELLO]) + struct.pack("<Q", _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE)
        try:
            sock.sendall(hello)
            header = _recv_exact(sock, 8)
            (size,) = struct.unpack("<Q", header)
            body = _recv_exact(sock, size) if 3 <= size <= 4096 else b""
        except TimeoutError:
            raise PeerUnavailable(
                f"RPC worker {endpoint} accepted the connection but did not answer the RPC hello within "
                f"{timeout:g} s (is another head node connected to it? a worker serves one client at a time)"
            ) from None
        except (ConnectionError, EOFError):
            raise PeerUnavailable(
                f"RPC worker {endpoint} closed the connection on the RPC hello of protocol "
                f"{_version_text(PROTO_VERSION)}: it runs another llama.cpp build (every node must run the same "
                "one), or the SSH tunnel in front of it cannot reach it"
            ) from None
        except OSError as exc:
            raise PeerUnavailable(f"RPC worker {endpoint}: hello failed ({exc.strerror or exc})") from None
    if len(body) < 3:
        raise PeerUnavailable(
            f"RPC worker {endpoint} answered the hello with {size} bytes, not a llama.cpp RPC hello of protocol "
            f"{_version_text(PROTO_VERSION)}: it runs another llama.cpp build, or is not an RPC worker"
        )
    version = (body[0], body[1], body[2])
    if version != PROTO_VERSION or size != 4 + _CONN_CAPS_SIZE:
        raise PeerUnavailable(
            f"RPC worker {endpoint} speaks RPC protocol {_version_text(version)}, this node "
            f"{_version_text(PROTO_VERSION)}: every node must run the same llama.cpp build"
        )
    return version


def listening(endpoint: str, timeout: float) -> bool:
    """True when something accepts TCP connections at the endpoint (no hello: the worker may be busy)."""
    host, port = parse_endpoint(endpoint)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise EOFError
        data += part
    return bytes(data)


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(str(v) for v in version)


# -- ggml ----------------------------------------------------------------------------------------

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
)
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


class _Ggml:
    """Prototypes on a handle of our own, so llama_cpp's function objects keep theirs."""

    def __init__(self) -> None:
        # The libggml that libllama uses (and, in a GGML_BACKEND_DL build, its backend modules loaded).
        from appliance.engines.llama import ggml_library

        lib = ggml_library()
        p, s, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int

        def fn(name: str, restype: object, *argtypes: object) -> Callable[..., object]:
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.reg_by_name = fn("ggml_backend_reg_by_name", p, ctypes.c_char_p)
        self.reg_get_proc_address = fn("ggml_backend_reg_get_proc_address", p, p, ctypes.c_char_p)
        self.register = fn("ggml_backend_register", None, p)
        self.reg_dev_count = fn("ggml_backend_reg_dev_count", s, p)
        self.reg_dev_get = fn("ggml_backend_reg_dev_get", p, p, s)
        self.dev_count = fn("ggml_backend_dev_count", s)
        self.dev_get = fn("ggml_backend_dev_get", p, s)
        self.dev_by_name = fn("ggml_backend_dev_by_name", p, ctypes.c_char_p)
        self.dev_name = fn("ggml_backend_dev_name", ctypes.c_char_p, p)
        self.dev_description = fn("ggml_backend_dev_description", ctypes.c_char_p, p)
        self.dev_type = fn("ggml_backend_dev_type", i, p)
        self.dev_memory = fn("ggml_backend_dev_memory", None, p, ctypes.POINTER(s), ctypes.POINTER(s))
        self.set_abort_callback = fn("ggml_set_abort_callback", p, _ABORT_CALLBACK)
        self.version = fn("ggml_version", ctypes.c_char_p)
        self.commit = fn("ggml_commit", ctypes.c_char_p)

    def rpc_reg(self) -> int:
        reg = self.reg_by_name(b"RPC")
        if not reg:
            raise EngineError("this llama-cpp-python was built without the RPC backend (CMAKE_ARGS=-DGGML_RPC=on)")
        return reg  # type: ignore[return-value]

    def rpc_function(self, name: str, prototype: type) -> Callable[..., object]:
        address = self.reg_get_proc_address(self.rpc_reg(), name.encode())
        if not address:
            raise EngineError(f"the RPC backend does not export {name}")
        return prototype(address)  # type: ignore[operator]

    def device(self, handle: int, endpoint: str | None = None) -> Device:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        return Device(
            name=self.dev_name(handle).decode(),  # type: ignore[union-attr]
            description=self.dev_description(handle).decode(),  # type: ignore[union-attr]
            type=_DEVICE_TYPES.get(self.dev_type(handle), "?"),  # type: ignore[arg-type]
            memory_free=free.value,
            memory_total=total.value,
            handle=handle,
            endpoint=endpoint,
        )


_lock = threading.Lock()
_ggml: _Ggml | None = None
# ggml's device registry is process-wide and has no unregister: what this process registered, by endpoint.
_registered: dict[str, list[int]] = {}
_abort_hook: object = None  # keeps the ctypes callback alive


def _lib() -> _Ggml:
    global _ggml
    with _lock:
        if _ggml is None:
            _ggml = _Ggml()
        return _ggml


def ggml_build() -> str:
    """ggml's version and commit, e.g. `0.25.3 (0c1e570)`."""
    g = _lib()
    return f"{g.version().decode()} ({g.commit().decode()})"  # type: ignore[union-attr]


def local_devices() -> list[Device]:
    """The devices of this node that a worker can serve (RPC devices already registered excluded)."""
    g = _lib()
    devices = [g.device(g.dev_get(i)) for i in range(g.dev_count())]  # type: ignore[arg-type]
    rpc = {h for handles in _registered.values() for h in handles}
    return [d for d in devices if d.handle not in rpc]


def default_worker_devices() -> list[Device]:
    """As llama.cpp's rpc-server: every GPU-like device, else the CPU."""
    devices = local_devices()
    accelerators = [d for d in devices if d.type not in ("CPU", "ACCEL")]
    return accelerators or [d for d in devices if d.type == "CPU"][:1]


def resolve_devices(names: Sequence[str]) -> list[Device]:
    """Local devices by ggml name (CPU, CUDA0, Vulkan1...); empty means the default choice."""
    if not names:
        return default_worker_devices()
    g = _lib()
    out = []
    for name in names:
        handle = g.dev_by_name(name.encode())
        if not handle:
            known = ", ".join(d.name for d in local_devices())
            raise EngineError(f"unknown device {name!r}; this node has: {known}")
        out.append(g.device(handle))  # type: ignore[arg-type]
    return out


def start_worker(endpoint: str, cache_dir: Path | None, threads: int, devices: Sequence[str] = ()) -> None:
    """Serve this node's devices to RPC clients at `endpoint` (IPv4 host:port). Blocks for good.

    Returns only if ggml could not start the server (it prints why on stderr); the caller treats
    that as a failure.
    """
    parse_endpoint(endpoint)
    chosen = resolve_devices(devices)
    if not chosen:
        raise EngineError("no device to serve")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    start = _lib().rpc_function("ggml_backend_rpc_start_server", _START_SERVER)
    handles = (ctypes.c_void_p * len(chosen))(*(d.handle for d in chosen))
    log.info(
        "RPC worker on %s, protocol %s, ggml %s, devices: %s",
        endpoint, _version_text(PROTO_VERSION), ggml_build(), ", ".join(f"{d.name} ({d.description})" for d in chosen),
    )
    start(
        endpoint.encode(),
        str(cache_dir).encode() if cache_dir is not None else None,
        max(1, threads),
        len(chosen),
        ctypes.cast(handles, ctypes.POINTER(ctypes.c_void_p)),
    )


def register_peers(endpoints: Sequence[str], *, timeout: float) -> list[Device]:
    """Register workers with ggml and return their devices, in endpoint order.

    Each worker is probed first (`probe`): ggml aborts the process on a worker it cannot reach.
    Idempotent per endpoint within a process: ggml's own add_server caches its registry entry, but
    registering that entry twice would list the worker's devices twice.
    """
    if len(set(endpoints)) != len(endpoints):
        raise EngineError("an RPC worker is listed twice")
    g = _lib()
    devices: list[Device] = []
    for endpoint in endpoints:
        with _lock:
            handles = _registered.get(endpoint)
        if handles is None:
            probe(endpoint, timeout)
            add_server = g.rpc_function("ggml_backend_rpc_add_server", _ADD_SERVER)
            reg = add_server(endpoint.encode())
            if not reg:
                raise PeerUnavailable(f"RPC worker {endpoint} offers no device")
            handles = [g.reg_dev_get(reg, i) for i in range(g.reg_dev_count(reg))]  # type: ignore[misc]
            with _lock:
                if endpoint not in _registered:
                    g.register(reg)
                    _registered[endpoint] = handles  # type: ignore[assignment]
                handles = _registered[endpoint]
        devices += [g.device(h, endpoint) for h in handles]
    return devices


def ping(device: Device) -> None:
    """One round trip to the device's worker over the head's existing connection (a memory query).

    A dead worker makes ggml abort the process; a hung one blocks this call: run it where that is
    the signal wanted (the split model's child process).
    """
    _lib().device(device.handle, device.endpoint)


def on_abort(callback: Callable[[str], None]) -> None:
    """Call `callback(message)` when ggml aborts the process (it still aborts afterwards).

    Also turns off ggml's gdb backtrace, which would delay the abort by seconds.
    """
    global _abort_hook
    os.environ["GGML_NO_BACKTRACE"] = "1"  # read by ggml at abort time

    def hook(message: bytes | None) -> None:
        callback((message or b"").decode("utf-8", "replace").strip())

    _abort_hook = _ABORT_CALLBACK(hook)
    _lib().set_abort_callback(_abort_hook)
