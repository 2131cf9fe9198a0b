"""`appliance doctor`: can this machine run what is configured, and what to do where it cannot.

Each check is a plain function that takes what it reads (file text, a directory, a port, a probe's
result) as parameters and returns `Check`s; `run_checks` gathers those inputs from the settings and
the live system. Nothing here imports llama_cpp or onnxruntime: a llama.cpp built for a newer CPU
dies with SIGILL as soon as it runs, so its build is asked in a child process (`probe_build`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import email.utils
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import msgspec

from appliance import __version__
from appliance.errors import ApplianceError, DataDirError
from appliance.lifecycle.datadir import DATA_FORMAT, check_readable_format, owner_name, read_format
from appliance.modelstore.manifest import MANIFEST_NAME, Manifest, read_manifest
from appliance.modelstore.store import ModelStore
from appliance.settings import PeerSettings, Settings

Status = Literal["ok", "warn", "FAIL"]
GIB = 1 << 30
MIB = 1 << 20
DISK_WARN_BELOW = 4 * GIB
"""Under this, one more model import or a day of usage records and collections may fill the disk."""
DISK_FAIL_BELOW = 500 * MIB
"""Under this, SQLite's WAL and a collection commit can fail mid-write."""


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the report; `fix` says what to do when the status is not ok."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


def failed(checks: Sequence[Check]) -> bool:
    """True when something blocks the appliance (any FAIL): `appliance doctor` then exits 1."""
    return any(c.status == "FAIL" for c in checks)


def _worst(statuses: Sequence[Status]) -> Status:
    order: dict[Status, int] = {"ok": 0, "warn": 1, "FAIL": 2}
    return max(statuses, key=order.__getitem__, default="ok")


def _size(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


# -- CPU: what the llama.cpp build was compiled for, versus this CPU ----------------------------

# llama.cpp's system-info feature names -> the /proc/cpuinfo flag a CPU needs for each
# (x86 "flags", aarch64 "Features"). Names not listed (OPENMP, REPACK, LLAMAFILE...) are not instructions.
CPU_FEATURE_FLAGS: dict[str, str] = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "ARM_FMA": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "SME": "sme",
}
REBUILD_FIX = (
    'rebuild llama-cpp-python for this CPU: CMAKE_ARGS="-DGGML_RPC=on" .venv/bin/pip install --no-cache-dir '
    "--force-reinstall llama-cpp-python==0.3.36 (on this machine), or with -DGGML_NATIVE=off for a portable "
    "build; a packaged binary must be built on a CPU no newer than the oldest it runs on"
)


class BuildProbe(msgspec.Struct, frozen=True, kw_only=True):
    """What the child process that loaded llama.cpp reported: its system-info line, or how it died."""

    system_info: str = ""
    returncode: int = 0
    stderr: str = ""
    error: str | None = None
    """Why the child could not be run or gave no answer in time."""


def probe_argv() -> list[str]:
    """The command that prints llama.cpp's system info in a child process.

    A PyInstaller binary has no `python -c`: its sys.executable is the appliance itself, so the child
    is its hidden `doctor --probe-cpu` option. From source the same command runs as
    `python -m appliance.cli_doctor --probe-cpu`, which needs nothing else of the CLI.
    """
    if getattr(sys, "frozen", False):
        return [sys.executable, "doctor", "--probe-cpu"]
    return [sys.executable, "-m", "appliance.cli_doctor", "--probe-cpu"]


