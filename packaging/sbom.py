"""Write a CycloneDX SBOM (JSON, spec 1.6) of a PyInstaller onedir bundle.

    .venv/bin/python packaging/sbom.py --bundle dist/appliance --out dist/appliance.cdx.json

Run it with the interpreter of the environment the bundle was built from: the Python distributions are
read from that environment's metadata, and the system libraries from the build machine's dpkg database.

How "in the bundle" is decided (from the bundle itself, not from the spec):
- Python code: the module names in the executable's archive (PyInstaller's PKG and the PYZ inside it,
  read with PyInstaller's own archive reader) and in base_library.zip, plus every file under _internal/.
  A distribution is in the bundle when one of its modules is in those archives, or one of the files in
  its RECORD (extension modules, shared libraries, data files) lies at the same path under _internal/.
  Its .dist-info metadata alone (copy_metadata) does not count.
  The distributions' data (version, licence, purl) come from `cyclonedx-py environment` (cyclonedx-bom);
  this script keeps the components that pass the test above.
- Native code: every *.so* file in the bundle is a `file` component (with its SHA-256) nested under the
  component that shipped it: the Python distribution whose RECORD holds that path; CPython for the
  interpreter's own libpython and lib-dynload modules; or, for a library PyInstaller copied from the
  system, the Debian package that owns the byte-identical file found in the system's library folders
  (`dpkg-query -S`), with its version and the licences named in /usr/share/doc/<package>/copyright.
  A file nothing claims is listed at the top level with the property appliance:provenance=unknown.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import struct
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, License, LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import OutputFormat, SchemaVersion
from cyclonedx.spdx import is_expression, is_supported_id
from cyclonedx.validation import make_schemabased_validator
from packageurl import PackageURL
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SPEC_VERSION = SchemaVersion.V1_6
PROP = "appliance:"
_SO = re.compile(r"\.so(\.\d+)*$")
# PyInstaller's bootstrap modules live in its loader/ and hooks/rthooks/ folders, outside any package.
_PYI_MODULE = re.compile(r"^(pyimod\d+_\w+|pyiboot\d+_\w+|pyi_rth_\w+)$")
# Debian copyright short names -> SPDX ids (https://spdx.org/licenses/); the rest are kept as names.
DEBIAN_TO_SPDX = {
    "apache-2.0": "Apache-2.0", "artistic": "Artistic-1.0-Perl", "bsd-2-clause": "BSD-2-Clause",
    "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause", "expat": "MIT", "mit": "MIT",
    "gpl-2": "GPL-2.0-only", "gpl-2+": "GPL-2.0-or-later", "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later",
    "lgpl-2": "LGPL-2.0-only", "lgpl-2+": "LGPL-2.0-or-later", "lgpl-2.1": "LGPL-2.1-only",
    "lgpl-2.1+": "LGPL-2.1-or-later", "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later",
    "gpl": "GPL-1.0-or-later", "gpl-1": "GPL-1.0-only", "gpl-1+": "GPL-1.0-or-later", "isc": "ISC",
    "zlib": "Zlib", "mpl-2.0": "MPL-2.0", "x11": "X11", "curl": "curl", "openssl": "OpenSSL",
    "ssleay": "SSLeay", "bzip2-1.0.6": "bzip2-1.0.6", "gfdl-1.3+": "GFDL-1.3-or-later", "cc0-1.0": "CC0-1.0",
}
_GCC_RUNTIME = "GPL-3.0-or-later WITH GCC-exception-3.1"


# ---- what the bundle holds ---------------------------------------------------------------------------


@dataclass
class BundleContents:
    root: Path
    """The onedir folder (the one with the executable)."""
    content: Path
    """Where PyInstaller put the collected files: root/_internal, or root itself for old layouts."""
    files: dict[str, Path]
    """Every file under `content`, by its POSIX path relative to it."""
    modules: set[str]
    """Python module names in the executable's archives and base_library.zip."""
    executable: Path | None
    """The PyInstaller bootloader with its archive appended, when there is one."""


