"""The data directory as a versioned whole: its format, its owner, and migrations between releases.

DATA_DIR holds models/, gateway.db and collections/<tenant>/<name>/ (registry.sqlite, lexical/,
vectors.usearch). `data-format.json` records which layout it is in and which release wrote it. Each
SQLite file also carries its own schema number (`PRAGMA user_version`, see storage.sqlite.migrate);
the data format is the release-level number an operator and the installer reason about:

  1  appliance 0.1: no format file; collection registries at schema 1.
  2  appliance 0.2: the format file; collection registries at schema 2.

A release opens formats up to its own, migrating older ones at start, and refuses a newer one with
the release it needs, so a rolled-back binary never half-reads data it does not understand.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import sqlite3
import stat
import time
from pathlib import Path

import msgspec

from appliance import __version__
from appliance.errors import DataDirError
from appliance.storage.files import fsync_dir
from appliance.storage.sqlite import connect, migrate

log = logging.getLogger(__name__)

DATA_FORMAT = 2
FORMAT_FILE = "data-format.json"
# The release that introduced each format, for the message that refuses a newer one.
_RELEASE_OF_FORMAT = {1: "0.1.0", 2: "0.2.0"}


class DataFormat(msgspec.Struct, kw_only=True):
    format: int
    written_by: str
    """Release that last wrote (or migrated) the directory."""
    updated: float = 0.0
    history: list[str] = []
    """One line per migration: "1 -> 2 by 0.2.0 at <ISO time>"."""


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_owner(data_dir: Path) -> None:
    """Refuse a data directory that belongs to another user than the one running.

    Files this process created would belong to the wrong user (root running `models import` in the
    service's directory is the usual case) and the service could no longer write them.
    """
    st = data_dir.stat()
    me = os.geteuid()
    if st.st_uid != me:
        owner = owner_name(st.st_uid)
        raise DataDirError(
            f"data directory {data_dir} belongs to {owner}, but this command runs as {owner_name(me)}: "
            f"run it as that user (sudo -u {owner} ...), or, if the directory should be yours, "
            f"chown -R {owner_name(me)} {data_dir}",
            code="data_dir_owner",
        )
    if st.st_mode & stat.S_IWOTH:
        raise DataDirError(
            f"data directory {data_dir} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}); "
            f"it holds API keys and usage records: chmod 0750 {data_dir}",
            code="data_dir_permissions",
        )


def read_format(data_dir: Path) -> DataFormat | None:
    """The recorded format; format 1 for a 0.1 directory that has data but no file; None when empty/new."""
    path = data_dir / FORMAT_FILE
    if path.is_file():
        try:
            return msgspec.json.decode(path.read_bytes(), type=DataFormat)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DataDirError(f"{path} is not a valid data format record: {exc}", code="data_format_invalid") from None
    # Only what format 1 and 2 lay out differently makes a directory "format 1"; a directory holding just
    # models/ (the same in both) is as good as new.
    if data_dir.is_dir() and any((data_dir / name).exists() for name in ("gateway.db", "collections")):
        return DataFormat(format=1, written_by=_RELEASE_OF_FORMAT[1])
    return None


def write_format(data_dir: Path, record: DataFormat) -> None:
    path = data_dir / FORMAT_FILE
    tmp = path.with_name(f".{FORMAT_FILE}.tmp")
    with tmp.open("wb") as f:
        f.write(json.dumps(msgspec.to_builtins(record), indent=2).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(data_dir)


def check_readable_format(record: DataFormat | None, data_dir: Path) -> None:
    if record is not None and record.format > DATA_FORMAT:
        needs = _RELEASE_OF_FORMAT.get(record.format, record.written_by)
        raise DataDirError(
            f"data directory {data_dir} is in data format {record.format}, written by appliance "
            f"{record.written_by}; this release ({__version__}) reads data formats up to {DATA_FORMAT}. "
            f"Run appliance {needs} or newer on it, or restore a backup taken before the upgrade "
            "(install.sh --rollback --restore-data).",
            code="data_format_too_new",
        )


def collection_registries(data_dir: Path) -> list[Path]:
    root = data_dir / "collections"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*/registry.sqlite") if p.is_file())


def _migrate_registries(data_dir: Path) -> int:
    # Imported here: the retrieval layer is only needed when there is something to migrate.
    from appliance.retrieval.collection import MIGRATIONS as REGISTRY_MIGRATIONS

    for registry in collection_registries(data_dir):
        conn = connect(registry)
        try:
            migrate(conn, REGISTRY_MIGRATIONS)
        finally:
            conn.close()
    return len(collection_registries(data_dir))


def _migrate_gateway(data_dir: Path) -> None:
    from appliance.policy.db import MIGRATIONS as GATEWAY_MIGRATIONS

    path = data_dir / "gateway.db"
    if not path.exists():
        return
    conn = connect(path)
    try:
        migrate(conn, GATEWAY_MIGRATIONS)
    finally:
        conn.close()


def open_data_dir(data_dir: Path, *, create: bool = True, check_ownership: bool = True) -> DataFormat:
    """Make `data_dir` ready for this release: create it, check it, migrate an older format.

    Raises DataDirError (never touching anything) for another user's directory or a newer format.
    """
    if not data_dir.exists():
        if not create:
            raise DataDirError(f"data directory {data_dir} does not exist", code="data_dir_missing")
        data_dir.mkdir(parents=True, mode=0o750)
    elif not data_dir.is_dir():
        raise DataDirError(f"data directory {data_dir} is not a directory", code="data_dir_missing")
    if check_ownership:
        check_owner(data_dir)
    record = read_format(data_dir)
    check_readable_format(record, data_dir)
    if record is not None and record.format == DATA_FORMAT:
        return record
    if record is None:
        record = DataFormat(format=DATA_FORMAT, written_by=__version__, updated=time.time())
        write_format(data_dir, record)
        return record
    started = time.monotonic()
    old = record.format
    _migrate_gateway(data_dir)
    registries = _migrate_registries(data_dir)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = DataFormat(
        format=DATA_FORMAT,
        written_by=__version__,
        updated=time.time(),
        history=[*record.history, f"{old} -> {DATA_FORMAT} by {__version__} at {stamp}"],
    )
    write_format(data_dir, record)
    log.warning(
        "data directory %s migrated from format %d to %d (%d collection registries) in %.2f s",
        data_dir, old, DATA_FORMAT, registries, time.monotonic() - started,
    )
    return record


def schema_versions(data_dir: Path) -> dict[str, int]:
    """user_version of every SQLite file in the directory (for status output and tests)."""
    out: dict[str, int] = {}
    for path in [data_dir / "gateway.db", *collection_registries(data_dir)]:
        if path.exists():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                out[str(path.relative_to(data_dir))] = conn.execute("PRAGMA user_version").fetchone()[0]
            finally:
                conn.close()
    return out
