"""Command line for peering: `appliance peer serve | devices | probe` (RPC workers that lend their devices)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli_common import fail, setup_logging
from appliance.errors import ApplianceError


@click.group()
def peer() -> None:
    """Split a model over several nodes: RPC workers lend their devices to a head node (README: Peering)."""


@peer.command("serve")
@click.option("--bind", default="127.0.0.1:50052", show_default=True, help="IPv4 ADDRESS:PORT to listen on.")
@click.option("--devices", default="", help="Comma-separated devices to lend (see `peer devices`); default: GPUs, else CPU.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="CPU threads (default: half the logical CPUs).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep received tensors here for faster reloads.")
@click.option("--i-understand-rpc-is-unauthenticated", "allow_public", is_flag=True, help="Allow a non-loopback --bind.")
def peer_serve(bind: str, devices: str, threads: int, cache_dir: Path | None, allow_public: bool) -> None:
    """Run an RPC worker (blocks). llama.cpp's RPC server has no authentication: it binds to loopback
    unless --i-understand-rpc-is-unauthenticated; reach it from a head node through an SSH tunnel."""
    from appliance.peering import worker

    setup_logging("info")
    names = [d.strip() for d in devices.replace("/", ",").split(",") if d.strip()]
    try:
        worker.serve(bind, devices=names, threads=threads, cache_dir=cache_dir, allow_public=allow_public)
    except ApplianceError as exc:
        fail(exc)


@peer.command("devices")
def peer_devices() -> None:
    """List the devices this node can lend."""
    from appliance.engines import rpc

    for d in rpc.local_devices():
        click.echo(f"{d.name:<10} {d.type:<5} {d.memory_free >> 20:>8} MiB free  {d.description}")


@peer.command("probe")
@click.argument("endpoints", nargs=-1, required=True)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds for connect and hello.")
def peer_probe(endpoints: tuple[str, ...], timeout: float) -> None:
    """Check that RPC workers answer and run this node's llama.cpp RPC protocol."""
    from appliance.engines import rpc

    failed = False
    for endpoint in endpoints:
        try:
            version = rpc.probe(endpoint, timeout)
            click.echo(f"{endpoint}: ok, RPC protocol {'.'.join(map(str, version))}")
        except (ApplianceError, ValueError) as exc:
            failed = True
            click.echo(f"{endpoint}: {getattr(exc, 'message', exc)}", err=True)
    sys.exit(1 if failed else 0)


def register(main: click.Group) -> None:
    main.add_command(peer)