def probe_build(argv: Sequence[str], timeout: float = 60.0) -> BuildProbe:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return BuildProbe(error=f"no answer within {timeout:g} s")
    except OSError as exc:
        return BuildProbe(error=str(exc))
    return BuildProbe(system_info=done.stdout.strip(), returncode=done.returncode, stderr=done.stderr.strip())


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """`CPU : SSE3 = 1 | AVX = 1 | ... | CUDA : ARCHS = 890 | ...` -> {"CPU": {"SSE3": "1", ...}, "CUDA": {...}}."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for token in text.split("|"):
        head, colon, rest = token.partition(":")
        if colon and "=" not in head:
            current = sections.setdefault(head.strip(), {})
            token = rest
        name, eq, value = token.partition("=")
        if eq and name.strip():
            current[name.strip()] = value.strip()
    return sections


def cpu_model(cpuinfo: str) -> str:
    """`AMD EPYC 9454P 48-Core Processor, 2 CPUs` from /proc/cpuinfo (x86 `model name`; else the CPU count only)."""
    names = [line.partition(":")[2].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    count = sum(1 for line in cpuinfo.splitlines() if line.startswith("processor"))
    return ", ".join(part for part in ((names[0] if names else ""), f"{count} CPUs" if count else "") if part)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (x86 `flags`, aarch64 `Features`)."""
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def check_cpu(probe: BuildProbe, cpuinfo: str) -> Check:
    if probe.returncode < 0:
        try:
            sig = signal.Signals(-probe.returncode).name
        except ValueError:
            sig = f"signal {-probe.returncode}"
        why = (
            "an instruction this CPU does not have (Illegal instruction)" if sig == "SIGILL" else "a crash"
        )
        return Check(
            name="cpu", status="FAIL",
            detail=f"loading llama.cpp killed the process with {sig}: its build uses {why}",
            fix=REBUILD_FIX if sig == "SIGILL" else "run the probe by hand to see the crash: " + " ".join(probe_argv()),
        )
    if probe.error or probe.returncode != 0 or not probe.system_info:
        tail = probe.error or (probe.stderr.splitlines()[-1] if probe.stderr else f"exit status {probe.returncode}")
        return Check(
            name="cpu", status="FAIL", detail=f"cannot load llama.cpp to read its build: {tail}",
            fix="reinstall the appliance (./scripts/setup, or the packaged binary) so that llama_cpp loads",
        )
    built = parse_system_info(probe.system_info).get("CPU", {})
    needed = [name for name, value in built.items() if value == "1" and name in CPU_FEATURE_FLAGS]
    flags = cpu_flags(cpuinfo)
    if not flags:
        return Check(
            name="cpu", status="warn",
            detail=f"llama.cpp build uses {' '.join(needed) or 'no listed extensions'}; /proc/cpuinfo lists no CPU flags to compare",
            fix="compare by hand with `lscpu`; an unsupported build stops with 'Illegal instruction'",
        )
    missing = [name for name in needed if CPU_FEATURE_FLAGS[name] not in flags]
    if missing:
        return Check(
            name="cpu", status="FAIL",
            detail=f"llama.cpp was built for {' '.join(missing)}, which this CPU lacks "
            f"({', '.join(CPU_FEATURE_FLAGS[m] for m in missing)} not in /proc/cpuinfo): it would stop with SIGILL",
            fix=REBUILD_FIX,
        )
    unused = [n for n, flag in CPU_FEATURE_FLAGS.items() if flag in flags and built.get(n) == "0"]
    extra = f" (this CPU also has {' '.join(unused)}, unused by the build)" if unused else ""
    return Check(
        name="cpu", status="ok",
        detail=f"llama.cpp build uses {' '.join(needed) or 'no listed extensions'}; this CPU ({cpu_model(cpuinfo)}) "
        f"has them{extra}",
    )


# -- memory ------------------------------------------------------------------------------------


class MemoryInfo(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    available: int
    cgroup_limit: int | None = None

    @property
    def ram(self) -> int:
        """What this process may use at most: MemTotal, or the cgroup's limit when lower."""
        return min(self.total, self.cgroup_limit) if self.cgroup_limit else self.total


def parse_meminfo(text: str, cgroup_limit: int | None = None) -> MemoryInfo:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        parts = value.split()
        if colon and parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    if cgroup_limit:
        available = min(available, cgroup_limit)
    return MemoryInfo(total=total, available=available, cgroup_limit=cgroup_limit)


def cgroup_memory_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: str | None = None) -> int | None:
    """The tightest memory limit of this process's cgroup and its parents (v2 memory.max, v1 limit_in_bytes)."""
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    candidates = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    for line in self_cgroup.splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy == "0" and path.strip("/"):  # cgroup v2: walk from our group up to the root
            node = cgroup_root / path.strip("/")
            while node != cgroup_root:
                candidates.append(node / "memory.max")
                node = node.parent
    limits = []
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        # v1 writes "no limit" as a number near 2^63; anything beyond 2^60 bytes is no limit.
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    return min(limits) if limits else None


class ModelMemory(msgspec.Struct, frozen=True, kw_only=True):
    """One model's estimated resident size, as engines/memory.py computes it, or why it could not."""

    model_id: str
    total: int = 0
    explanation: str = ""
    error: str | None = None


