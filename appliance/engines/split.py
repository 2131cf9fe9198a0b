"""A GGUF model split over llama.cpp RPC workers, run in a child process of the server.

ggml aborts the whole process when an RPC worker dies mid-generation and blocks for good when one
stops answering (engines/rpc.py). So the model, its RPC connections and its scheduler live in a
child process (engines/split_child.py); `SplitChatEngine`, here, is the server-side stand-in with
the ChatEngine interface, and the two talk in typed messages (engines/split_messages.py). When
the child dies or stops answering, the requests it was serving fail with PeerUnavailable (503
`peer_unavailable`), /health turns `degraded`, the server's other models are untouched, and the
model reloads by itself once every worker answers the RPC hello again.

Liveness: the child pings each worker over its existing connection every second and sends a
heartbeat with the scheduler's statistics; no heartbeat for `stall_timeout_s` means a worker hangs
(host down, network cut), and the child is killed.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from appliance.engines import rpc
from appliance.engines import split_messages as messages
from appliance.engines.factory import BatchSpec
from appliance.engines.scheduler import Emit
from appliance.engines.split_child import child_main
from appliance.errors import ApplianceError, EngineError, PeerUnavailable
from appliance.observability.logs import server_formatter
from appliance.types import EngineStats, GenerationRequest, RpcStatus

log = logging.getLogger(__name__)
_RETRY_FIRST_S, _RETRY_MAX_S = 2.0, 30.0


@dataclass(frozen=True)
class SplitSpec:
    """Everything the child needs to load and serve the model (picklable)."""

    batch: BatchSpec
    """The model and its scheduler; `batch.gpu_layers` is how many layers go to the devices."""
    peers: tuple[str, ...]
    tensor_split: tuple[float, ...] | None
    use_local_gpus: bool
    connect_timeout_s: float
    stall_timeout_s: float
    load_timeout_s: float
    log_level: int = logging.INFO


@dataclass
class _Pending:
    emit: Emit
    cancel: threading.Event


@dataclass
class _Child:
    proc: Any
    conn: Connection
    pending: dict[int, _Pending] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    last_heartbeat: float = field(default_factory=time.monotonic)
    loaded: threading.Event = field(default_factory=threading.Event)
    load_error: ApplianceError | None = None
    ready: messages.Ready | None = None
    """What the child said once it had loaded the model."""
    fatal: str | None = None
    """ggml's abort message, sent by the child just before it dies."""
    reason: str | None = None
    """Why the server killed it (it stopped answering)."""

    def send(self, message: messages.ToChild) -> None:
        data = messages.encode(message)
        with self.send_lock:
            self.conn.send_bytes(data)


