"""`appliance peer serve`: lend this node's CPU or GPU to a head node through llama.cpp's RPC server.

Security model. ggml's RPC server has neither authentication nor encryption: whoever can connect can
make the worker allocate memory and run graphs on it, and read what it computes (llama.cpp's own
README: never expose it to an open network). ggml cannot filter client addresses either. So:

- a worker binds to loopback unless `--i-understand-rpc-is-unauthenticated` is given;
- a head on another host reaches it through an SSH tunnel (`ssh -N -L`, see README "Peering"):
  the worker's `authorized_keys`, restricted to forwarding that one port, is the node allow-list,
  and SSH encrypts the traffic;
- where a worker must listen on a network address, a firewall rule limits it to the head's address.

ggml's RPC transport is IPv4 TCP only: there is no Unix-socket listener to offer.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import SettingsError

log = logging.getLogger(__name__)
DEFAULT_BIND = "127.0.0.1:50052"
UNAUTHENTICATED_FLAG = "--i-understand-rpc-is-unauthenticated"


def parse_bind(text: str, *, allow_public: bool) -> str:
    """The `host:port` ggml should listen on; refuses a non-loopback address without the flag."""
    text = text.strip()
    if text.startswith(("unix:", "/", "@")):
        raise SettingsError(
            f"cannot bind the RPC worker to {text}: llama.cpp's RPC server listens on IPv4 TCP only (no Unix "
            f"sockets); use a loopback address such as {DEFAULT_BIND}"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SettingsError(f"--bind {text!r} is not ADDRESS:PORT (for example {DEFAULT_BIND})")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise SettingsError(f"--bind needs an IPv4 address, not {host!r} (llama.cpp's RPC server resolves no names)") from None
    if address.version != 4:
        raise SettingsError(f"--bind needs an IPv4 address: llama.cpp's RPC server has no IPv6 listener ({host})")
    if not address.is_loopback and not allow_public:
        raise SettingsError(
            f"refusing to bind the RPC worker to {host}: llama.cpp's RPC server has no authentication and no "
            "encryption, so anyone who can reach that address can use this machine's memory and compute and read "
            "the model's activations. Bind to 127.0.0.1 and let the head node connect through an SSH tunnel "
            f"(README: Peering), or, on a network you control and firewall, pass {UNAUTHENTICATED_FLAG}."
        )
    return f"{host}:{port}"


def default_threads() -> int:
    """As llama.cpp's rpc-server: half the logical CPUs (about one per physical core)."""
    return max(1, (os.cpu_count() or 2) // 2)


def serve(
    bind: str,
    *,
    devices: Sequence[str] = (),
    threads: int = 0,
    cache_dir: Path | None = None,
    allow_public: bool = False,
) -> None:
    """Run the worker until the process is stopped. Raises if it cannot start."""
    endpoint = parse_bind(bind, allow_public=allow_public)
    if not ipaddress.ip_address(endpoint.rpartition(":")[0]).is_loopback:
        log.warning(
            "RPC worker listening on %s without authentication or encryption (%s): "
            "only hosts that the firewall lets through should reach it",
            endpoint, UNAUTHENTICATED_FLAG,
        )
    from appliance.engines import rpc

    rpc.start_worker(endpoint, cache_dir, threads or default_threads(), devices)
    # ggml's server loop only returns when it could not listen (it says why on stderr).
    raise SettingsError(f"the RPC worker could not listen on {endpoint} (address in use or not on this host?)")