def check_memory(models: Sequence[ModelMemory], memory: MemoryInfo, max_memory: int = 0) -> Check:
    """All registered models together against RAM, or each against `models.max_memory` when that is set.

    With `max_memory` the registry keeps only what fits loaded (it unloads the least recently used),
    so each model must fit the limit on its own, and the limit must fit the machine.
    """
    if not models:
        return Check(name="memory", status="ok", detail=f"no models registered; {_size(memory.available)} available")
    unknown = [m for m in models if m.error]
    known = [m for m in models if not m.error]
    total = sum(m.total for m in known)
    ram, where = memory.ram, ("cgroup limit" if memory.cgroup_limit and memory.cgroup_limit < memory.total else "RAM")
    parts = "; ".join(m.explanation for m in sorted(known, key=lambda m: -m.total))
    statuses: list[Status] = []
    notes: list[str] = []
    fixes: list[str] = []
    shrink = "lower models.n_ctx or models.parallel (the KV cache grows with both), or use a smaller quantisation"
    if max_memory:
        largest = max(known, key=lambda m: m.total, default=None)
        summary = (
            f"models.max_memory {_size(max_memory)}; all models {_size(total)} ({parts}); "
            f"{_size(memory.available)} available of {_size(ram)} {where}"
        )
        too_big = [m for m in known if m.total > max_memory]
        if too_big:
            statuses.append("FAIL")
            notes.append(f"{', '.join(m.model_id for m in too_big)} alone exceeds models.max_memory and can never load")
            fixes.append(f"raise models.max_memory above {_size(max(m.total for m in too_big))}, or {shrink}")
        if max_memory > ram:
            statuses.append("warn")
            notes.append(f"models.max_memory is more than the {_size(ram)} of {where}")
            fixes.append(f"set models.max_memory at most {_size(ram)} (or a share such as 75%)")
        elif largest is not None and min(total, max_memory) > memory.available:
            statuses.append("warn")
            notes.append(f"up to {_size(min(total, max_memory))} may be loaded but only {_size(memory.available)} is available now")
            fixes.append("free memory (other processes use it), or lower models.max_memory")
    else:
        summary = f"models need {_size(total)} ({parts}); {_size(memory.available)} available of {_size(ram)} {where}"
        if total > ram:
            statuses.append("FAIL")
            notes.append(f"more than the {_size(ram)} of {where}: loading them all gets the server killed (OOM)")
            fixes.append(f"{shrink}; or set models.max_memory so that only some stay loaded; or remove a model")
        elif total > memory.available:
            statuses.append("warn")
            notes.append("more than is available now")
            fixes.append(f"free memory (other processes use it), or {shrink}")
    if unknown:
        statuses.append("warn")
        notes.append("not estimated: " + "; ".join(f"{m.model_id} ({m.error})" for m in unknown))
        fixes.append("see the model checks below")
    status = _worst(statuses)
    detail = summary + ("; " + "; ".join(notes) if notes else "")
    return Check(name="memory", status=status, detail=detail, fix="; ".join(fixes) or None)


def estimate_models_memory(store: ModelStore, settings: Settings) -> list[ModelMemory]:
    """engines/memory.py's estimate of each registered model, counted as the registry counts them."""
    from appliance.engines.memory import estimate_model_memory  # reads GGUF headers, not llama_cpp

    out = []
    for manifest in store.manifests():
        if manifest.kind == "adapter":
            continue  # loaded onto its base model's engine (a few MB at most): counted with it as the registry does
        if manifest.id in settings.models.rpc:
            # As engines/memory.estimate_models: a split model's layers live on the RPC workers, and it
            # runs in a child process outside models.max_memory.
            out.append(ModelMemory(model_id=manifest.id, explanation=f"{manifest.id}: split over RPC workers, not counted"))
            continue
        try:
            estimate = estimate_model_memory(manifest, store.root / manifest.id, settings.models)
        except ApplianceError as exc:
            out.append(ModelMemory(model_id=manifest.id, error=exc.message))
            continue
        out.append(ModelMemory(model_id=manifest.id, total=estimate.total, explanation=estimate.explain()))
    return out


# -- disk --------------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(
    data_dir: Path, *, warn_below: int = DISK_WARN_BELOW, fail_below: int = DISK_FAIL_BELOW
) -> Check:
    where = _existing(data_dir)
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return Check(name="disk", status="FAIL", detail=f"cannot stat {where}: {exc.strerror}", fix="check the mount")
    detail = f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {where}"
    if usage.free < fail_below:
        return Check(
            name="disk", status="FAIL", detail=f"{detail} (under {_size(fail_below)}: database and index writes fail)",
            fix="free space there, or move data_dir (APPLIANCE_DATA_DIR) to a larger filesystem",
        )
    if usage.free < warn_below:
        return Check(
            name="disk", status="warn", detail=f"{detail} (under {_size(warn_below)})",
            fix="free space before importing models or documents, or move data_dir to a larger filesystem",
        )
    return Check(name="disk", status="ok", detail=detail)


# -- data dir ----------------------------------------------------------------------------------


