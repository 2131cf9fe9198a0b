"""Run a command under the kernel-side sandbox a systemd unit asks for, without a running systemd.

systemd turns most hardening settings of a unit into seccomp filters, capability drops and a private
/proc before it execs the service. This module reads those settings from a unit file, asks
`systemd-analyze syscall-filter` (the same systemd) what its syscall groups contain, and rebuilds the
same filters with libseccomp (through ctypes: the runtime library alone, no headers or compiler). Run
as a script it applies them to itself and execs the command:

    python tests/systemd_sandbox.py SPEC.json -- COMMAND ARGS...

Which settings are emulated, and how (after systemd 252, src/shared/seccomp-util.c):
- SystemCallFilter=: allow-list mode adds @default first; "~" entries remove syscalls from the list;
  SystemCallErrorNumber= makes a call outside the list fail with that errno instead of killing.
- SystemCallArchitectures=native: every filter lists only the native ABI; others are killed.
- MemoryDenyWriteExecute=: EPERM for mmap with PROT_WRITE|PROT_EXEC, mprotect and pkey_mprotect with
  PROT_EXEC, shmat with SHM_EXEC.
- RestrictAddressFamilies=: socket() with another family fails with EAFNOSUPPORT.
- RestrictNamespaces=yes: setns, and unshare/clone with any CLONE_NEW* flag, fail with EPERM; clone3
  (flags in memory, not filterable) fails with ENOSYS so that glibc falls back to clone.
- LockPersonality=: personality() with anything but the default fails with EPERM.
- NoNewPrivileges=, CapabilityBoundingSet= (empty), AmbientCapabilities= (empty), UMask=.
- ProtectProc=/ProcSubset=: a private mount namespace with /proc mounted again with hidepid=/subset=
  (needs root; reported as not applied otherwise).
Not emulated: the file system namespace (ProtectSystem=, PrivateTmp=...), the device cgroup,
PrivateUsers= and User=.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# libseccomp's constants (seccomp.h, 2.5).
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE = 1
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_MASKED_EQ = 7


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


PROT_WRITE = 0x2
PROT_EXEC = 0x4
SHM_EXEC = 0o100000
AF_MAX = 46  # linux/socket.h, 6.x
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
NAMESPACE_FLAGS = {
    "mnt": 0x00020000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
}
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8


@dataclass
class SandboxSpec:
    """What a unit asks the kernel for, in plain values (JSON between the test and the launcher)."""

    allowed_syscalls: list[str] | None = None  # None: no SystemCallFilter= allow-list
    denied_syscalls: list[str] = field(default_factory=list)  # deny-list mode only
    filter_errno: int | None = None  # SystemCallErrorNumber=; None: kill the process
    native_only: bool = False
    memory_deny_write_execute: bool = False
    address_families: list[str] | None = None
    restrict_namespaces: bool = False
    lock_personality: bool = False
    no_new_privileges: bool = False
    drop_capabilities: bool = False
    umask: int | None = None
    protect_proc: str | None = None  # hidepid= value: invisible, noaccess, ptraceable
    proc_subset: str | None = None  # "pid"


# --- reading the unit -----------------------------------------------------------------------------


def unit_service_settings(path: Path) -> list[tuple[str, str]]:
    """The [Service] section's assignments in order (repeated keys kept, continuation lines joined)."""
    settings: list[tuple[str, str]] = []
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.append((key.strip(), value.strip()))
    return settings