def read_bundle(bundle: Path) -> BundleContents:
    bundle = bundle.resolve()
    if bundle.name == "_internal":
        bundle = bundle.parent
    content = bundle / "_internal" if (bundle / "_internal").is_dir() else bundle
    files = {
        p.relative_to(content).as_posix(): p
        for p in sorted(content.rglob("*"))
        if p.is_file()  # links too (build.sh links the duplicate llama_cpp libraries)
    }
    modules: set[str] = set()
    executable = None
    for candidate in sorted(p for p in bundle.iterdir() if p.is_file() and os.access(p, os.X_OK)):
        names = _archive_module_names(candidate)
        if names is not None:
            executable = candidate
            modules |= names
            break
    base_library = content / "base_library.zip"
    if base_library.is_file():
        with zipfile.ZipFile(base_library) as zf:
            modules |= {_module_from_path(n) for n in zf.namelist() if n.endswith(".pyc")}
    return BundleContents(bundle, content, files, modules, executable)


def _archive_module_names(executable: Path) -> set[str] | None:
    """Module names in a PyInstaller executable (PKG entries and the PYZ inside); None if it is not one."""
    from PyInstaller.archive.readers import CArchiveReader, NotAnArchiveError
    from PyInstaller.loader.pyimod01_archive import ArchiveReadError

    try:
        pkg = CArchiveReader(str(executable))
    except (NotAnArchiveError, ArchiveReadError, OSError, ValueError, struct.error):
        return None
    names: set[str] = set()
    for name, entry in pkg.toc.items():
        typecode = entry[-1]
        if typecode == "z":  # the PYZ: pure-Python modules
            names |= set(pkg.open_embedded_archive(name).toc)
        elif typecode in ("m", "M", "s"):  # bootstrap modules and scripts
            names.add(name)
    return names


def _module_from_path(path: str) -> str:
    stem = re.sub(r"\.(py|pyc)$", "", path)
    mod = stem.replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def is_shared_library(relpath: str) -> bool:
    return bool(_SO.search(PurePosixPath(relpath).name))


# ---- who shipped what --------------------------------------------------------------------------------


@dataclass
class NativeFile:
    path: str
    """Path inside the bundle's content folder."""
    sha256: str
    source: str | None = None
    """Where the build copied it from, when it was found outside a Python distribution."""


@dataclass
class PythonDist:
    name: str
    version: str
    dist: importlib.metadata.Distribution
    modules: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    native: list[NativeFile] = field(default_factory=list)


@dataclass
class DebianPackage:
    name: str
    version: str
    arch: str
    source: str
    copyright: Path
    licences: list[str]
    native: list[NativeFile] = field(default_factory=list)


@dataclass
class PythonRuntime:
    version: str
    prefix: Path
    licence_file: Path | None
    modules: int = 0
    native: list[NativeFile] = field(default_factory=list)


@dataclass
class Inventory:
    bundle: BundleContents
    dists: dict[str, PythonDist]
    debs: dict[str, DebianPackage]
    python: PythonRuntime
    unattributed_native: list[NativeFile]
    unattributed_modules: list[str]


