"""Consistent backups of a running appliance's data directory, and verified restores.

A backup is a tar archive of a snapshot staged inside the data directory (so files can be
hard-linked, not copied, while locks are held):
  - gateway.db and every collection registry through SQLite's online backup API;
  - each collection's tantivy and usearch files as of one commit point: the collection's commit lock
    (an flock the server's writers hold from one commit point to the next) is held only while its
    files are linked, a few milliseconds, and the snapshot is checked (index counts equal the
    registry's live chunks) before it is kept, else taken again;
  - the models (manifests always, files unless --no-models) and the data-format record;
  - BACKUP.json: every file's size and sha256, the usage chain's head, each collection's counts.
Restore extracts into a hidden sibling of an empty target, verifies all of that, and only then
renames it into place: a failed restore leaves nothing behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec

from appliance import __version__
from appliance.errors import BackupError, DataDirError
from appliance.lifecycle.datadir import (
    FORMAT_FILE,
    DataFormat,
    check_readable_format,
    collection_registries,
    read_format,
    write_format,
)
from appliance.modelstore.store import hash_file
from appliance.storage.files import commit_lock, fsync_dir

log = logging.getLogger(__name__)
MANIFEST = "BACKUP.json"
_SNAPSHOT_TRIES = 5


class FileEntry(msgspec.Struct, frozen=True):
    path: str
    size: int
    sha256: str


class CollectionEntry(msgspec.Struct, frozen=True):
    tenant: str
    name: str
    documents: int
    chunks: int


class BackupManifest(msgspec.Struct, kw_only=True):
    appliance: str
    data_format: int
    created: float
    usage_records: int
    usage_head: str | None
    models_included: bool
    collections: list[CollectionEntry]
    files: list[FileEntry]


class RestoreReport(msgspec.Struct, kw_only=True):
    data_dir: str
    backup_created: float
    appliance: str
    files: int
    bytes: int
    usage_records: int
    usage_head: str | None
    collections: list[CollectionEntry]
    models: list[str]


def _space_error(what: str, exc: OSError) -> BackupError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackupError(f"no space left on the device while {what}; free some space or choose another place")
    return BackupError(f"{what} failed: {exc}")


def _sqlite_snapshot(src: Path, dst: Path) -> None:
    """A transactionally consistent copy of a live SQLite database (WAL readers never block writers)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def check_collection(directory: Path) -> CollectionEntry:
    """Open a collection's three stores read-only and check they agree on what is live."""
    from appliance.retrieval.lexical import LexicalIndex
    from appliance.retrieval.vector import VectorIndex

    registry = directory / "registry.sqlite"
    conn = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    try:
        problem = conn.execute("PRAGMA integrity_check").fetchone()[0]
        pending = conn.execute("SELECT COUNT(*) FROM documents WHERE state != 'ready'").fetchone()[0]
        docs = conn.execute("SELECT COUNT(*) FROM documents WHERE state = 'ready'").fetchone()[0]
        chunks = conn.execute(
            "SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE c.live = 1 AND d.state = 'ready'"
        ).fetchone()[0]
        ndim_row = conn.execute("SELECT value FROM meta WHERE key = 'ndim'").fetchone()
    finally:
        conn.close()
    if problem != "ok":
        raise BackupError(f"{registry}: integrity check failed: {problem}")
    # Chunks of documents a crash left pending are scrubbed from the indexes when the server opens the
    # collection; until then they may sit in the indexes, so only a clean collection must match exactly.
    lexical = LexicalIndex(directory / "lexical")
    try:
        lexical_docs = lexical.num_docs()
    finally:
        lexical.close()
    vector_file = directory / "vectors.usearch"
    vectors = len(VectorIndex(vector_file, int(ndim_row[0]) if ndim_row else 384)) if vector_file.exists() else 0
    if pending == 0 and (lexical_docs != chunks or vectors != chunks):
        raise BackupError(
            f"collection {directory.parent.name}/{directory.name}: the registry has {chunks} live chunks, "
            f"the BM25 index {lexical_docs}, the vector index {vectors}"
        )
    return CollectionEntry(directory.parent.name, directory.name, docs, chunks)