def syscall_groups(systemd_analyze: str = "systemd-analyze") -> dict[str, list[str]]:
    """Every @group and its direct members (syscalls or nested @groups), from this systemd."""
    out = subprocess.run([systemd_analyze, "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        name = name.split(":", 1)[0]  # "name:errno" form
        if name.startswith("@"):
            result |= expand(groups[name], groups)
        elif name:
            result.add(name)
    return result


def _yes(value: str) -> bool:
    return value.lower() in {"1", "yes", "true", "on"}


def spec_from_unit(path: Path, systemd_analyze: str = "systemd-analyze") -> SandboxSpec:
    """The sandbox `path` asks for, computed the way systemd 252 computes it."""
    spec = SandboxSpec()
    groups = syscall_groups(systemd_analyze)
    allow_mode: bool | None = None
    syscalls: set[str] = set()
    for key, value in unit_service_settings(path):
        if key == "SystemCallFilter":
            if not value:
                allow_mode, syscalls = None, set()
                continue
            invert = value.startswith("~")
            names = expand(value.lstrip("~").split(), groups)
            if allow_mode is None:
                allow_mode = not invert
                if allow_mode:
                    syscalls = expand(["@default"], groups)
            if allow_mode == (not invert):
                syscalls |= names
            else:
                syscalls -= names
        elif key == "SystemCallErrorNumber":
            if value in {"", "kill"}:
                spec.filter_errno = None
            else:
                spec.filter_errno = int(value) if value.isdigit() else getattr(errno, value)
        elif key == "SystemCallArchitectures":
            spec.native_only = value.split() == ["native"]
        elif key == "MemoryDenyWriteExecute":
            spec.memory_deny_write_execute = _yes(value)
        elif key == "RestrictAddressFamilies":
            if value.startswith("~"):
                raise ValueError("deny-list RestrictAddressFamilies= is not emulated")
            spec.address_families = value.split()
        elif key == "RestrictNamespaces":
            if value not in {"yes", "true", "1"}:
                raise ValueError("only RestrictNamespaces=yes is emulated")
            spec.restrict_namespaces = True
        elif key == "LockPersonality":
            spec.lock_personality = _yes(value)
        elif key == "NoNewPrivileges":
            spec.no_new_privileges = _yes(value)
        elif key == "CapabilityBoundingSet":
            spec.drop_capabilities = value == ""
        elif key == "UMask":
            spec.umask = int(value, 8)
        elif key == "ProtectProc" and value != "default":
            spec.protect_proc = value
        elif key == "ProcSubset" and value == "pid":
            spec.proc_subset = "pid"
    if allow_mode is True:
        spec.allowed_syscalls = sorted(syscalls)
    elif allow_mode is False:
        spec.denied_syscalls = sorted(syscalls)
    # Seccomp filters imply no new privileges for an unprivileged service (systemd.exec(5)).
    spec.no_new_privileges = spec.no_new_privileges or allow_mode is not None
    return spec


# --- applying it -----------------------------------------------------------------------------------


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def find_libseccomp() -> str | None:
    for name in ("libseccomp.so.2", ctypes.util.find_library("seccomp")):
        if name:
            try:
                ctypes.CDLL(name)
                return name
            except OSError:
                continue
    return None


class _Seccomp:
    def __init__(self) -> None:
        name = find_libseccomp()
        if name is None:
            raise OSError("libseccomp.so.2 not found (Debian: libseccomp2)")
        lib = ctypes.CDLL(name, use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def resolve(self, name: str) -> int | None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        return number if number >= 0 else None  # -1 unknown; other negatives: not on this ABI

    def load(self, default_action: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> int:
        """Load one filter; returns how many rules it holds."""
        ctx = self.lib.seccomp_init(default_action)
        if not ctx:
            raise OSError("seccomp_init failed")
        added = 0
        try:
            for action, name, conditions in rules:
                number = self.resolve(name)
                if number is None:
                    continue
                array = (_ArgCmp * max(1, len(conditions)))(*[_ArgCmp(*c) for c in conditions])
                rc = self.lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")
                added += 1
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)
        return added


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_proc(libc: ctypes.CDLL, hidepid: str | None, subset: str | None) -> None:
    """ProtectProc=/ProcSubset=: this process gets its own mount namespace and a fresh /proc."""
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    options = ",".join(f"{k}={v}" for k, v in (("hidepid", hidepid), ("subset", subset)) if v)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(libc.mount(b"proc", b"/proc", b"proc", flags, options.encode()), "mount /proc")


def apply(spec: SandboxSpec) -> list[str]:
    """Confine the calling process as `spec` says. Returns notes on what could not be applied."""
    notes: list[str] = []
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # before /proc may lose /proc/sys
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if spec.protect_proc or spec.proc_subset:
        if os.geteuid() == 0:
            private_proc(libc, spec.protect_proc, spec.proc_subset)
        else:
            notes.append("ProtectProc=/ProcSubset= not applied: needs root for a mount namespace")
    if spec.umask is not None:
        os.umask(spec.umask)
    if spec.drop_capabilities:
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
        for cap in range(last_cap + 1):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
                if os.geteuid() == 0:
                    _check(1, f"drop capability {cap}")
                break  # not root: nothing to drop that an exec would grant
    if spec.no_new_privileges:
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")

    seccomp = _Seccomp()
    eperm = scmp_act_errno(errno.EPERM)
    # Filters without an allow-list first: once the allow-list is loaded, seccomp() itself is refused.
    if spec.memory_deny_write_execute:
        both = PROT_WRITE | PROT_EXEC
        seccomp.load(SCMP_ACT_ALLOW, [
            (eperm, "mmap", [(2, SCMP_CMP_MASKED_EQ, both, both)]),
            (eperm, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ])
    if spec.address_families is not None:
        allowed = {ADDRESS_FAMILIES[name] for name in spec.address_families}
        no_family = scmp_act_errno(errno.EAFNOSUPPORT)
        rules = [(no_family, "socket", [(0, SCMP_CMP_EQ, af, 0)]) for af in range(AF_MAX) if af not in allowed]
        rules.append((no_family, "socket", [(0, SCMP_CMP_GE, AF_MAX, 0)]))
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if spec.restrict_namespaces:
        rules = [(eperm, "setns", []), (scmp_act_errno(errno.ENOSYS), "clone3", [])]
        for flag in NAMESPACE_FLAGS.values():
            rules.append((eperm, "unshare", [(0, SCMP_CMP_MASKED_EQ, flag, flag)]))
            rules.append((eperm, "clone", [(0, SCMP_CMP_MASKED_EQ, flag, flag)]))
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if spec.lock_personality:
        seccomp.load(SCMP_ACT_ALLOW, [(eperm, "personality", [(0, SCMP_CMP_NE, 0, 0)])])
    refuse = SCMP_ACT_KILL_PROCESS if spec.filter_errno is None else scmp_act_errno(spec.filter_errno)
    if spec.denied_syscalls:
        seccomp.load(SCMP_ACT_ALLOW, [(refuse, name, []) for name in spec.denied_syscalls])
    if spec.allowed_syscalls is not None:
        seccomp.load(refuse, [(SCMP_ACT_ALLOW, name, []) for name in spec.allowed_syscalls])
    elif spec.native_only:
        seccomp.load(SCMP_ACT_ALLOW, [])  # a filter for the native ABI only: other ABIs are killed
    return notes


def write_spec(spec: SandboxSpec, path: Path) -> Path:
    path.write_text(json.dumps(asdict(spec), indent=1))
    return path


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: systemd_sandbox.py SPEC.json -- COMMAND ARGS...")
    spec = SandboxSpec(**json.loads(Path(argv[0]).read_text()))
    for note in apply(spec):
        print(f"systemd_sandbox: {note}", file=sys.stderr, flush=True)
    os.execv(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
