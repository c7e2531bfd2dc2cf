"""What the running kernel allows, and which probe mode `run` will use.

`detect(sysroot, active)` reads everything through a `SysRoot` and asks the
few questions that need the live kernel (is bcc importable? does an fentry
program load?) through an `active` object, so tests replay both from files
captured on real kernels. Modes, best first: fentry, kprobe, tracepoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field

from .sysroot import SysRoot
from .targets import FUNCTIONS, TRACEPOINTS

__all__ = ["Finding", "FunctionFinding", "Report", "LiveChecks", "RecordedChecks",
           "detect", "MODES", "kernel_source", "bcc_kernel_source", "kheaders_cache", "KHEADERS_CACHE"]

MODES = ("fentry", "kprobe", "tracepoint")
KHEADERS_CACHE = "/var/cache/memcgscope/kheaders"   # the default; MEMCGSCOPE_CACHE moves it


def kheaders_cache() -> str:
    """Where scripts/setup.sh (collector/kernels.py) puts header trees."""
    return os.path.join(os.environ.get("MEMCGSCOPE_CACHE", "/var/cache/memcgscope"), "kheaders")


@dataclass
class Finding:
    state: str  # ok | absent | refused | unknown
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class FunctionFinding:
    role: str
    names: list[str]
    symbol: str | None  # the name found in kallsyms (may carry a .constprop.N etc.)
    probeable: bool | None  # None: available_filter_functions not readable
    why: str
    # every kallsyms name of it: the plain one and compiler clones; callers
    # may reach a clone directly (6.12: drain_all_stock.part.0)
    symbols: list[str] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return self.symbol is not None


@dataclass
class CgroupFinding:
    v1_memory: str | None
    v2_mount: str | None
    v2_memory: bool
    swap_accounting: bool | None
    swap_devices: list[str]
    own_memory_cgroup: str | None
    detail: str


@dataclass
class ModeVerdict:
    usable: bool
    reason: str


@dataclass
class Report:
    kernel: str
    checks: dict[str, Finding]
    functions: list[FunctionFinding]
    tracepoints: dict[str, bool]
    cgroups: CgroupFinding
    modes: dict[str, ModeVerdict]
    mode: str | None
    mode_reason: str
    fixes: list[str] = field(default_factory=list)
    #: uname -v and Ubuntu's version signature: the upstream version lives
    #: there on Debian and Ubuntu (model.profiles.upstream_version)
    kernel_version: str | None = None
    version_signature: str | None = None

    def function(self, role_or_name: str) -> FunctionFinding | None:
        for f in self.functions:
            if f.role == role_or_name or role_or_name in f.names:
                return f
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        for f, fd in zip(self.functions, d["functions"]):
            fd["present"] = f.present
        return d


# --- the live questions -----------------------------------------------------

class LiveChecks:
    """Asks the running kernel. Needs root for the fentry load."""

    def bcc(self) -> Finding:
        """Whether bcc's Python module and libbcc are there, without
        importing it: the import maps libbcc and LLVM (8 s in a TCG guest,
        and about 100 MB resident) for a yes/no answer."""
        import ctypes.util
        import importlib.util
        fix = "apt-get install python3-bpfcc, and run from a venv made with --system-site-packages " \
              "(scripts/setup.sh does both)"
        spec = importlib.util.find_spec("bcc")
        if spec is None or not spec.submodule_search_locations:
            return Finding("absent", "python module bcc not importable (not on this Python's path)", fix)
        if not ctypes.util.find_library("bcc"):
            return Finding("absent", "libbcc not found by the dynamic linker (python3-bpfcc without libbpfcc?)", fix)
        version = "?"
        try:
            with open(os.path.join(spec.submodule_search_locations[0], "version.py")) as f:
                m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
                version = m.group(1) if m else "?"
        except OSError:
            pass
        return Finding("ok", f"bcc {version}")

    def fentry(self, sysroot: SysRoot, func: str) -> Finding:
        from .btf import BTF, BTFError
        from .bpfsys import try_fentry
        from .program import fentry_arg_reads
        try:
            btf = BTF.from_file(sysroot.path("/sys/kernel/btf/vmlinux"))
        except BTFError as e:
            return Finding("absent", str(e), "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        btf_id = btf.func_id(func)
        if btf_id is None:
            return Finding("absent", f"{func} has no BTF entry (inlined or not built)")
        if os.geteuid() != 0:
            return Finding("unknown", "not checked: loading a BPF program needs root", "run memcgscope doctor as root")
        reads = fentry_arg_reads(btf)
        how = ("arguments read with bpf_get_func_arg" if reads == "helper" else
               "arguments read from the trampoline frame (no bpf_get_func_arg before 5.17)")
        result = try_fentry(btf_id, args=reads)
        if result.state == "ok":
            return Finding("ok", f"{result.detail} ({func}); {how}")
        fix = None
        if result.state == "refused":
            lockdown = (sysroot.read_text("/sys/kernel/security/lockdown") or "").strip()
            fix = ("allow BPF tracing programs (kernel lockdown"
                   + (f" is '{lockdown}'" if lockdown else "")
                   + ", LSM or sandbox policy); kprobe or tracepoint mode is used meanwhile")
        return Finding(result.state, result.detail, fix)


@dataclass
class RecordedChecks:
    """The live answers as captured on a real kernel (for tests)."""
    bcc_finding: Finding
    fentry_finding: Finding

    def bcc(self) -> Finding:
        return self.bcc_finding

    def fentry(self, sysroot: SysRoot, func: str) -> Finding:
        return self.fentry_finding


# --- tracefs ----------------------------------------------------------------

@contextlib.contextmanager
def tracefs_mounted(sysroot: SysRoot):
    """Mounts tracefs for the duration when a live system lacks it, and
    unmounts only what it mounted."""
    mounted = None
    if sysroot.live and sysroot.tracing_dir() is None and os.geteuid() == 0:
        target = "/sys/kernel/tracing"
        if os.path.isdir(target):
            r = subprocess.run(["mount", "-t", "tracefs", "nodev", target],
                               capture_output=True, text=True)
            if r.returncode == 0:
                mounted = target
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", mounted], capture_output=True)


# --- headers ----------------------------------------------------------------

def bcc_kernel_source(sysroot: SysRoot) -> str | None:
    """The header tree to hand bcc in BCC_KERNEL_SOURCE, or None when bcc
    finds the headers itself (/lib/modules/<release>/build)."""
    kind, path, _ = kernel_source(sysroot)
    release = sysroot.kernel_release()
    if path and kind in ("matching", "fallback") and path != sysroot.path(f"/lib/modules/{release}/build"):
        return path
    return None


def kernel_source(sysroot: SysRoot) -> tuple[str, str | None, str]:
    """("matching" | "fallback" | "builtin" | "none", path, detail) for bcc."""
    release = sysroot.kernel_release()
    build = f"/lib/modules/{release}/build"
    if sysroot.exists(build + "/include"):
        return "matching", sysroot.path(build), f"{build}"
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and sysroot.live and os.path.isdir(env):
        return "fallback", env, f"BCC_KERNEL_SOURCE={env}"
    tree = f"{kheaders_cache()}/{release}"
    source = (sysroot.read_text(tree + "/.memcgscope-source") or "").strip()
    if source:
        # "<package> <version>, matching|nearest" (collector/kernels.py)
        kind = "matching" if source.endswith(", matching") else "fallback"
        return kind, sysroot.path(tree), f"{tree} (from {source})"
    if sysroot.exists("/sys/kernel/kheaders.tar.xz"):
        return "builtin", None, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)"
    return "none", None, f"no {build} and no fallback tree in {tree}"


# --- detection --------------------------------------------------------------

def detect(sysroot: SysRoot | None = None, active=None) -> Report:
    sysroot = sysroot or SysRoot("/")
    active = active or LiveChecks()
    with tracefs_mounted(sysroot):
        return _detect(sysroot, active)


def _detect(sysroot: SysRoot, active) -> Report:
    release = sysroot.kernel_release()
    checks: dict[str, Finding] = {}
    config, config_source = sysroot.kernel_config()

    checks["bcc"] = active.bcc()

    if sysroot.exists("/sys/kernel/btf/vmlinux"):
        checks["btf"] = Finding("ok", "/sys/kernel/btf/vmlinux")
    else:
        checks["btf"] = Finding("absent", "no /sys/kernel/btf/vmlinux",
                                "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")

    checks["kprobes"] = _kprobes(sysroot, config, config_source)

    functions = _functions(sysroot)
    core = next(f for f in functions if f.role == "charge_core")
    fentry_target = core.symbol.split(".", 1)[0] if core.symbol else "try_to_free_mem_cgroup_pages"
    if checks["btf"].ok:
        checks["fentry"] = active.fentry(sysroot, fentry_target)
    else:
        checks["fentry"] = Finding("absent", "needs BTF", checks["btf"].fix)

    tracing = sysroot.tracing_dir()
    if tracing is None:
        checks["tracefs"] = Finding("absent", "tracefs is not mounted and could not be mounted",
                                    "mount -t tracefs nodev /sys/kernel/tracing (as root)")
    else:
        checks["tracefs"] = Finding("ok", tracing)
    tracepoints = {t.full_name: bool(tracing) and sysroot.exists(f"{tracing}/events/{t.category}/{t.name}")
                   for t in TRACEPOINTS}

    kind, _path, detail = kernel_source(sysroot)
    if kind == "matching":
        checks["headers"] = Finding("ok", f"matching: {detail}")
    elif kind in ("fallback", "builtin"):
        checks["headers"] = Finding("ok", f"{kind}: {detail}; struct fields are read at BTF offsets")
    else:
        checks["headers"] = Finding("absent", detail,
                                    f"run scripts/setup.sh (fetches Debian's headers for {release}, or the nearest, into "
                                    f"memcgscope's cache; nothing is installed)")

    cgroups = _cgroups(sysroot)
    if cgroups.v1_memory is None and not cgroups.v2_memory:
        checks["memcg"] = Finding("absent", "no cgroup v1 memory hierarchy and no v2 memory controller",
                                  "mount the memory controller (v1) or enable +memory in cgroup.subtree_control (v2)")
    else:
        checks["memcg"] = Finding("ok", cgroups.detail)

    modes = _modes(checks, core, tracepoints)
    mode = next((m for m in MODES if modes[m].usable), None)
    if mode:
        better = [f"{m}: {modes[m].reason}" for m in MODES[:MODES.index(mode)]]
        mode_reason = modes[mode].reason + (f" (not {'; not '.join(better)})" if better else "")
    else:
        mode_reason = "no mode is usable: " + "; ".join(f"{m}: {v.reason}" for m, v in modes.items())
    fixes = [f"{name}: {c.fix}" for name, c in checks.items() if c.fix and not c.ok]
    return Report(release, checks, functions, tracepoints, cgroups, modes, mode, mode_reason, fixes,
                  sysroot.kernel_version(), sysroot.version_signature())


def _kprobes(sysroot: SysRoot, config: dict[str, str], config_source: str | None) -> Finding:
    pmu = sysroot.exists("/sys/bus/event_source/devices/kprobe")
    value = config.get("CONFIG_KPROBES")
    if value == "y":
        return Finding("ok", f"CONFIG_KPROBES=y ({config_source})" + ("" if pmu else "; no kprobe PMU, tracefs kprobe_events used"))
    if value == "n" or (config_source and value is None):
        return Finding("absent", f"CONFIG_KPROBES is not set ({config_source})",
                       "rebuild the kernel with CONFIG_KPROBES=y, or use fentry/tracepoint mode")
    if pmu:
        return Finding("ok", "kprobe PMU present (/sys/bus/event_source/devices/kprobe); kernel config not found")
    return Finding("unknown", "no kernel config (/proc/config.gz, /boot/config-*) and no kprobe PMU",
                   "install the kernel's /boot/config or enable CONFIG_IKCONFIG_PROC")


def _functions(sysroot: SysRoot) -> list[FunctionFinding]:
    wanted = {n for t in FUNCTIONS for n in t.names}
    symbols = sysroot.kallsyms(wanted) or []
    by_base: dict[str, list[str]] = {}
    for s in symbols:
        by_base.setdefault(s.name.split(".", 1)[0], []).append(s.name)
    tracing = sysroot.tracing_dir()
    filter_text = sysroot.read_text(f"{tracing}/available_filter_functions") if tracing else None
    filterable = None
    if filter_text is not None:
        filterable = {line.split()[0] for line in filter_text.splitlines() if line.strip()}
    out = []
    for target in FUNCTIONS:
        symbol = None
        symbols: list[str] = []
        for name in target.names:
            if name in by_base:
                # the plain name when present, else the first clone
                symbol = name if name in by_base[name] else sorted(by_base[name])[0]
                symbols = sorted(set(by_base[name]), key=lambda n: (n != name, n))
                break
        probeable = None
        if filterable is not None:
            probeable = symbol is not None and symbol in filterable
        elif symbol is None:
            probeable = False
        if filterable is not None:
            symbols = [n for n in symbols if n in filterable]
        out.append(FunctionFinding(target.role, list(target.names), symbol, probeable, target.why, symbols))
    return out


def _cgroups(sysroot: SysRoot) -> CgroupFinding:
    v1_memory = v2_mount = None
    for m in sysroot.mounts():
        if m.fstype == "cgroup" and "memory" in m.options and v1_memory is None:
            v1_memory = m.mountpoint
        elif m.fstype == "cgroup2" and v2_mount is None:
            v2_mount = m.mountpoint
    v2_controllers = (sysroot.read_text(f"{v2_mount}/cgroup.controllers") or "").split() if v2_mount else []
    v2_memory = "memory" in v2_controllers
    cmdline = sysroot.cmdline()
    swap_off_cmdline = "swapaccount=0" in cmdline or "cgroup.memory=noswap" in cmdline
    if v1_memory:
        swap_accounting: bool | None = sysroot.exists(f"{v1_memory}/memory.memsw.limit_in_bytes")
    elif v2_memory:
        swap_accounting = not swap_off_cmdline
    else:
        swap_accounting = None
    own = sysroot.proc_self_cgroup()
    own_memory = own.get("memory") if v1_memory else own.get("")
    parts = []
    if v1_memory:
        parts.append(f"v1 memory at {v1_memory}")
    if v2_mount:
        parts.append(f"v2 at {v2_mount} " + ("with memory" if v2_memory else "without memory"))
    if swap_accounting is not None:
        parts.append("swap accounting " + ("on" if swap_accounting else "off"))
    swaps = sysroot.swaps()
    parts.append(f"swap: {', '.join(swaps)}" if swaps else "no swap device")
    return CgroupFinding(v1_memory, v2_mount, v2_memory, swap_accounting, swaps, own_memory, "; ".join(parts))


def _modes(checks: dict[str, Finding], core: FunctionFinding, tracepoints: dict[str, bool]) -> dict[str, ModeVerdict]:
    base_missing = [name for name in ("bcc", "headers", "memcg") if not checks[name].ok]

    def verdict(needs: list[tuple[bool, str]], ok_reason: str) -> ModeVerdict:
        missing = [f"{n} {checks[n].state}" for n in base_missing] + [why for ok, why in needs if not ok]
        return ModeVerdict(not missing, ok_reason if not missing else ", ".join(missing))

    core_ok = core.present and core.probeable is not False
    core_why = f"{'/'.join(core.names)} not probeable" if not core_ok else ""
    required = [t.full_name for t in TRACEPOINTS if t.required_for_tracepoint_mode]
    missing_tp = [name for name in required if not tracepoints.get(name)]
    return {
        "fentry": verdict([(checks["fentry"].ok, f"fentry {checks['fentry'].state}"), (core_ok, core_why)],
                          f"fentry/fexit on {core.symbol}: exact arguments and returns at the lowest cost"),
        "kprobe": verdict([(checks["kprobes"].ok, f"kprobes {checks['kprobes'].state}"), (core_ok, core_why)],
                          f"kprobe/kretprobe on {core.symbol}"),
        "tracepoint": verdict([(checks["tracefs"].ok, "tracefs absent"),
                               (not missing_tp, "missing " + ", ".join(missing_tp))],
                              "memcg reclaim, OOM and memcg:* tracepoints plus cgroupfs (coarser checks)"),
    }