def _snapshot_collection(src: Path, dst: Path) -> CollectionEntry:
    """Stage one commit point of a collection; retried when a background merge moved under it."""
    last: BackupError | None = None
    for attempt in range(_SNAPSHOT_TRIES):
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "lexical").mkdir(parents=True)
        with commit_lock(src):
            _sqlite_snapshot(src / "registry.sqlite", dst / "registry.sqlite")
            for f in sorted((src / "lexical").iterdir()) if (src / "lexical").is_dir() else []:
                # tantivy's lock files belong to the live writer, not to the data.
                if f.is_file() and not f.name.endswith(".lock"):
                    _link_or_copy(f, dst / "lexical" / f.name)
            if (src / "vectors.usearch").exists():
                _link_or_copy(src / "vectors.usearch", dst / "vectors.usearch")
        try:
            return check_collection(dst)
        except (BackupError, ValueError, OSError) as exc:
            # A tantivy merge can publish a new meta.json and delete merged segments while files are
            # linked; the check catches a snapshot that lost a file, and the next attempt is clean.
            last = exc if isinstance(exc, BackupError) else BackupError(str(exc))
            log.info("backup: collection %s changed while being linked (attempt %d): %s", src, attempt + 1, exc)
            time.sleep(0.05 * (attempt + 1))
    raise BackupError(f"could not take a consistent snapshot of collection {src}: {last.message if last else ''}")


