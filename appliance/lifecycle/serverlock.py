"""Which process owns a data directory's collections: a running server, or a command line tool.

The server holds an exclusive flock on DATA_DIR/server.lock for its whole life and writes its pid
and URL into it. Commands that write collections (`ingest`, `collections create|delete`) take a
shared lock on the same file: they are refused while a server runs (its in-memory vector index
would never see what they wrote), and a server does not start while one of them is writing. The
kernel drops an flock when its process dies, so a crash (kill -9) never leaves the directory locked;
the file's contents only say who held it last.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from appliance.errors import DataDirError

LOCK_NAME = "server.lock"


class ServerInfo(msgspec.Struct, frozen=True):
    pid: int
    url: str
    version: str
    started: float


class DataDirBusy(DataDirError):
    """Another process is using the data directory in a way that excludes this one."""

    code = "data_dir_busy"

    def __init__(self, message: str, holder: ServerInfo | None) -> None:
        super().__init__(message)
        self.holder = holder


def _read(fd: int) -> ServerInfo | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return msgspec.json.decode(raw, type=ServerInfo) if raw.strip() else None
    except msgspec.DecodeError:
        return None


class ServerLock:
    """Held by `appliance serve` from before its models load until the process exits."""

    def __init__(self, fd: int, info: ServerInfo) -> None:
        self._fd = fd
        self.info = info

    @classmethod
    def acquire(cls, data_dir: Path, url: str, version: str) -> ServerLock:
        """Raises DataDirBusy when another server or a writing command holds the directory."""
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            if holder is not None and _alive(holder.pid):
                raise DataDirBusy(
                    f"{data_dir} is in use by another appliance server (pid {holder.pid}, {holder.url}); "
                    "stop it first, or give this one its own --data-dir",
                    holder,
                ) from None
            raise DataDirBusy(
                f"{data_dir} is being written by an appliance command (ingest or collections); "
                "start the server when it has finished",
                None,
            ) from None
        info = ServerInfo(pid=os.getpid(), url=url, version=version, started=time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, msgspec.json.encode(info) + b"\n", 0)
        return cls(fd, info)

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1


def running_server(data_dir: Path) -> ServerInfo | None:
    """The server holding `data_dir` now, or None."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or ServerInfo(pid=0, url="", version="", started=0.0)
        return None
    finally:
        os.close(fd)


@contextmanager
def writing_collections(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's collections for a command line write; refused while a server runs."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            where = f" (pid {holder.pid}, {holder.url})" if holder is not None else ""
            url = holder.url if holder is not None and holder.url else "http://HOST:PORT"
            raise DataDirBusy(
                f"an appliance server is running on {data_dir}{where}: what this command writes would not "
                f"reach its indexes. Send the files to the server instead: `appliance ingest COLLECTION FILES... "
                f"--url {url}` (with --api-key or APPLIANCE_API_KEY when keys exist), or use the HTTP API "
                "(POST /v1/collections/NAME/documents)",
                holder,
            ) from None
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