def take_inventory(bundle: BundleContents, root_package: str = "appliance") -> Inventory:
    installed = InstalledFiles()
    dists: dict[str, PythonDist] = {}

    def claim(dist: importlib.metadata.Distribution) -> PythonDist:
        key = canonicalize_name(dist.metadata["Name"])
        if key not in dists:
            dists[key] = PythonDist(dist.metadata["Name"], dist.version, dist)
        return dists[key]

    python = PythonRuntime(platform.python_version(), Path(sys.base_prefix), _python_licence_file())
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    unattributed_modules = []
    for mod in sorted(bundle.modules):
        top = mod.split(".")[0]
        if mod in installed.module_owner:
            claim(installed.module_owner[mod]).modules.add(mod)
        elif _PYI_MODULE.match(mod) and mod in installed.pyi_modules:
            claim(installed.pyi_modules[mod]).modules.add(mod)
        elif top == root_package or mod == "entry":
            continue  # the appliance itself: the SBOM's root component
        elif top in sys.stdlib_module_names or _in_stdlib(mod, stdlib_dir):
            python.modules += 1
        else:
            unattributed_modules.append(mod)
    if bundle.executable is not None and "pyiboot01_bootstrap" in bundle.modules:
        # The executable is PyInstaller's bootloader.
        bootloader = installed.by_name.get("pyinstaller")
        if bootloader is not None:
            claim(bootloader)

    debs: dict[str, DebianPackage] = {}
    unattributed_native = []
    syslibs = _system_library_index()
    for rel, path in bundle.files.items():
        owner = installed.file_owner.get(rel)
        if owner is not None and not _is_metadata(rel):
            claim(owner).files.add(rel)
        if not is_shared_library(rel):
            continue
        native = NativeFile(rel, _sha256(path))
        if owner is not None:
            claim(owner).native.append(native)
            continue
        # PyInstaller also copies a wheel's library next to the libraries that link to it (llama_cpp's
        # libggml*.so.0, numpy.libs' OpenBLAS at the top level): the same bytes as a file in some RECORD.
        moved = installed.same_file(PurePosixPath(rel).name, native.sha256)
        if moved is not None:
            native.source = moved[1]
            claim(moved[0]).native.append(native)
            continue
        source = _find_source(path, native.sha256, syslibs)
        native.source = str(source) if source else None
        deb = _debian_package(source, debs) if source else None
        if deb is not None:
            deb.native.append(native)
        elif source is not None and _is_under(source, python.prefix):
            python.native.append(native)
        else:
            unattributed_native.append(native)
    return Inventory(bundle, dists, debs, python, unattributed_native, unattributed_modules)


class InstalledFiles:
    """The installed distributions' RECORDs, indexed: file path, module name, PyInstaller bootstrap
    module and file name (with its RECORD hash) -> distribution."""

    def __init__(self) -> None:
        self.by_name: dict[str, importlib.metadata.Distribution] = {}
        self.file_owner: dict[str, importlib.metadata.Distribution] = {}
        self.module_owner: dict[str, importlib.metadata.Distribution] = {}
        self.pyi_modules: dict[str, importlib.metadata.Distribution] = {}
        self._by_basename: dict[str, list[tuple[importlib.metadata.Distribution, importlib.metadata.PackagePath]]] = {}
        for dist in importlib.metadata.distributions():
            self.by_name.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
            for f in dist.files or ():
                rel = f.as_posix()
                if rel.startswith("..") or "__pycache__" in rel:
                    continue
                self.file_owner.setdefault(rel, dist)
                self._by_basename.setdefault(f.name, []).append((dist, f))
                if rel.endswith(".py"):
                    self.module_owner.setdefault(_module_from_path(rel), dist)
                    name = PurePosixPath(rel).stem
                    if _PYI_MODULE.match(name) and ("/loader/" in rel or "/rthooks/" in rel):
                        self.pyi_modules.setdefault(name, dist)

    def same_file(self, basename: str, sha256: str) -> tuple[importlib.metadata.Distribution, str] | None:
        """The distribution holding a file of this name and content, and the file's installed path."""
        want = base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode()
        for dist, f in self._by_basename.get(basename, []):
            if f.hash is not None and f.hash.mode == "sha256":
                match = f.hash.value == want
            else:
                located = Path(str(dist.locate_file(f)))
                match = located.is_file() and _sha256(located) == sha256
            if match:
                return dist, str(dist.locate_file(f))
        return None


def _in_stdlib(mod: str, stdlib_dir: Path) -> bool:
    """Modules of the interpreter's library folder that sys.stdlib_module_names leaves out
    (_sysconfigdata_*)."""
    path = stdlib_dir / mod.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_metadata(rel: str) -> bool:
    return ".dist-info/" in rel or ".egg-info/" in rel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_under(path: Path, prefix: Path) -> bool:
    try:
        path.resolve().relative_to(prefix.resolve())
        return True
    except ValueError:
        return False


