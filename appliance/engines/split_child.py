"""The child process of a split model (engines/split.py): loads the model over the RPC workers, runs
its scheduler, and answers the server's messages (engines/split_messages.py) until told to close.

ggml aborts this process when a worker dies mid-generation and blocks in it when one stops answering;
the server side notices either (EOF on the pipe, or no heartbeat) and fails the requests it sent here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from appliance.engines import rpc
from appliance.engines import split_messages as messages
from appliance.engines.factory import build_batch_engine
from appliance.engines.scheduler import BatchScheduler, Emit
from appliance.errors import ApplianceError, EngineError
from appliance.observability.logs import setup_child_logging
from appliance.types import Chunk

if TYPE_CHECKING:
    from appliance.engines.split import SplitSpec

log = logging.getLogger(__name__)
Send = Callable[[messages.ToServer], None]
_HEARTBEAT_S = 1.0


def child_main(conn: Connection, spec: SplitSpec, formatter: logging.Formatter | None = None) -> None:
    """Load the model over the workers and serve submit/cancel messages until told to close.

    The child writes to the server's stderr: with the server's formatter its lines (llama.cpp's too,
    engines/llama.py) are the server's JSON lines, redacted alike.
    """
    setup_child_logging(spec.log_level, formatter)
    send_lock = threading.Lock()

    def send(message: messages.ToServer) -> None:
        data = messages.encode(message)
        with send_lock:
            try:
                conn.send_bytes(data)
            except (OSError, ValueError):  # the server is gone; the main loop sees EOF and exits
                pass

    rpc.on_abort(lambda message: send(messages.Fatal(message=message)))
    model_id = spec.batch.model_id
    try:
        scheduler, peers, devices = _load(spec)
    except ApplianceError as exc:
        send(messages.LoadFailed(error=messages.WireError.of(exc)))
        return
    except Exception as exc:  # anything else is a bug or a broken model file: say so, don't hang the parent
        log.exception("loading %s over RPC failed", model_id)
        error = EngineError(f"model {model_id} failed to load: {type(exc).__name__}")
        send(messages.LoadFailed(error=messages.WireError.of(error)))
        return
    send(messages.Ready(
        n_ctx=scheduler.n_ctx,
        devices=[
            messages.Device(name=d.name, endpoint=d.endpoint, memory_free=d.memory_free, memory_total=d.memory_total)
            for d in devices
        ],
    ))
    running = threading.Event()
    running.set()

    def heartbeat() -> None:
        while running.is_set():
            for device in peers:
                rpc.ping(device)  # aborts the process if the worker died; blocks if it hangs
            send(messages.Heartbeat(stats=scheduler.stats.snapshot()))
            time.sleep(_HEARTBEAT_S)

    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    _serve(conn, scheduler, send)
    running.clear()
    scheduler.close()


def _serve(conn: Connection, scheduler: BatchScheduler, send: Send) -> None:
    """The server's messages, until Close or until the server is gone."""
    cancels: dict[int, threading.Event] = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the server is gone
            return
        try:
            message = messages.decode_to_child(data)
        except messages.MalformedMessage as exc:
            log.error("%s", exc)
            continue
        match message:
            case messages.Submit(rid=rid, request=request):
                cancel = cancels[rid] = threading.Event()
                emit = _child_emit(send, rid, cancels)
                try:
                    scheduler.submit(request, emit, cancel)
                except ApplianceError as exc:
                    emit(exc)
            case messages.Cancel(rid=rid):
                cancel = cancels.pop(rid, None)
                if cancel is not None:
                    cancel.set()
            case messages.Close():
                return


def _child_emit(send: Send, rid: int, cancels: dict[int, threading.Event]) -> Emit:
    def emit(item: Chunk | ApplianceError) -> None:
        if isinstance(item, ApplianceError):
            cancels.pop(rid, None)
            send(messages.Failed(rid=rid, error=messages.WireError.of(item)))
            return
        if item.finish_reason is not None:
            cancels.pop(rid, None)
        send(messages.Item(rid=rid, chunk=item))

    return emit


def _load(spec: SplitSpec) -> tuple[BatchScheduler, list[rpc.Device], list[rpc.Device]]:
    """The scheduler over the model offloaded to the workers' devices (and local GPUs, if asked),
    the workers' devices, and all the devices."""
    peers = rpc.register_peers(spec.peers, timeout=spec.connect_timeout_s)
    local = [d for d in rpc.local_devices() if d.type in ("GPU", "IGPU")] if spec.use_local_gpus else []
    devices = peers + local
    if spec.tensor_split is not None and len(spec.tensor_split) != len(devices):
        raise EngineError(
            f"tensor_split of {spec.batch.model_id} has {len(spec.tensor_split)} shares for {len(devices)} devices "
            f"({', '.join(d.name + ' ' + (d.endpoint or 'local') for d in devices)})"
        )
    scheduler = build_batch_engine(spec.batch, devices=[d.handle for d in devices], tensor_split=spec.tensor_split)
    return scheduler, peers, devices