def _foreign_entries(data_dir: Path, owner: int, limit: int = 2000) -> list[str]:
    """Entries in the data dir (and one level below) owned by someone else than the dir's owner:
    typically files a `sudo appliance ...` once created, which the service user then cannot write."""
    found: list[str] = []
    seen = 0
    stack = [(data_dir, 0)]
    while stack and seen < limit:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid != owner:
                found.append(f"{Path(entry.path).relative_to(data_dir)} ({owner_name(st.st_uid)})")
            if depth < 1 and stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), depth + 1))
    return sorted(found)


def check_data_dir(data_dir: Path, uid: int) -> Check:
    """Exists, belongs to the user running this (the user the service must run as), private, writable."""
    if not data_dir.exists():
        parent = _existing(data_dir)
        if os.access(parent, os.W_OK):
            return Check(
                name="data dir", status="warn", detail=f"{data_dir} does not exist yet (created at first use)",
                fix="appliance models install-defaults (creates it with the default models)",
            )
        return Check(
            name="data dir", status="FAIL",
            detail=f"{data_dir} does not exist and {parent} is not writable by {owner_name(uid)}",
            fix=f"sudo install -d -o {owner_name(uid)} -m 750 {data_dir}",
        )
    st = data_dir.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Check(name="data dir", status="FAIL", detail=f"{data_dir} is not a directory",
                     fix="point data_dir (APPLIANCE_DATA_DIR) at a directory")
    me, owner = owner_name(uid), owner_name(st.st_uid)
    mode = stat.S_IMODE(st.st_mode)
    statuses: list[Status] = []
    notes: list[str] = []
    fixes: list[str] = []
    if st.st_uid != uid:
        statuses.append("FAIL")
        notes.append(f"owned by {owner}, not by {me} who runs this (the server must run as the owner)")
        fixes.append(
            f"run as the owner: sudo -u {owner} appliance doctor (the service's User= must be {owner}); "
            f"or make it {me}'s: sudo chown -R {me} {data_dir}"
        )
    else:
        foreign = _foreign_entries(data_dir, st.st_uid)
        if foreign:
            statuses.append("FAIL")
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            notes.append(f"entries owned by other users, which {owner} cannot rewrite: {shown}")
            fixes.append(f"sudo chown -R {owner} {data_dir}")
    if mode & stat.S_IWOTH:
        statuses.append("FAIL")
        notes.append(f"mode {mode:04o} is world-writable: anyone could replace models or the key database")
        fixes.append(f"chmod 750 {data_dir}")
    elif mode & stat.S_IROTH:
        statuses.append("warn")
        notes.append(f"mode {mode:04o} lets every user read API key hashes and usage records")
        fixes.append(f"chmod 750 {data_dir}")
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".doctor-"):
            pass
    except OSError as exc:
        statuses.append("FAIL")
        notes.append(f"not writable by {me}: {exc.strerror}")
        if exc.errno == errno.EROFS:
            fixes.append("mount the filesystem read-write, or move data_dir")
        elif st.st_uid == uid:
            fixes.append(f"chmod u+w {data_dir}")
    detail = f"{data_dir}: owner {owner}, mode {mode:04o}" + ("; " + "; ".join(notes) if notes else ", writable")
    return Check(name="data dir", status=_worst(statuses), detail=detail, fix="; ".join(dict.fromkeys(fixes)) or None)


def check_data_format(data_dir: Path) -> Check:
    """The data format this release reads (lifecycle/datadir.py): a newer one makes `serve` refuse to start."""
    try:
        record = read_format(data_dir)
        check_readable_format(record, data_dir)
    except DataDirError as exc:
        return Check(name="data format", status="FAIL", detail=exc.message,
                     fix="run the release it names (or newer), or restore the backup taken before the upgrade")
    if record is None:
        return Check(name="data format", status="ok", detail=f"new data dir: format {DATA_FORMAT} is recorded at first start")
    if record.format < DATA_FORMAT:
        return Check(name="data format", status="ok",
                     detail=f"format {record.format} (appliance {record.written_by}): migrated to {DATA_FORMAT} at the next start")
    return Check(name="data format", status="ok", detail=f"format {record.format}, written by appliance {record.written_by}")


# -- model files -------------------------------------------------------------------------------


def _model_fix(manifest: Manifest, data_dir: Path) -> str:
    cli = f"appliance --data-dir {data_dir} models"
    if manifest.file.source is not None:
        return f"{cli} remove {manifest.id} && {cli} install-defaults"
    return f"{cli} remove {manifest.id} && {cli} import <the original file> --id {manifest.id}"