class SplitChatEngine:
    """ChatEngine whose model runs split over RPC workers in a child process."""

    def __init__(self, spec: SplitSpec, tokenizer: Any) -> None:
        self.model_id = spec.batch.model_id
        self.n_ctx = spec.batch.n_ctx_per_seq
        self.spec = spec
        self._tokenizer = tokenizer
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._child: _Child | None = None
        self._state = "loading"  # loading | ready | down | closed
        self._failure: str | None = None
        self._retry_at = 0.0
        self._retry_delay = _RETRY_FIRST_S
        self._loads = 0
        self._last_stats = EngineStats()
        """The child scheduler's, from its latest heartbeat (zeros until one arrives)."""
        self._devices: list[dict[str, Any]] = []
        try:
            self._start()  # a PeerUnavailable leaves the engine down and retrying; other errors propagate
        except BaseException:
            tokenizer.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name=f"split-{self.model_id}", daemon=True)
        self._watchdog.start()

    # -- ChatEngine ----------------------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the model cannot serve right now (a degraded /health shows it); None when it can."""
        return self._failure

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def submit(self, request: GenerationRequest, emit: Emit, cancel: threading.Event) -> None:
        with self._lock:
            child = self._child
            if self._state != "ready" or child is None:
                raise PeerUnavailable(self._unavailable_message())
            rid = next(self._ids)
            child.pending[rid] = _Pending(emit, cancel)
        try:
            child.send(messages.Submit(rid=rid, request=request))
        except (OSError, ValueError):
            child.pending.pop(rid, None)
            raise PeerUnavailable(self._unavailable_message()) from None

    def close(self) -> None:
        with self._lock:
            self._state = "closed"
            child, self._child = self._child, None
        if child is not None:
            try:
                child.send(messages.Close())
            except (OSError, ValueError):
                pass
            child.proc.join(timeout=10)
            self._reap(child)
            for pending in child.pending.values():
                pending.emit(EngineError("the server is shutting down"))
        self._tokenizer.close()

    def engine_stats(self) -> EngineStats:
        rpc = RpcStatus(
            state=self._state, peers=list(self.spec.peers), devices=self._devices, loads=self._loads,
            error=self._failure,
        )
        return msgspec.structs.replace(self._last_stats, rpc=rpc)

    # -- child lifecycle -----------------------------------------------------------------------

    def _unavailable_message(self) -> str:
        if self._state == "closed":
            return "the server is shutting down"
        reason = self._failure or "its RPC workers are not connected"
        return f"The model '{self.model_id}' is unavailable: {reason}"

    def _start(self) -> None:
        """Probe the workers, start the child and wait until it has loaded the model."""
        spec = self.spec
        try:
            for peer in spec.peers:
                rpc.probe(peer, spec.connect_timeout_s)
            child = self._spawn()
            if not child.loaded.wait(spec.load_timeout_s):
                self._reap(child)
                raise PeerUnavailable(f"loading over RPC took longer than {spec.load_timeout_s:g} s")
            ready = child.ready
            if child.load_error is not None or ready is None:  # loaded is set by Ready or by a failure
                self._reap(child)
                raise child.load_error or PeerUnavailable("the model process did not say it had loaded")
        except PeerUnavailable as exc:
            self._down(exc.message)
            return
        with self._lock:
            if self._state == "closed":
                self._reap(child)
                return
            self._child, self._state, self._failure = child, "ready", None
            self._retry_delay = _RETRY_FIRST_S
            self._loads += 1
            self._devices = [msgspec.structs.asdict(d) for d in ready.devices]
            self.n_ctx = ready.n_ctx
        log.info(
            "model %s: split over %s (%s)",
            self.model_id,
            ", ".join(spec.peers),
            ", ".join(f"{d['name']} {d['endpoint'] or 'local'}" for d in self._devices),
        )

    def _spawn(self) -> _Child:
        parent_end, child_end = self._mp.Pipe()
        proc = self._mp.Process(
            target=child_main,
            args=(child_end, self.spec, server_formatter()),
            name=f"appliance-split-{self.model_id}",
            daemon=True,
        )
        proc.start()
        child_end.close()  # so that the child's death reads as EOF here
        child = _Child(proc, parent_end)
        threading.Thread(target=self._read, args=(child,), name=f"split-read-{self.model_id}", daemon=True).start()
        return child

    def _down(self, reason: str) -> None:
        with self._lock:
            if self._state == "closed":
                return
            repeated = reason == self._failure
            self._state, self._failure = "down", reason
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)
        level = logging.DEBUG if repeated else logging.ERROR  # the first time, and whenever the reason changes
        log.log(level, "model %s: %s; retrying when every RPC worker answers", self.model_id, reason)

    def _read(self, child: _Child) -> None:
        """Messages from one child, until it exits. The only thread that closes the child's connection."""
        try:
            self._dispatch(child)
        finally:
            self._lost(child)
            child.conn.close()

    def _dispatch(self, child: _Child) -> None:
        while True:
            try:
                data = child.conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                message = messages.decode_to_server(data)
            except messages.MalformedMessage as exc:
                log.error("model %s: %s", self.model_id, exc)
                continue
            match message:
                case messages.Item(rid=rid, chunk=chunk):
                    pending = child.pending.get(rid)
                    if pending is not None:
                        if chunk.finish_reason is not None:
                            child.pending.pop(rid, None)
                        pending.emit(chunk)
                case messages.Failed(rid=rid, error=error):
                    pending = child.pending.pop(rid, None)
                    if pending is not None:
                        pending.emit(error.exception())
                case messages.Heartbeat(stats=stats):
                    child.last_heartbeat = time.monotonic()
                    self._last_stats = stats
                case messages.Ready():
                    child.ready = message
                    child.last_heartbeat = time.monotonic()
                    child.loaded.set()
                case messages.LoadFailed(error=error):
                    child.load_error = error.exception()
                    child.loaded.set()
                case messages.Fatal(message=fatal):
                    child.fatal = fatal

    def _lost(self, child: _Child) -> None:
        """The child died or hangs: fail its requests and say which workers are gone."""
        with self._lock:
            current = child is self._child
            if current:
                self._child = None
        self._reap(child)
        if not child.loaded.is_set():
            child.load_error = PeerUnavailable(self._describe_loss(child, "the model process died while loading"))
            child.loaded.set()
            return
        if not current:
            return
        message = self._describe_loss(child)
        self._down(message)
        error = PeerUnavailable(f"The model '{self.model_id}' is unavailable: {message}")
        for pending in list(child.pending.values()):
            pending.emit(error)
        child.pending.clear()

    def _describe_loss(self, child: _Child, default: str = "the model process exited") -> str:
        gone = []
        for peer in self.spec.peers:
            try:
                rpc.probe(peer, min(2.0, self.spec.connect_timeout_s))
            except PeerUnavailable as exc:
                gone.append(exc.message)
        what = child.reason or (f"ggml: {child.fatal.rsplit(': ', 1)[-1]}" if child.fatal else default)
        if gone:
            return f"{'; '.join(gone)} ({what})"
        return f"its model process failed ({what}), although every RPC worker answers"

    def _reap(self, child: _Child) -> None:
        """Make sure the child is gone (its reader thread then sees EOF and closes the connection)."""
        if child.proc.is_alive():
            child.proc.kill()
        child.proc.join(timeout=5)

    def _watch(self) -> None:
        """Forward cancellations, detect a hung child, reload after a failure."""
        while self._state != "closed":
            time.sleep(0.1)
            child = self._child
            if child is not None:
                for rid, pending in list(child.pending.items()):
                    if pending.cancel.is_set():
                        child.pending.pop(rid, None)
                        try:
                            child.send(messages.Cancel(rid=rid))
                        except (OSError, ValueError):
                            pass
                silent = time.monotonic() - child.last_heartbeat
                if silent > self.spec.stall_timeout_s and child.reason is None:
                    child.reason = f"no answer from the workers for {silent:.0f} s"
                    child.proc.kill()  # _read sees EOF and fails its requests
            elif self._state == "down" and time.monotonic() >= self._retry_at:
                try:
                    self._start()
                except ApplianceError as exc:
                    self._down(exc.message)
                except Exception as exc:
                    log.exception("model %s: reload failed", self.model_id)
                    self._down(f"reload failed ({type(exc).__name__})")