def _system_library_index() -> dict[str, list[Path]]:
    """Library file name -> candidate paths on this machine: the dynamic linker's cache, the usual
    library folders and the interpreter's own (libpython, lib-dynload)."""
    folders = [
        Path(p)
        for p in (
            sysconfig.get_config_var("LIBDIR"),
            sysconfig.get_config_var("DESTSHARED"),
            "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib",
        )
        if p
    ]
    index: dict[str, list[Path]] = {}
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if "=>" in line:
                p = Path(line.split("=>", 1)[1].strip())
                index.setdefault(p.name, []).append(p)
    except OSError:
        pass
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if _SO.search(p.name):
                    index.setdefault(p.name, []).append(p)
    return index


def _find_source(path: Path, sha256: str, index: dict[str, list[Path]]) -> Path | None:
    """The system file this bundle file is a byte-identical copy of."""
    seen = set()
    for candidate in index.get(path.name, []):
        real = candidate.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        if _sha256(real) == sha256:
            return candidate
    return None


def _debian_package(source: Path, debs: dict[str, DebianPackage]) -> DebianPackage | None:
    owner = None
    for variant in _dpkg_path_variants(source):
        try:
            out = subprocess.run(["dpkg-query", "-S", str(variant)], capture_output=True, text=True)
        except OSError:
            return None  # not a Debian system
        if out.returncode == 0 and out.stdout.strip():
            owner = out.stdout.split(":", 1)[0].strip()
            break
    if owner is None:
        return None
    if owner in debs:
        return debs[owner]
    fmt = "${Package}\t${Version}\t${Architecture}\t${source:Package}"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt, owner], capture_output=True, text=True, check=True)
    name, version, arch, src = out.stdout.split("\t")
    copyright_file = Path("/usr/share/doc") / name / "copyright"
    debs[owner] = DebianPackage(name, version, arch, src or name, copyright_file, debian_licences(copyright_file))
    return debs[owner]


def _dpkg_path_variants(source: Path) -> Iterator[Path]:
    """dpkg records the paths as packaged; with merged /usr, /lib/x and /usr/lib/x are the same file."""
    seen: set[str] = set()
    for p in (source, source.resolve()):
        s = str(p)
        for v in (s, s[4:] if s.startswith("/usr/") else "/usr" + s):
            if v not in seen:
                seen.add(v)
                yield Path(v)


def debian_licences(copyright_file: Path) -> list[str]:
    """Licence names from a Debian copyright file: the License: fields of a machine-readable (DEP-5)
    file, mapped to SPDX where the short name has an SPDX twin; for the GCC runtime libraries (a
    free-form file) the GCC runtime exception; otherwise a pointer to the file."""
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if text.startswith("Format:"):
        names: list[str] = []
        for paragraph in re.split(r"\n\s*\n", text):
            if not re.search(r"^Files:", paragraph, re.M):
                continue
            m = re.search(r"^License:[ \t]*(.+)$", paragraph, re.M)
            if m:
                spdx = _debian_to_spdx(m.group(1).strip())
                if spdx not in names:
                    names.append(spdx)
        if names:
            return names
    if "GCC RUNTIME LIBRARY EXCEPTION" in text.upper():
        return [_GCC_RUNTIME]
    if "GNU C Library" in text and "Lesser General Public License" in text:
        return ["LGPL-2.1-or-later"]  # glibc's free-form file; its parts under other terms are listed there
    return [f"see {copyright_file}"]


def _debian_to_spdx(short: str) -> str:
    parts = re.split(r"(\s+(?:or|and)\s+)", short, flags=re.I)
    out = []
    for part in parts:
        if re.fullmatch(r"\s+(or|and)\s+", part, re.I):
            out.append(f" {part.strip().upper()} ")
        else:
            out.append(DEBIAN_TO_SPDX.get(part.strip().lower(), part.strip()))
    joined = "".join(out)
    return joined if is_supported_id(joined) or is_expression(joined) else short


