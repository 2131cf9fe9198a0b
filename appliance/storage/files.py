"""Durable file operations shared by the model store and the indexes."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


COMMIT_LOCK = "commit.lock"


@contextmanager
def commit_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s commit lock (an flock, so it also excludes other processes).

    Writers hold it while they move an index from one commit point to the next; a backup holds it
    while it links the files of one commit point, so it never sees half of a commit.
    """
    fd = os.open(directory / COMMIT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
