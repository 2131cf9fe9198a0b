"""The release archive, built once per test run by packaging/release.sh (or given by APPLIANCE_RELEASE_ARCHIVE)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the installer tests run as root (they create the service user and a network namespace)")
    for tool in ("unshare", "runuser", "useradd", "ip", "sha256sum"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@pytest.fixture(scope="session")
def release_archive() -> Path:
    _needs_root()
    given = os.environ.get("APPLIANCE_RELEASE_ARCHIVE")
    if given:
        return Path(given)
    started = time.monotonic()
    subprocess.run([str(REPO / "packaging" / "release.sh")], cwd=REPO, check=True)
    print(f"release built in {time.monotonic() - started:.0f} s")
    archives = sorted((REPO / "dist").glob("appliance-*-linux-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    return archives[-1]


@pytest.fixture(scope="session")
def release_root() -> Iterator[Path]:
    """A folder every user can traverse: the service user must reach the prefix the tests install into.

    Not under pytest's temp root: pytest keeps that 0700 (and resets it when another run starts).
    """
    root = Path(tempfile.mkdtemp(prefix="appliance-release-"))
    root.chmod(0o755)
    yield root
    for mount in (p for p in root.rglob("*") if p.is_mount()):
        subprocess.run(["umount", str(mount)], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def bundle(release_archive: Path, release_root: Path) -> Path:
    """The extracted release folder (read it; copy it with clone_bundle before changing anything)."""
    with tarfile.open(release_archive) as tar:
        tar.extractall(release_root / "extracted", filter="tar")
    (folder,) = (release_root / "extracted").iterdir()
    return folder


def clone_bundle(bundle: Path, dest: Path) -> Path:
    """A cheap copy (hard links) of the release folder; replace a file before changing it."""
    subprocess.run(["cp", "-al", str(bundle), str(dest)], check=True)
    return dest


def rewrite(path: Path, data: bytes) -> None:
    """Change a file of a hard-linked clone without touching the original."""
    path.unlink()
    path.write_bytes(data)


def run(*cmd: str | Path, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check, timeout=timeout)
