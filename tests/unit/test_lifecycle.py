"""The data directory's format and migrations, and backup/restore, on real SQLite, tantivy and usearch files."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from appliance import __version__
from appliance.errors import BackupError, DataDirError
from appliance.lifecycle.backup import MANIFEST, backup, restore
from appliance.lifecycle.datadir import DATA_FORMAT, FORMAT_FILE, open_data_dir, read_format, schema_versions
from appliance.policy.db import open_gateway_db
from appliance.policy.metering import UsageMeter, UsageRecord
from appliance.retrieval.collection import MIGRATIONS
from tests.unit.test_collection import doc, embed, ids, open_col


def _usage(conn: sqlite3.Connection, n: int) -> None:
    meter = UsageMeter(conn)
    for i in range(n):
        meter.record(
            UsageRecord(request_id=f"r{i}", ts=time.time(), tenant="default", key_id=None, model="m",
                        route="/v1/completions", status=200, outcome="ok", prompt_tokens=3, completion_tokens=4)
        )


def make_data_dir(root: Path, docs: int = 3) -> Path:
    data = root / "data"
    open_data_dir(data)
    conn = open_gateway_db(data)
    _usage(conn, 5)
    conn.close()
    col = open_col(data / "collections" / "default" / "manuals")
    col.ingest([doc(f"d{i}", f"pump {i} needs oil grade {i} and a valve") for i in range(docs)], embed)
    col.close()
    return data


def make_format_1(root: Path) -> Path:
    """A data directory as release 0.1 left it: no format file, collection registries at schema 1."""
    data = make_data_dir(root)
    (data / FORMAT_FILE).unlink()
    registry = data / "collections" / "default" / "manuals" / "registry.sqlite"
    conn = sqlite3.connect(registry)
    conn.execute("DROP INDEX documents_by_state")
    conn.execute("PRAGMA user_version=1")
    conn.close()
    return data


def test_new_directory_gets_the_current_format(tmp_path: Path) -> None:
    record = open_data_dir(tmp_path / "new")
    assert record.format == DATA_FORMAT and record.written_by == __version__
    assert json.loads((tmp_path / "new" / FORMAT_FILE).read_text())["format"] == DATA_FORMAT
    assert oct((tmp_path / "new").stat().st_mode & 0o777) == "0o750"


def test_older_format_is_migrated_at_open(tmp_path: Path) -> None:
    data = make_format_1(tmp_path)
    assert read_format(data).format == 1  # type: ignore[union-attr]
    assert schema_versions(data)["collections/default/manuals/registry.sqlite"] == 1
    record = open_data_dir(data)
    assert record.format == DATA_FORMAT and record.history and record.history[0].startswith("1 -> 2")
    assert schema_versions(data)["collections/default/manuals/registry.sqlite"] == len(MIGRATIONS)
    conn = sqlite3.connect(data / "collections" / "default" / "manuals" / "registry.sqlite")
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'documents_by_state'").fetchone()
    conn.close()
    col = open_col(data / "collections" / "default" / "manuals")
    assert ids(col, "pump") and ids(col, "pump", "vector")
    col.close()


def test_newer_format_is_refused_naming_the_release(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    (data / FORMAT_FILE).write_text(json.dumps({"format": DATA_FORMAT + 1, "written_by": "9.1.0"}))
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(DataDirError) as exc:
        open_data_dir(data)
    assert "written by appliance 9.1.0" in exc.value.message and "9.1.0 or newer" in exc.value.message
    assert sorted(p.name for p in data.iterdir()) == before


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    data = make_data_dir(tmp_path)
    os.chown(data, 65534, 65534)
    with pytest.raises(DataDirError) as exc:
        open_data_dir(data)
    assert exc.value.code == "data_dir_owner" and "sudo -u" in exc.value.message
    os.chown(data, 0, 0)
    data.chmod(0o777)
    with pytest.raises(DataDirError, match="writable by every user"):
        open_data_dir(data)


def test_backup_and_restore_round_trip(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    manifest = backup(data, tmp_path / "b.tar.gz")
    assert manifest.usage_records == 5 and manifest.collections[0].documents == 3
    assert not list(data.glob(".backup-*")), "the staging folder is removed"
    report = restore(tmp_path / "b.tar.gz", tmp_path / "restored")
    assert report.usage_records == 5 and report.collections[0].chunks == manifest.collections[0].chunks
    restored = tmp_path / "restored"
    conn = sqlite3.connect(restored / "gateway.db")
    conn.row_factory = sqlite3.Row
    assert UsageMeter(conn).verify(expect_head=manifest.usage_head).ok
    conn.close()
    col = open_col(restored / "collections" / "default" / "manuals")
    assert sorted(ids(col, "pump")) == ["d0", "d1", "d2"] and len(ids(col, "pump", "vector")) == 3
    col.close()
    assert "restored by" in read_format(restored).history[-1]  # type: ignore[union-attr]


def test_restore_refuses_a_non_empty_directory_and_damaged_archives(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    backup(data, tmp_path / "b.tar")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "b.tar", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    raw = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BackupError, match="truncated or corrupt|lacks files"):
        restore(tmp_path / "cut.tar", tmp_path / "r1")
    assert not (tmp_path / "r1").exists() and not list(tmp_path.glob(".r1.restoring-*"))
    # A file changed inside the archive: caught by its checksum.
    with tarfile.open(tmp_path / "b.tar") as src, tarfile.open(tmp_path / "evil.tar", "w") as dst:
        for member in src.getmembers():
            data_bytes = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "gateway.db":
                data_bytes = data_bytes[:-1] + b"x"
            member.size = len(data_bytes)
            import io

            dst.addfile(member, io.BytesIO(data_bytes))
    with pytest.raises(BackupError, match="gateway.db .*checksum"):
        restore(tmp_path / "evil.tar", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_backup_from_a_newer_release_is_refused_at_restore(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path)
    backup(data, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as src, tarfile.open(tmp_path / "new.tar", "w") as dst:
        import io

        for member in src.getmembers():
            blob = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == MANIFEST:
                meta = json.loads(blob)
                meta["data_format"], meta["appliance"] = DATA_FORMAT + 1, "9.0.0"
                blob = json.dumps(meta).encode()
                member.size = len(blob)
            dst.addfile(member, io.BytesIO(blob))
    with pytest.raises(DataDirError, match="9.0.0"):
        restore(tmp_path / "new.tar", tmp_path / "r")


def test_backup_waits_for_a_commit_point_while_ingesting(tmp_path: Path) -> None:
    """Ingest batches in one thread while backups run in another: every backup restores to a state whose
    three stores agree, holding at least the documents acknowledged before it started."""
    data = make_data_dir(tmp_path, docs=1)
    col = open_col(data / "collections" / "default" / "manuals")
    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 100
        while not stop.is_set() and i < 400:
            batch = [doc(f"d{j}", f"turbine {j} " + "steam pressure gauge " * 30) for j in range(i, i + 5)]
            col.ingest(batch, embed)
            acked.extend(d.id for d in batch)
            i += 5

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for n in range(3):
            time.sleep(0.3)
            before = list(acked)
            backup(data, tmp_path / f"b{n}.tar", include_models=False)
            report = restore(tmp_path / f"b{n}.tar", tmp_path / f"r{n}")
            restored = open_col(tmp_path / f"r{n}" / "collections" / "default" / "manuals")
            have = {d["id"] for d in restored.documents() if d["state"] == "ready"}
            restored.close()
            assert set(before) <= have, "a document acknowledged before the backup is missing"
            assert report.collections[0].documents == len(have)
    finally:
        stop.set()
        thread.join()
        col.close()


def test_backup_on_a_full_disk_fails_cleanly(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    data = make_data_dir(tmp_path, docs=40)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        with pytest.raises(BackupError, match="no space left"):
            backup(data, small / "b.tar")
        assert list(small.iterdir()) == [], "no partial archive is left behind"
        assert not list(data.glob(".backup-*"))
        # Restoring onto the full filesystem fails the same way and leaves nothing.
        backup(data, tmp_path / "ok.tar")
        with pytest.raises(BackupError, match="no space left"):
            restore(tmp_path / "ok.tar", small / "restored")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)])


def test_backup_without_models_then_models_put_back_from_a_release(tmp_path: Path) -> None:
    from appliance.modelstore.store import ModelStore
    from tests.tinygguf import write_tiny_gguf

    release_models = ModelStore(tmp_path / "release" / "models")
    release_models.import_model(write_tiny_gguf(tmp_path / "tiny.gguf"), model_id="tiny")
    data = make_data_dir(tmp_path)
    store = ModelStore(data / "models")
    assert store.install_copy(release_models.root / "tiny") is not None
    assert store.install_copy(release_models.root / "tiny") is None, "already there: nothing to do"
    manifest = backup(data, tmp_path / "slim.tar", include_models=False)
    assert [f.path for f in manifest.files if f.path.startswith("models/")] == ["models/tiny/manifest.toml"]
    owner = (65534, 65534) if os.geteuid() == 0 else None
    restore(tmp_path / "slim.tar", tmp_path / "restored", owner=owner)
    if owner:
        assert {(p.stat().st_uid, p.stat().st_gid) for p in (tmp_path / "restored").rglob("*")} == {owner}
        os.system(f"chown -R 0:0 {tmp_path / 'restored'}")
    restored = ModelStore(tmp_path / "restored" / "models")
    assert [r.ok for r in restored.verify()] == [False], "the manifest is there, its file is not"
    assert restored.install_copy(release_models.root / "tiny") is not None
    assert all(r.ok for r in restored.verify())
    assert not list(restored.root.glob(".removing-*")) and not list(restored.root.glob(".staging-*"))