def _python_licence_file() -> Path | None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in (stdlib / "LICENSE.txt", Path(f"/usr/share/doc/python{sys.version_info[0]}.{sys.version_info[1]}/copyright")):
        if p.is_file():
            return p
    return None


# ---- the CycloneDX document --------------------------------------------------------------------------


def environment_bom(python: str = sys.executable, pyproject: Path = ROOT / "pyproject.toml") -> Bom:
    """The environment's SBOM as cyclonedx-bom (`cyclonedx-py environment`) writes it."""
    cmd = [python, "-m", "cyclonedx_py", "environment", "--sv", SPEC_VERSION.to_version(),
           "--output-reproducible", "--of", "JSON", "-o", "-", "--no-validate"]  # to_json validates the result
    if pyproject.is_file():
        cmd += ["--pyproject", str(pyproject)]
    out = subprocess.run([*cmd, sys.prefix], capture_output=True, text=True, check=True).stdout
    return Bom.from_json(json.loads(out))  # type: ignore[attr-defined]


def licences_from_strings(values: Iterable[str]) -> list[License]:
    values = [v for v in values if v]
    factory = LicenseFactory()
    if len(values) == 1 and is_expression(values[0]) and not is_supported_id(values[0]):
        return [LicenseExpression(values[0])]
    out: list[License] = []
    for v in values:
        out.append(DisjunctiveLicense(id=v) if is_supported_id(v) else factory.make_with_name(v))
    return out


def metadata_licence(dist: importlib.metadata.Distribution) -> list[License]:
    """A fallback for distributions cyclonedx-py found no licence for: the License field (its first line
    when it holds a whole licence text)."""
    value = (dist.metadata.get("License") or "").strip()
    if not value:
        return []
    first = value.splitlines()[0].strip()
    return [LicenseFactory().make_from_string(first)]


def _file_component(native: NativeFile) -> Component:
    props = [Property(name=PROP + "bundle-path", value=native.path)]
    if native.source:
        props.append(Property(name=PROP + "copied-from", value=native.source))
    return Component(
        type=ComponentType.FILE,
        name=native.path,
        bom_ref=f"bundle-file:{native.path}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=native.sha256)],
        properties=props,
    )


