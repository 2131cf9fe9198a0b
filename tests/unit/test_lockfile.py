"""The lock files pin every dependency with hashes, and scripts/setup installs from them hash-checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes), from a pip requirements file written with --generate-hashes."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"{path.name}: not an exact pin: {line[:80]}"
        pins[canonicalize_name(m.group(1))] = (m.group(2), re.findall(r"--hash=(sha256:[0-9a-f]{64})", line))
    return pins


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("requirements.lock", ("cpu", "dev")), ("requirements-gpu.lock", ("gpu", "dev"))],
)
def test_every_top_level_dependency_is_pinned_with_a_hash(lock: str, extras: tuple[str, ...]) -> None:
    pins = read_lock(ROOT / lock)
    for req in project_requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {lock}: regenerate it (see its first lines)"
        version, hashes = pins[name]
        assert hashes, f"{req.name}=={version} has no --hash in {lock}"
        assert req.specifier.contains(version, prereleases=True), f"{lock} pins {req.name}=={version}, pyproject wants {req}"


def test_every_pin_in_every_lock_has_a_hash() -> None:
    locks = [*ROOT.glob("requirements*.lock"), ROOT / "models" / "requirements.lock"]
    assert len(locks) >= 4
    for lock in locks:
        pins = read_lock(lock)
        assert pins, f"{lock} pins nothing"
        assert all(hashes for _version, hashes in pins.values()), f"{lock}: a pin without --hash"


def test_cpu_and_gpu_locks_agree_except_for_onnxruntime() -> None:
    cpu, gpu = read_lock(ROOT / "requirements.lock"), read_lock(ROOT / "requirements-gpu.lock")
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    shared = set(cpu) & set(gpu)
    assert {n: cpu[n][0] for n in shared} == {n: gpu[n][0] for n in shared}


def test_model_packages_and_build_backends_are_locked() -> None:
    models = read_lock(ROOT / "models" / "requirements.lock")
    for line in (ROOT / "models" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert req.specifier.contains(models[canonicalize_name(req.name)][0])
    build = read_lock(ROOT / "requirements-build.lock")
    assert {"pip", "setuptools", "scikit-build-core", "cmake", "ninja"} <= set(build)


def test_setup_installs_from_the_locks_with_hashes() -> None:
    setup = (ROOT / "scripts" / "setup").read_text(encoding="utf-8")
    install_lines = [ln for ln in setup.splitlines() if re.search(r"\bpipq\b|pip install", ln) and "()" not in ln]
    assert install_lines
    assert "--require-hashes" in setup
    for lock in ("requirements.lock", "requirements-gpu.lock", "requirements-build.lock", "models/requirements.lock"):
        assert lock in setup
    # Every install but the project's own editable one is hash-checked.
    for ln in install_lines:
        if "-e ." not in ln:
            assert "--require-hashes" in ln, ln
    assert "-DGGML_RPC=on" in setup
    assert re.search(r"want=\$\(cat [^)]*requirements\.lock", setup.replace("\\\n", " ")), "stamp must hash the locks"