def check_models(data_dir: Path, *, full: bool = False) -> list[Check]:
    """Each registered model's files present with the manifest's sizes; `full` re-hashes them (sha256)."""
    store = ModelStore(data_dir / "models")
    install = f"appliance --data-dir {data_dir} models install-defaults (or models import FILE)"
    if not store.root.is_dir():
        return [Check(name="models", status="warn", detail=f"no models registered ({store.root} does not exist)", fix=install)]
    checks: list[Check] = []
    for entry in sorted(store.root.iterdir()):
        if entry.name.startswith(".") or not (entry / MANIFEST_NAME).is_file():
            continue  # staging leftovers and foreign folders: the server ignores them too
        name = f"model {entry.name}"
        try:
            manifest = read_manifest(entry / MANIFEST_NAME)
        except ApplianceError as exc:
            checks.append(Check(
                name=name, status="FAIL", detail=f"unreadable manifest, the server skips this model: {exc.message}",
                fix=f"delete {entry} and import the model again",
            ))
            continue
        problems: list[str] = []
        if full:
            problems = [f"{r.file}: {r.problem}" for r in store.verify(manifest.id) if not r.ok]
        else:
            for f in manifest.files():
                path = store.path_of(manifest, f)
                try:
                    size = path.stat().st_size
                except OSError:
                    problems.append(f"{path} is missing")
                    continue
                if size != f.size:
                    how = "truncated" if size < f.size else "changed"
                    problems.append(f"{path} is {size} bytes, the manifest says {f.size} ({how})")
        if problems:
            checks.append(Check(name=name, status="FAIL", detail="; ".join(problems), fix=_model_fix(manifest, data_dir)))
            continue
        files = ", ".join(f"{f.name} {_size(f.size)}" for f in manifest.files())
        how = "sha256 verified" if full else "sizes match (--full re-hashes)"
        checks.append(Check(name=name, status="ok", detail=f"{manifest.kind}, {manifest.format}: {files}, {how}"))
    if not checks:
        # The server starts without models (it logs a warning) but has nothing to serve.
        return [Check(name="models", status="warn", detail=f"no models registered in {store.root}", fix=install)]
    return checks


# -- GPU ---------------------------------------------------------------------------------------


class GpuFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What this machine has (driver, GPUs) and which CUDA builds are installed, with their missing libraries."""

    driver: str | None = None
    """First line of /proc/driver/nvidia/version, or None without the NVIDIA driver."""
    gpus: list[str] = []
    """nvidia-smi's name, memory and driver per GPU."""
    cuda_builds: dict[str, list[str]] = {}
    """CUDA backend library of llama.cpp / onnxruntime -> the libraries it needs that the loader cannot find."""