def _clean_stale_staging(data_dir: Path) -> None:
    for stale in data_dir.glob(".backup-*"):
        try:
            pid = int(stale.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def _stage(data_dir: Path, staging: Path, include_models: bool) -> BackupManifest:
    from appliance.policy.metering import UsageMeter

    record = read_format(data_dir)
    check_readable_format(record, data_dir)
    usage_records, usage_head = 0, None
    if (data_dir / "gateway.db").exists():
        _sqlite_snapshot(data_dir / "gateway.db", staging / "gateway.db")
        conn = sqlite3.connect(staging / "gateway.db")
        try:
            conn.row_factory = sqlite3.Row
            result = UsageMeter(conn).verify()
        finally:
            conn.close()
        if not result.ok:
            log.warning("backup: the usage chain does not verify (%s); it is backed up as it is", result.problem)
        usage_records, usage_head = result.records, result.head
    collections = []
    for registry in collection_registries(data_dir):
        src = registry.parent
        rel = src.relative_to(data_dir)
        collections.append(_snapshot_collection(src, staging / rel))
    models_root = data_dir / "models"
    if models_root.is_dir():
        for model_dir in sorted(models_root.iterdir()):
            if model_dir.name.startswith(".") or not (model_dir / "manifest.toml").is_file():
                continue  # staging or removal in progress: not a registered model
            target = staging / "models" / model_dir.name
            target.mkdir(parents=True)
            for f in sorted(model_dir.iterdir()):
                if f.is_file() and (include_models or f.name == "manifest.toml"):
                    _link_or_copy(f, target / f.name)
    if record is not None:
        write_format(staging, record)
    files = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        files.append(FileEntry(str(path.relative_to(staging)), path.stat().st_size, hash_file(path)[0]))
    return BackupManifest(
        appliance=__version__,
        data_format=record.format if record else 0,
        created=time.time(),
        usage_records=usage_records,
        usage_head=usage_head,
        models_included=include_models,
        collections=collections,
        files=files,
    )


def backup(data_dir: Path, out: Path, *, include_models: bool = True) -> BackupManifest:
    """Write a consistent snapshot of `data_dir` to `out` (.tar, or .tar.gz / .tgz compressed)."""
    if not (data_dir / FORMAT_FILE).exists() and read_format(data_dir) is None:
        raise DataDirError(f"{data_dir} holds no appliance data", code="data_dir_missing")
    out = out.absolute()
    if out.exists() and out.is_dir():
        raise BackupError(f"{out} is a directory; name the archive file to write")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} does not exist")
    _clean_stale_staging(data_dir)
    staging = data_dir / f".backup-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir(mode=0o700)
        try:
            manifest = _stage(data_dir, staging, include_models)
            (staging / MANIFEST).write_bytes(msgspec.json.encode(manifest))
        except OSError as exc:
            raise _space_error(f"staging the snapshot in {data_dir}", exc) from None
        mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"
        try:
            with partial.open("xb") as raw:
                with tarfile.open(fileobj=raw, mode=mode) as tar:  # type: ignore[call-overload]
                    tar.add(staging / MANIFEST, arcname=MANIFEST)
                    for entry in manifest.files:
                        tar.add(staging / entry.path, arcname=entry.path)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, out)
            fsync_dir(out.parent)
        except OSError as exc:
            raise _space_error(f"writing {out}", exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return manifest


def _check_target(target: Path) -> None:
    if target.exists():
        if not target.is_dir():
            raise BackupError(f"{target} exists and is not a directory")
        entries = [p.name for p in target.iterdir()]
        if entries:
            raise BackupError(
                f"{target} is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]}): restore only into an "
                "empty or new directory; move the current one aside first"
            )


def _verify(root: Path, manifest: BackupManifest) -> RestoreReport:
    from appliance.modelstore.store import ModelStore
    from appliance.policy.metering import UsageMeter

    listed = {f.path for f in manifest.files}
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    if present - listed:
        raise BackupError(f"the archive holds files its manifest does not list: {sorted(present - listed)[:3]}")
    if listed - present:
        raise BackupError(f"the archive lacks files its manifest lists: {sorted(listed - present)[:3]}")
    for entry in manifest.files:
        path = root / entry.path
        if path.stat().st_size != entry.size or hash_file(path)[0] != entry.sha256:
            raise BackupError(f"{entry.path} in the archive does not match its checksum: the archive is damaged")
    if (root / "gateway.db").exists():
        conn = sqlite3.connect(root / "gateway.db")
        try:
            conn.row_factory = sqlite3.Row
            problem = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if problem != "ok":
                raise BackupError(f"gateway.db: integrity check failed: {problem}")
            result = UsageMeter(conn).verify(expect_head=manifest.usage_head)
        finally:
            conn.close()
        if result.records != manifest.usage_records or (manifest.usage_head and not result.ok):
            raise BackupError(
                f"the usage chain does not verify after restore ({result.records} records, {result.problem})"
            )
    collections = []
    expected = {(c.tenant, c.name): c for c in manifest.collections}
    for registry in collection_registries(root):
        entry = check_collection(registry.parent)
        want = expected.get((entry.tenant, entry.name))
        if want is None or (want.documents, want.chunks) != (entry.documents, entry.chunks):
            raise BackupError(f"collection {entry.tenant}/{entry.name} does not match the backup's record")
        collections.append(entry)
    if manifest.models_included:
        bad = [r for r in ModelStore(root / "models").verify() if not r.ok]
        if bad:
            raise BackupError(f"model file {bad[0].model_id}/{bad[0].file}: {bad[0].problem}")
    models = [m.id for m in ModelStore(root / "models").manifests()]
    return RestoreReport(
        data_dir=str(root),
        backup_created=manifest.created,
        appliance=manifest.appliance,
        files=len(manifest.files),
        bytes=sum(f.size for f in manifest.files),
        usage_records=manifest.usage_records,
        usage_head=manifest.usage_head,
        collections=collections,
        models=models,
    )


def restore(
    archive: Path, target: Path, *, owner: tuple[int, int] | None = None, progress: Callable[[str], None] | None = None
) -> RestoreReport:
    """Restore `archive` into the empty or new directory `target`, verified before it appears there."""
    if not archive.is_file():
        raise BackupError(f"{archive} is not a file")
    target = target.absolute()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.restoring-{uuid.uuid4().hex[:8]}"
    try:
        work.mkdir(mode=0o750)
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                # The "data" filter refuses absolute paths, "..", links out of the tree and device files.
                tar.extractall(work, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _space_error(f"extracting {archive}", exc) from None
            raise BackupError(f"{archive} is not a readable backup archive (truncated or corrupt?): {exc}") from None
        try:
            manifest = msgspec.json.decode((work / MANIFEST).read_bytes(), type=BackupManifest)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BackupError(f"{archive} has no valid {MANIFEST}: {exc}") from None
        check_readable_format(DataFormat(format=manifest.data_format, written_by=manifest.appliance), archive)
        if progress:
            progress(f"extracted {len(manifest.files)} files; verifying")
        report = _verify(work, manifest)
        (work / MANIFEST).unlink()
        record = read_format(work) or DataFormat(format=1, written_by=manifest.appliance)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.created))
        record.history = [*record.history, f"restored by {__version__} from a backup taken at {stamp}"]
        if (work / FORMAT_FILE).exists() or manifest.data_format >= 2:
            write_format(work, record)
        if owner is not None:
            for path in [work, *work.rglob("*")]:
                os.chown(path, *owner, follow_symlinks=False)
        if target.exists():
            target.rmdir()
        os.rename(work, target)
        fsync_dir(target.parent)
        report.data_dir = str(target)
        return report
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
