"""The release archive end to end: offline install, tampering, upgrade and rollback, bad machines and data dirs.

Runs as root: the installer creates the service user, and the offline test runs inside a network
namespace whose only interface is loopback (`unshare -n`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.release.conftest import clone_bundle, rewrite, run

# The first test builds the release (session fixture): the portable wheel alone takes ~14 min the first time.
pytestmark = [pytest.mark.release, pytest.mark.timeout(3600)]
DRIVER = Path(__file__).with_name("offline_driver.py")


def install(bundle: Path, base: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(bundle / "install.sh", "--prefix", base / "opt", "--data-dir", base / "data", "--etc-dir",
               base / "etc", "--no-systemd", *extra)


def version_of(link: Path) -> str:
    return dict(line.split("=", 1) for line in (link / "RELEASE").read_text().splitlines())["version"]


def as_service(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return run("runuser", "-u", "appliance", "--", *cmd)


def test_archive_contents(bundle: Path, release_archive: Path) -> None:
    names = {p.name for p in bundle.iterdir()}
    assert {"appliance", "_internal", "install.sh", "RELEASE", "SHA256SUMS", "INSTALL.md", "models", "systemd",
            "sbom.cdx.json", "THIRD-PARTY-NOTICES"} <= names
    assert {p.name for p in (bundle / "models").iterdir()} == {
        "gemma3-270m", "smollm2-135m", "all-minilm-l6-v2", "injection-guard", "injection-guard-indirect"}
    # The portable build: one CPU backend per instruction set down to plain x86-64, no required features.
    release = dict(line.split("=", 1) for line in (bundle / "RELEASE").read_text().splitlines())
    assert "x64" in release["cpu_variants"].split() and release["cpu_features"] == ""
    assert (bundle / "_internal" / "llama_cpp" / "lib" / "libggml-cpu-x64.so").is_file()
    assert (bundle / "systemd" / "appliance.service").is_file() and (bundle / "systemd" / "appliance.sysusers.conf").is_file()
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() or p.is_symlink()} - {"SHA256SUMS"}
    assert listed == on_disk
    sbom = json.loads((bundle / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    names_in_sbom = {c["name"].lower().replace("_", "-") for c in sbom["components"]}
    assert {"llama-cpp-python", "onnxruntime", "tantivy", "usearch", "litestar"} <= names_in_sbom
    libraries = [lib["name"] for c in sbom["components"] for lib in c.get("components", [])]
    assert any(name.startswith("libllama") for name in libraries) and any("onnxruntime" in n for n in libraries)
    notices = (bundle / "THIRD-PARTY-NOTICES" / "THIRD-PARTY-NOTICES.md").read_text()
    assert "Gemma" in notices and "Model injection-guard: bundled with the appliance" in notices
    # The archive's own checksum, written beside it, is what an operator checks after carrying it.
    expected = (release_archive.parent / f"{release_archive.name}.sha256").read_text().split()[0]
    assert hashlib.sha256(release_archive.read_bytes()).hexdigest() == expected
    # The installer and its checksums come first, so a cut-short archive still carries them.
    with tarfile.open(release_archive) as tar:
        first = [tar.next().name for _ in range(4)]  # type: ignore[union-attr]
    assert first[1].endswith("/install.sh") and first[3].endswith("/SHA256SUMS")


def test_offline_install_serves_everything(bundle: Path, release_root: Path) -> None:
    base = release_root / "offline"
    base.mkdir(mode=0o755)
    proc = run("unshare", "-n", sys.executable, DRIVER, bundle, base, "18931", timeout=900)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["interfaces"] == ["lo"], "the namespace must have no way out"
    assert seen["install_rc"] == 0, seen["install_out"]
    assert seen["command"].startswith("runuser -u appliance -- ")
    assert seen["health"]["status"] == "ok", seen.get("server_log_tail")
    assert "Paris" in seen["completion"] or seen["completion"].strip(), seen
    assert seen["embedding_dims"] == 384
    assert seen["ingest"]["results"][0]["status"] == "ingested", seen["ingest"]
    for mode in ("bm25", "vector"):
        assert "ISO VG 46" in seen[f"search_{mode}"]["data"][0]["text"], seen[f"search_{mode}"]
    assert seen["owner"] == "appliance"
    print(f"offline install {seen['install_s']} s, healthy after {seen['healthy_s']} s")
    # Idempotent: the same release again changes nothing and still succeeds.
    again = install(bundle, base, "--port", "18931")
    assert again.returncode == 0 and "already in" in again.stdout, again.stdout + again.stderr
    # Uninstall keeps data; --purge removes it.
    gone = run(base / "opt" / "current" / "install.sh", "--uninstall", "--prefix", base / "opt", "--data-dir",
               base / "data", "--etc-dir", base / "etc", "--no-systemd")
    assert gone.returncode == 0, gone.stderr
    assert not (base / "opt").exists() and (base / "data" / "gateway.db").exists()
    purged = run(bundle / "install.sh", "--uninstall", "--purge", "--prefix", base / "opt", "--data-dir",
                 base / "data", "--etc-dir", base / "etc", "--no-systemd")
    assert purged.returncode == 0, purged.stderr
    assert not (base / "data").exists() and not (base / "etc").exists()


def test_tampered_or_incomplete_release_is_refused(bundle: Path, release_root: Path) -> None:
    work = release_root / "tamper"
    work.mkdir()
    lib = next(p for p in bundle.rglob("libllama.so*") if p.is_file() and not p.is_symlink())
    rel_lib = lib.relative_to(bundle)
    cases = {}
    flipped = clone_bundle(bundle, work / "flipped")
    blob = bytearray(lib.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    rewrite(flipped / rel_lib, bytes(blob))
    cases["flipped"] = (flipped, str(rel_lib))
    missing = clone_bundle(bundle, work / "missing")
    (missing / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf").unlink()
    cases["missing"] = (missing, "gemma-3-270m-q4_k_m.gguf")
    extra = clone_bundle(bundle, work / "extra")
    (extra / "_internal" / "evil.so").write_bytes(b"\x7fELF")
    cases["extra"] = (extra, "evil.so")
    for name, (folder, named) in cases.items():
        proc = install(folder, work / f"target-{name}")
        assert proc.returncode != 0, name
        assert named in proc.stderr and "refusing to install" in proc.stderr, (name, proc.stderr)
        assert not (work / f"target-{name}").exists(), f"{name}: the installer touched the target"


def test_truncated_archive_is_refused(release_archive: Path, release_root: Path) -> None:
    work = release_root / "truncated"
    work.mkdir()
    cut = work / "cut.tar.gz"
    with release_archive.open("rb") as src:
        cut.write_bytes(src.read(release_archive.stat().st_size * 6 // 10))
    untar = run("tar", "-xzf", cut, "-C", work)
    assert untar.returncode != 0, "tar itself reports the truncation"
    (folder,) = [p for p in work.iterdir() if p.is_dir()]
    proc = install(folder, work / "target")
    assert proc.returncode != 0 and "refusing to install" in proc.stderr
    assert "FAILED open or read" in proc.stderr, proc.stderr
    assert not (work / "target").exists()


def _newer(bundle: Path, dest: Path, version: str) -> Path:
    """The same build labelled as a newer release (installer mechanics: versions, links, data kept)."""
    folder = clone_bundle(bundle, dest)
    lines = [f"version={version}" if line.startswith("version=") else line
             for line in (folder / "RELEASE").read_text().splitlines()]
    rewrite(folder / "RELEASE", ("\n".join(lines) + "\n").encode())
    digest = hashlib.sha256((folder / "RELEASE").read_bytes()).hexdigest()
    sums = [f"{digest}  RELEASE" if line.endswith("  RELEASE") else line
            for line in (folder / "SHA256SUMS").read_text().splitlines()]
    rewrite(folder / "SHA256SUMS", ("\n".join(sums) + "\n").encode())
    return folder


def test_upgrade_keeps_data_and_rolls_back(bundle: Path, release_root: Path) -> None:
    base = release_root / "upgrade"
    base.mkdir(mode=0o755)
    assert install(bundle, base).returncode == 0
    current = base / "opt" / "current"
    app = current / "appliance"
    doc = base / "valve.md"
    doc.write_text("# Valve\n\nThe V-7 valve is torqued to 35 Nm.\n")
    doc.chmod(0o644)
    data = ["--data-dir", str(base / "data")]
    assert as_service(app, "ingest", "manuals", doc, "--create", *data).returncode == 0
    made = as_service(app, "--data-dir", base / "data", "tenants", "create", "acme")
    assert made.returncode == 0, made.stderr
    old = version_of(current)

    newer = _newer(bundle, release_root / "newer", "99.0.0")
    up = install(newer, base)
    assert up.returncode == 0, up.stderr
    assert version_of(current) == "99.0.0" and version_of(base / "opt" / "previous") == old
    found = as_service(app, "search", "manuals", "valve torque", "--mode", "bm25", *data)
    assert "35 Nm" in found.stdout, found.stdout + found.stderr
    assert "acme" in as_service(app, "--data-dir", base / "data", "tenants", "list").stdout

    back = run(current / "install.sh", "--rollback", "--prefix", base / "opt", "--data-dir", base / "data",
               "--etc-dir", base / "etc", "--no-systemd")
    assert back.returncode == 0, back.stderr
    assert version_of(current) == old and version_of(base / "opt" / "previous") == "99.0.0"
    found = as_service(app, "search", "manuals", "valve torque", "--mode", "vector", *data)
    assert "35 Nm" in found.stdout, found.stdout + found.stderr
    # Only the current and the previous release are kept.
    third = _newer(bundle, release_root / "third", "99.1.0")
    assert install(third, base).returncode == 0
    assert sorted(p.name for p in (base / "opt" / "releases").iterdir()) == sorted({old, "99.1.0"})


def test_older_data_format_is_migrated_with_a_backup(bundle: Path, release_root: Path) -> None:
    from tests.unit.test_lifecycle import make_format_1

    base = release_root / "format1"
    base.mkdir(mode=0o755)
    make_format_1(base)  # base/data, as release 0.1 left it
    if run("id", "-u", "appliance").returncode != 0:
        run("useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "appliance",
            check=True)
    run("chown", "-R", "appliance:appliance", base / "data", check=True)
    proc = install(bundle, base)
    assert proc.returncode == 0, proc.stderr
    backups = list((base / "data.backups").glob("pre-upgrade-*.tar"))
    assert len(backups) == 1, proc.stdout
    status = json.loads(as_service(base / "opt" / "current" / "appliance", "data", "status", "--json",
                                   "--data-dir", base / "data").stdout)
    assert status["data_format"] == status["release_data_format"] and status["history"][0].startswith("1 -> ")
    # The backup holds the data as it was: format 1.
    with tarfile.open(backups[0]) as tar:
        manifest = json.loads(tar.extractfile("BACKUP.json").read())  # type: ignore[union-attr]
    assert manifest["data_format"] == 1


def test_newer_data_and_foreign_owner_are_refused(bundle: Path, release_root: Path) -> None:
    base = release_root / "refusals"
    base.mkdir(mode=0o755)
    assert install(bundle, base).returncode == 0
    fmt = base / "data" / "data-format.json"
    saved = fmt.read_text()
    fmt.write_text(json.dumps({"format": 99, "written_by": "42.0.0"}))
    proc = install(bundle, base)
    assert proc.returncode != 0 and "newer release" in proc.stderr, proc.stderr
    serve = as_service(base / "opt" / "current" / "appliance", "serve", "--data-dir", base / "data", "--port", "18939")
    assert serve.returncode == 78 and "42.0.0 or newer" in serve.stderr, serve.stderr
    fmt.write_text(saved)
    os.chown(base / "data", 65534, 65534)
    proc = install(bundle, base)
    assert proc.returncode != 0 and "belongs to nobody" in proc.stderr, proc.stderr
    os.chown(base / "data", *_ids("appliance"))


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def test_full_disk_is_refused_before_anything_changes(bundle: Path, release_root: Path) -> None:
    small = release_root / "small"
    small.mkdir(mode=0o755)
    if run("mount", "-t", "tmpfs", "-o", "size=100m,mode=0755", "tmpfs", small).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = install(bundle, small)
        assert proc.returncode != 0 and "MB free" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
        assert list(small.iterdir()) == []
    finally:
        run("umount", small)
    assert shutil.which("umount")


def test_rollback_past_a_data_migration_restores_the_pre_upgrade_backup(bundle: Path, release_root: Path) -> None:
    base = release_root / "rollback-data"
    base.mkdir(mode=0o755)
    assert install(bundle, base).returncode == 0
    app = base / "opt" / "current" / "appliance"
    data = ["--data-dir", str(base / "data")]
    for name, text in (("before.md", "The P-1 pump runs at 40 bar."), ("after.md", "The P-2 pump runs at 90 bar.")):
        (base / name).write_text(f"# {name}\n\n{text}\n")
        (base / name).chmod(0o644)
    assert as_service(app, "ingest", "manuals", base / "before.md", "--create", *data).returncode == 0
    assert install(_newer(bundle, release_root / "newer-rb", "99.0.0"), base).returncode == 0
    # What an upgrade that migrates the data leaves: the pre-upgrade backup, then data in a newer format.
    (base / "data.backups").mkdir(mode=0o700)
    run("chown", "appliance:appliance", base / "data.backups", check=True)
    snap = base / "data.backups" / "pre-upgrade-0.2.0-to-99.0.0.tar"
    assert as_service(app, "backup", snap, "--no-models", *data).returncode == 0
    assert as_service(app, "ingest", "manuals", base / "after.md", *data).returncode == 0
    (base / "data" / "data-format.json").write_text(json.dumps({"format": 99, "written_by": "99.0.0"}))
    args = ["--prefix", base / "opt", "--data-dir", base / "data", "--etc-dir", base / "etc", "--no-systemd"]

    refused = run(base / "opt" / "current" / "install.sh", "--rollback", *args)
    assert refused.returncode != 0 and "--restore-data" in refused.stderr, refused.stderr
    assert version_of(base / "opt" / "current") == "99.0.0"

    back = run(base / "opt" / "current" / "install.sh", "--rollback", "--restore-data", *args)
    assert back.returncode == 0, back.stdout + back.stderr
    assert version_of(base / "opt" / "current") == "0.2.0"
    found = as_service(app, "search", "manuals", "pump bar", "--mode", "bm25", *data).stdout
    assert "40 bar" in found and "90 bar" not in found, found
    (aside,) = release_root.joinpath("rollback-data").glob("data.rolled-back-*")
    assert json.loads((aside / "data-format.json").read_text())["format"] == 99, "the newer data is kept aside"
    assert as_service(app, *data, "models", "verify").returncode == 0, "models put back from the release"