def _package_dir(name: str) -> Path | None:
    """Where a package's files are, without importing it (importing onnxruntime-gpu would load CUDA)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cuda_backend_libraries() -> list[Path]:
    """llama.cpp's libggml-cuda and onnxruntime-gpu's CUDA provider, where installed."""
    found: list[Path] = []
    llama = _package_dir("llama_cpp")
    if llama is not None:
        found += sorted((llama / "lib").glob("libggml-cuda*.so*"))
    ort = _package_dir("onnxruntime")
    if ort is not None:
        found += sorted((ort / "capi").glob("libonnxruntime_providers_cuda*.so*"))
    return found


def missing_libraries(library: Path) -> list[str]:
    """The shared libraries `library` needs that the dynamic loader cannot find (ldd's `not found`)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        # No ldd: at least look up the CUDA runtime libraries both backends link.
        return [name for name in ("cudart", "cublas", "cudnn") if ctypes.util.find_library(name) is None]
    try:
        out = subprocess.run([ldd, str(library)], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def gpu_facts() -> GpuFacts:
    try:
        driver: str | None = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        driver = None
    gpus: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            pass
    builds = {str(lib): missing_libraries(lib) for lib in cuda_backend_libraries()}
    return GpuFacts(driver=driver, gpus=gpus, cuda_builds=builds)


def check_gpu(facts: GpuFacts, gpu_setting: str) -> list[Check]:
    has_gpu = bool(facts.driver or facts.gpus)
    names = "; ".join(facts.gpus) or (facts.driver or "")
    if not has_gpu and not facts.cuda_builds:
        return [Check(name="gpu", status="ok", detail="no GPU: CPU inference")]
    if gpu_setting == "off":
        return [Check(name="gpu", status="ok", detail=f"models.gpu = off: CPU inference{' (GPU: ' + names + ')' if has_gpu else ''}")]
    if not facts.cuda_builds:
        return [Check(
            name="gpu", status="warn", detail=f"NVIDIA GPU present ({names}) but llama.cpp and onnxruntime are CPU builds",
            fix='CMAKE_ARGS="-DGGML_RPC=on -DGGML_CUDA=on" APPLIANCE_EXTRAS=gpu,dev ./scripts/setup (see README, GPU)',
        )]
    if not has_gpu:
        return [Check(
            name="gpu", status="warn", detail="CUDA builds installed but no NVIDIA driver: CPU inference",
            fix="install the NVIDIA driver, or set models.gpu = \"off\"",
        )]
    checks = [Check(name="gpu", status="ok", detail=names)]
    for lib, missing in facts.cuda_builds.items():
        label = f"gpu {Path(lib).name}"
        if missing:
            checks.append(Check(
                name=label, status="FAIL", detail=f"{lib} needs {', '.join(missing)}: not found by the loader",
                fix="install the CUDA runtime and cuDNN versions it was built for (libcudart, libcublas, libcudnn), "
                "or add their directory to /etc/ld.so.conf.d and run ldconfig",
            ))
        else:
            checks.append(Check(name=label, status="ok", detail="all CUDA libraries it needs are found"))
    return checks


# -- port --------------------------------------------------------------------------------------


class PortProbe(msgspec.Struct, frozen=True, kw_only=True):
    free: bool
    error: str | None = None
    """Why binding failed (in use, not permitted, address not on this machine)."""
    in_use: bool = False
    appliance_health: str | None = None
    """The /health status of the appliance answering there, if one does."""


def probe_port(host: str, port: int, timeout: float = 1.0) -> PortProbe:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return PortProbe(free=False, error=f"cannot resolve {host}: {exc.strerror}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # uvicorn sets SO_REUSEADDR too: a closed server's TIME_WAIT connections do not block it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            return PortProbe(free=True)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return PortProbe(free=False, error=exc.strerror or str(exc))
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://[{target}]:{port}/health" if ":" in target else f"http://{target}:{port}/health"
    try:
        body = httpx.get(url, timeout=timeout).json()
    except (httpx.HTTPError, ValueError):
        return PortProbe(free=False, in_use=True)
    # The appliance's /health answers {"status": ..., "models": {...}} (200 ok, 503 loading/degraded).
    if isinstance(body, dict) and "status" in body and isinstance(body.get("models"), dict):
        return PortProbe(free=False, in_use=True, appliance_health=str(body["status"]))
    return PortProbe(free=False, in_use=True)


def check_port(probe: PortProbe, host: str, port: int) -> Check:
    where = f"{host}:{port}"
    if probe.free:
        return Check(name="port", status="ok", detail=f"{where} is free")
    if probe.appliance_health is not None:
        return Check(
            name="port", status="warn",
            detail=f"an appliance is already running on {where} (health: {probe.appliance_health})",
            fix="that is fine if it is this service; to start another, stop it (systemctl stop appliance) "
            "or pick another server.port (APPLIANCE_PORT)",
        )
    if probe.in_use:
        return Check(
            name="port", status="FAIL", detail=f"{where} is in use by another program (not an appliance)",
            fix=f"find it with `ss -ltnp 'sport = :{port}'`, or set server.port (APPLIANCE_PORT) to a free port",
        )
    return Check(
        name="port", status="FAIL", detail=f"cannot bind {where}: {probe.error}",
        fix="use a port above 1023 (or grant CAP_NET_BIND_SERVICE) and an address of this machine (server.host)",
    )


def check_exposure(host: str, data_dir: Path) -> Check:
    """`serve` refuses a non-loopback address until an API key exists (cli.py): say so before it does."""
    from appliance.policy.gateway import loopback_host
    from appliance.policy.tenancy import TenantStore

    if loopback_host(host):
        return Check(name="exposure", status="ok", detail=f"{host} is loopback: only this machine can connect")
    db = data_dir / "gateway.db"
    try:
        # Read-only: doctor must not create the database (as the wrong user, say).
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            has_keys = TenantStore(conn).any_keys()
        finally:
            conn.close()
    except sqlite3.Error:
        has_keys = False
    if has_keys:
        return Check(name="exposure", status="ok", detail=f"{host} is reachable from the network; API keys are required")
    return Check(
        name="exposure", status="FAIL",
        detail=f"{host} is reachable from the network but no API key exists: serve refuses to start",
        fix="appliance tenants create TEAM && appliance keys create --tenant TEAM --role admin "
        "(or server.host = \"127.0.0.1\")",
    )


# -- clock and cluster peers -------------------------------------------------------------------


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (Linux, 64-bit), read-only use: modes = 0."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        # The kernel's reserved tail, plus slack so a larger kernel struct can never overrun this buffer.
        ("_reserved", ctypes.c_int * 32),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class ClockState(msgspec.Struct, frozen=True, kw_only=True):
    synchronised: bool | None
    """None: the kernel could not be asked."""
    max_error_s: float | None = None


def clock_state() -> ClockState:
    """The kernel's NTP state (adjtimex): works without systemd or timedatectl, and in containers."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return ClockState(synchronised=None)
    if state < 0:
        return ClockState(synchronised=None)
    synced = state != _TIME_ERROR and not tx.status & _STA_UNSYNC
    return ClockState(synchronised=synced, max_error_s=tx.maxerror / 1e6)


def check_clock(state: ClockState, *, cluster_enabled: bool, max_age_s: float) -> Check:
    why = f"cluster signatures are refused beyond {max_age_s:g} s of clock difference (cluster.signature_max_age_s)"
    fix = "turn on time synchronisation: systemctl enable --now systemd-timesyncd (or chrony)"
    if state.synchronised is None:
        return Check(
            name="clock", status="warn" if cluster_enabled else "ok",
            detail="cannot ask the kernel whether the clock is synchronised" + (f"; {why}" if cluster_enabled else ""),
            fix=fix if cluster_enabled else None,
        )
    if state.synchronised:
        return Check(name="clock", status="ok", detail=f"synchronised (max error {state.max_error_s or 0:.3f} s)")
    if cluster_enabled:
        return Check(name="clock", status="warn", detail=f"not synchronised (NTP); {why}", fix=fix)
    return Check(name="clock", status="ok", detail="not synchronised (NTP); matters only for federation (no peers)")


def _date_header(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def check_peer(peer: PeerSettings, *, secret: str, node: str, max_age_s: float, timeout: float) -> Check:
    """Reach a federation peer, read its version, and check that it accepts our signature and clock."""
    from appliance.peering.auth import PROBE_PRINCIPAL_TENANT, sign
    from appliance.peering.cluster import STATE_PATH, peer_error_message
    from appliance.protocol.cluster import NodeState
    from appliance.types import Principal

    name, url = f"peer {peer.name}", peer.url.rstrip("/")
    with httpx.Client(timeout=timeout) as client:
        started = time.time()
        try:
            health = client.get(url + "/health")
        except httpx.HTTPError as exc:
            return Check(
                name=name, status="warn", detail=f"{url} unreachable ({type(exc).__name__}: {exc})".replace(": )", ")"),
                fix="start it, or check cluster.peers' url and the network; nothing is forwarded to it while it is down",
            )
        # Date has whole seconds: compare with the middle of the exchange, so the error is under 1 s.
        skew: float | None = None
        peer_date = _date_header(health.headers.get("date"))
        if peer_date is not None:
            skew = peer_date + 0.5 - (started + time.time()) / 2
        facts = [f"{url} reachable"]
        try:
            status = health.json().get("status")
            facts.append(f"health {status}")
        except (ValueError, AttributeError):
            facts.append(f"/health answered {health.status_code} but is not an appliance's")
        statuses: list[Status] = ["ok"]
        fixes: list[str] = []
        try:
            version = client.get(url + "/version")
            if version.status_code == 200:
                info = version.json()
                facts.append(f"appliance {info.get('version')}, llama-cpp-python {info.get('llama_cpp_python')}")
                if info.get("version") != __version__:
                    statuses.append("warn")
                    facts.append(f"this node runs {__version__}")
                    fixes.append("run the same appliance release on every node")
            elif version.status_code in (401, 403):
                facts.append("version not shown (/version needs an API key there)")
            else:
                facts.append(f"/version answered {version.status_code}")
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        principal = Principal(tenant=PROBE_PRINCIPAL_TENANT, key_id=None, role="user")
        try:
            sent = time.time()
            state = client.get(url + STATE_PATH, headers=sign(secret, node=node, method="GET", path=STATE_PATH, principal=principal))
            if state.status_code == 200:
                node_state = msgspec.json.decode(state.content, type=NodeState)
                if node_state.time:
                    skew = node_state.time - (sent + time.time()) / 2  # the peer's clock to the millisecond
                facts.append(f"accepts our signature as {node} (it calls itself {node_state.node})")
            elif state.status_code == 401:
                statuses.append("FAIL")
                facts.append(f"refuses our signature: {peer_error_message(state.content) or '401'}")
                fixes.append(
                    f"the same secret on both nodes (cluster.secret or the peer's own), this node listed as "
                    f"{node!r} in the peer's cluster.peers, and synchronised clocks"
                )
            else:
                statuses.append("warn")
                facts.append(f"{STATE_PATH} answered {state.status_code}")
                fixes.append("the peer may run an appliance without federation: check its version")
        except (httpx.HTTPError, msgspec.MsgspecError) as exc:
            statuses.append("warn")
            facts.append(f"{STATE_PATH} failed: {type(exc).__name__}")
    if skew is not None:
        facts.append(f"clock {skew:+.1f} s from ours")
        if abs(skew) > max_age_s:
            statuses.append("FAIL")
            fixes.append(f"synchronise both clocks (NTP): more than {max_age_s:g} s apart, every signature is refused")
        elif abs(skew) > max_age_s / 2:
            statuses.append("warn")
            fixes.append(f"synchronise both clocks (NTP): signatures fail beyond {max_age_s:g} s")
    return Check(name=name, status=_worst(statuses), detail="; ".join(facts), fix="; ".join(dict.fromkeys(fixes)) or None)


def node_name(settings: Settings) -> str:
    # As peering/cluster.py's Cluster names this node: what peers know it by.
    return settings.cluster.node_name or f"{socket.gethostname()}:{settings.server.port}"


# -- RPC workers -------------------------------------------------------------------------------


def check_rpc_worker(model_id: str, endpoint: str, *, timeout: float, registered: bool, server_running: bool) -> Check:
    from appliance.engines import rpc

    name = f"rpc {model_id} {endpoint}"
    try:
        version = rpc.probe(endpoint, timeout)
    except (ApplianceError, ValueError) as exc:
        message = exc.message if isinstance(exc, ApplianceError) else str(exc)
        if server_running:
            # A worker serves one client: the running appliance may hold its only connection.
            return Check(name=name, status="warn", detail=f"{message} (the appliance running here may hold its connection)",
                         fix="check again with the appliance stopped")
        return Check(
            name=name, status="FAIL", detail=message,
            fix=f"start `appliance peer serve` on that host (or its SSH tunnel), or remove it from models.rpc.{model_id}",
        )
    detail = f"worker answers, RPC protocol {'.'.join(map(str, version))}"
    if not registered:
        return Check(name=name, status="warn", detail=f"{detail}; but no model {model_id!r} is registered",
                     fix=f"import {model_id} or remove [models.rpc.{model_id}]")
    return Check(name=name, status="ok", detail=detail)


# -- all of it ---------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def run_checks(settings: Settings, *, full: bool = False) -> list[Check]:
    """Every check against the live system, in the order a reader fixes them: machine, files, network."""
    from appliance.engines.memory import max_memory_bytes

    checks = [check_cpu(probe_build(probe_argv()), _read("/proc/cpuinfo"))]
    memory = parse_meminfo(_read("/proc/meminfo"), cgroup_memory_limit())
    store = ModelStore(settings.models_dir)
    checks.append(check_memory(
        estimate_models_memory(store, settings), memory, max_memory_bytes(settings.models, ram=memory.ram)
    ))
    checks.append(check_disk(settings.data_dir))
    checks.append(check_data_dir(settings.data_dir, os.geteuid()))
    checks.append(check_data_format(settings.data_dir))
    checks += check_models(settings.data_dir, full=full)
    checks += check_gpu(gpu_facts(), settings.models.gpu)
    port = probe_port(settings.server.host, settings.server.port)
    checks.append(check_port(port, settings.server.host, settings.server.port))
    checks.append(check_exposure(settings.server.host, settings.data_dir))
    cluster = settings.cluster
    checks.append(check_clock(clock_state(), cluster_enabled=bool(cluster.peers), max_age_s=cluster.signature_max_age_s))
    with ThreadPoolExecutor(max_workers=8) as pool:
        peers = [
            pool.submit(
                check_peer, p, secret=p.secret or cluster.secret, node=node_name(settings),
                max_age_s=cluster.signature_max_age_s, timeout=cluster.probe_timeout_s,
            )
            for p in cluster.peers
        ]
        registered = {name for m in store.manifests() for name in m.names()}
        workers = [
            pool.submit(
                check_rpc_worker, model_id, endpoint, timeout=min(split.connect_timeout_s, 5.0),
                registered=model_id in registered, server_running=port.appliance_health is not None,
            )
            for model_id, split in settings.models.rpc.items()
            for endpoint in split.peers
        ]
        checks += [f.result() for f in peers] or [Check(name="peers", status="ok", detail="no peers configured")]
        checks += [f.result() for f in workers]
    return checks


def render(checks: Sequence[Check]) -> str:
    """One line per check (status, name, what was found) and an indented fix line under each that is not ok."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("FAIL", "warn", "ok")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + (": blocked" if counts["FAIL"] else ""))
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps([msgspec.to_builtins(c) for c in checks], indent=2)