def build_bom(inv: Inventory, env: Bom) -> Bom:
    bom = Bom()
    bom.metadata.component = env.metadata.component
    bom.metadata.tools = env.metadata.tools
    bom.metadata.properties.add(Property(
        name=PROP + "sbom:method",
        value="Python modules from the executable's PKG/PYZ archives and base_library.zip, files under "
        "_internal matched against installed RECORDs; system libraries matched by SHA-256 and dpkg-query -S",
    ))
    root_name = canonicalize_name(env.metadata.component.name) if env.metadata.component else None
    by_name = {canonicalize_name(c.name): c for c in env.components}
    kept: dict[str, Component] = {}
    for key, pd in sorted(inv.dists.items()):
        if key == root_name:
            continue
        comp = by_name.get(key)
        if comp is None:  # not seen by cyclonedx-py (should not happen): describe it from metadata
            comp = Component(name=pd.name, version=pd.version, bom_ref=f"{pd.name}=={pd.version}",
                             purl=PackageURL(type="pypi", name=key, version=pd.version),
                             licenses=metadata_licence(pd.dist))
        if not comp.licenses:
            comp.licenses = metadata_licence(pd.dist)
        comp.components = []
        comp.properties.add(Property(name=PROP + "bundle:modules", value=str(len(pd.modules))))
        comp.properties.add(Property(name=PROP + "bundle:files", value=str(len(pd.files))))
        for native in sorted(pd.native, key=lambda n: n.path):
            comp.components.add(_file_component(native))
        kept[str(comp.bom_ref)] = comp
        bom.components.add(comp)

    py = inv.python
    python = Component(
        type=ComponentType.LIBRARY, name="cpython", version=py.version, bom_ref=f"cpython=={py.version}",
        description="The Python interpreter and standard library the bundle embeds",
        purl=PackageURL(type="generic", name="cpython", version=py.version),
        licenses=[DisjunctiveLicense(id="PSF-2.0")],
        properties=[Property(name=PROP + "bundle:modules", value=str(py.modules)),
                    Property(name=PROP + "build-prefix", value=str(py.prefix))],
        components=[_file_component(n) for n in sorted(py.native, key=lambda n: n.path)],
    )
    bom.components.add(python)
    distro = _os_release()
    for name, deb in sorted(inv.debs.items()):
        qualifiers = {"arch": deb.arch}
        if distro:
            qualifiers["distro"] = distro
        bom.components.add(Component(
            type=ComponentType.LIBRARY, name=deb.name, version=deb.version, bom_ref=f"deb:{deb.name}=={deb.version}",
            purl=PackageURL(type="deb", namespace="debian", name=deb.name, version=deb.version, qualifiers=qualifiers),
            licenses=licences_from_strings(deb.licences),
            properties=[Property(name=PROP + "debian:source-package", value=deb.source),
                        Property(name=PROP + "debian:copyright", value=str(deb.copyright))],
            components=[_file_component(n) for n in sorted(deb.native, key=lambda n: n.path)],
        ))
    for native in inv.unattributed_native:
        comp = _file_component(native)
        comp.properties.add(Property(name=PROP + "provenance", value="unknown"))
        bom.components.add(comp)
    if inv.unattributed_modules:
        bom.metadata.properties.add(Property(name=PROP + "sbom:unattributed-modules",
                                             value=" ".join(inv.unattributed_modules)))

    # Dependencies: cyclonedx-py's graph, cut down to what the bundle holds.
    refs = set(kept)
    root = bom.metadata.component
    for dep in env.dependencies:
        ref = str(dep.ref)
        if ref in refs or (root is not None and ref == str(root.bom_ref)):
            owner = kept.get(ref, root)
            children = [kept[str(d.ref)] for d in dep.dependencies if str(d.ref) in refs]
            bom.register_dependency(owner, children)
    if root is not None:
        bom.register_dependency(root, [c for c in bom.components if c.type is ComponentType.LIBRARY
                                       and str(c.bom_ref) not in refs])
    return bom


def _os_release() -> str | None:
    try:
        fields = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
        )
    except OSError:
        return None
    distro_id = fields.get("ID", "").strip('"')
    version = fields.get("VERSION_ID", "").strip('"')
    return f"{distro_id}-{version}" if distro_id and version else None


def to_json(bom: Bom) -> str:
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    error = make_schemabased_validator(OutputFormat.JSON, SPEC_VERSION).validate_str(text)
    if error is not None:
        raise ValueError(f"the SBOM does not validate against CycloneDX {SPEC_VERSION.to_version()}: {error}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the onedir folder (dist/appliance)")
    parser.add_argument("--out", type=Path, required=True, help="the CycloneDX JSON file to write")
    args = parser.parse_args(argv)
    inv = take_inventory(read_bundle(args.bundle))
    bom = build_bom(inv, environment_bom())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(bom) + "\n", encoding="utf-8")
    n_native = sum(len(c.components) for c in bom.components) + len(inv.unattributed_native)
    print(
        f"sbom: {args.out}: {len(inv.dists)} Python distributions, {len(inv.debs)} Debian packages, "
        f"CPython {inv.python.version}, {n_native} shared libraries "
        f"({len(inv.unattributed_native)} unattributed); schema CycloneDX {SPEC_VERSION.to_version()} valid",
        file=sys.stderr,
    )
    for native in inv.unattributed_native:
        print(f"sbom: warning: no provenance for {native.path}", file=sys.stderr)
    if inv.unattributed_modules:
        print(f"sbom: warning: modules of no known distribution: {' '.join(inv.unattributed_modules)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
