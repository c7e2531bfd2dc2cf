"""Capture what `detect` reads from a live kernel into a small folder.

`memcgscope doctor --capture DIR` writes the files doctor parses, trimmed
to what it uses (kallsyms and available_filter_functions reduced to the
probed functions, addresses zeroed; the kernel config reduced to the
options that matter), plus the answers of the live checks in
`memcgscope-live.json`. Unit tests replay such folders; a user can attach
one to a bug report.
"""

from __future__ import annotations

import json
import os

from .detect import Finding, LiveChecks, kernel_source, kheaders_cache, tracefs_mounted
from .sysroot import SysRoot
from .targets import FUNCTIONS, TRACEPOINTS

__all__ = ["capture", "load_recorded_checks", "CONFIG_KEYS"]

CONFIG_KEYS = (
    "CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS", "CONFIG_DEBUG_INFO_BTF", "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_EVENTS", "CONFIG_FTRACE", "CONFIG_FUNCTION_TRACER", "CONFIG_DYNAMIC_FTRACE",
    "CONFIG_MEMCG", "CONFIG_MEMCG_V1", "CONFIG_MEMCG_SWAP", "CONFIG_MEMCG_KMEM", "CONFIG_SWAP",
    "CONFIG_IKHEADERS", "CONFIG_IKCONFIG_PROC", "CONFIG_SECURITY_LOCKDOWN_LSM",
)
LIVE_FILE = "memcgscope-live.json"


def capture(out_dir: str, sysroot: SysRoot | None = None, active=None) -> list[str]:
    """Writes the capture; returns the kernel paths written."""
    sysroot = sysroot or SysRoot("/")
    active = active or LiveChecks()
    written: list[str] = []

    def put(kernel_path: str, text: str) -> None:
        dest = os.path.join(out_dir, kernel_path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w") as f:
            f.write(text)
        written.append(kernel_path)

    def copy(kernel_path: str) -> None:
        text = sysroot.read_text(kernel_path)
        if text is not None:
            put(kernel_path, text)

    os.makedirs(out_dir, exist_ok=True)
    with tracefs_mounted(sysroot) as mounted:
        release = sysroot.kernel_release()
        for p in ("/proc/sys/kernel/osrelease", "/proc/sys/kernel/version", "/proc/version",
                  "/proc/version_signature", "/proc/self/cgroup",
                  "/proc/swaps", "/proc/cmdline", "/sys/kernel/security/lockdown"):
            copy(p)
        mounts = sysroot.read_text("/proc/mounts") or ""
        if mounted:  # keep tracefs in the capture: detect mounts it when missing
            mounts += f"nodev {mounted} tracefs rw,relatime 0 0\n"
        put("/proc/mounts", mounts)

        config, _ = sysroot.kernel_config()
        lines = []
        for key in CONFIG_KEYS:
            if key in config:
                lines.append(f"# {key} is not set" if config[key] == "n" else f"{key}={config[key]}")
        if config:
            put(f"/boot/config-{release}", "\n".join(lines) + "\n")

        wanted = {n for t in FUNCTIONS for n in t.names}
        symbols = sysroot.kallsyms(wanted)
        if symbols is not None:
            put("/proc/kallsyms", "".join(
                f"0000000000000000 {s.kind} {s.name}" + (f"\t[{s.module}]" if s.module else "") + "\n"
                for s in symbols))
        for marker in ("/sys/kernel/btf/vmlinux", "/sys/bus/event_source/devices/kprobe/type",
                       "/sys/kernel/kheaders.tar.xz", f"/lib/modules/{release}/build/include"):
            if sysroot.exists(marker):
                put(marker if not sysroot.isdir(marker) else marker + "/.present", "")
        tree = f"{kheaders_cache()}/{release}/.memcgscope-source"
        copy(tree)

        tracing = sysroot.tracing_dir()
        if tracing:
            for t in TRACEPOINTS:
                fmt = f"{tracing}/events/{t.category}/{t.name}/format"
                copy(fmt)
            aff = sysroot.read_text(f"{tracing}/available_filter_functions")
            if aff is not None:
                keep = [line for line in aff.splitlines()
                        if line.split() and line.split()[0].split(".", 1)[0] in wanted]
                put(f"{tracing}/available_filter_functions", "\n".join(keep) + "\n")

        for m in sysroot.mounts():
            if m.fstype == "cgroup2":
                copy(f"{m.mountpoint}/cgroup.controllers")
            if m.fstype == "cgroup" and "memory" in m.options:
                if sysroot.exists(f"{m.mountpoint}/memory.memsw.limit_in_bytes"):
                    put(f"{m.mountpoint}/memory.memsw.limit_in_bytes", "9223372036854771712\n")

        report_core = next(t for t in FUNCTIONS if t.role == "charge_core")
        core = next((s.name.split(".", 1)[0] for s in (symbols or []) if s.name.split(".", 1)[0] in report_core.names),
                    "try_to_free_mem_cgroup_pages")
        live = {"bcc": active.bcc().__dict__, "fentry": active.fentry(sysroot, core).__dict__,
                "headers": kernel_source(sysroot)[0]}
        with open(os.path.join(out_dir, LIVE_FILE), "w") as f:
            json.dump(live, f, indent=2)
    return written


def load_recorded_checks(capture_dir: str):
    from .detect import RecordedChecks
    with open(os.path.join(capture_dir, LIVE_FILE)) as f:
        live = json.load(f)
    return RecordedChecks(Finding(**live["bcc"]), Finding(**live["fentry"]))

