"""Every read of /proc and /sys goes through here.

`SysRoot(root)` resolves absolute kernel paths ("/proc/kallsyms") under a
root directory, "/" on a live system. Unit tests point it at files captured
from real kernels (tests/unit/data/sysroots/*), so the parsing that decides
what a kernel allows is tested without that kernel. Captured trees may hold
`boot/config-<release>` instead of the compressed /proc/config.gz.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass

__all__ = ["SysRoot", "Mount", "KallsymsEntry"]


@dataclass(frozen=True)
class Mount:
    source: str
    mountpoint: str
    fstype: str
    options: frozenset[str]


@dataclass(frozen=True)
class KallsymsEntry:
    name: str
    kind: str  # the nm-style type letter: t/T text, d/D data, ...
    module: str | None


class SysRoot:
    """Reads kernel-provided files below `root` ("/" on a live system)."""

    def __init__(self, root: str = "/"):
        self.root = root
        self.live = os.path.realpath(root) == "/"

    def path(self, kernel_path: str) -> str:
        return os.path.join(self.root, kernel_path.lstrip("/"))

    def exists(self, kernel_path: str) -> bool:
        return os.path.exists(self.path(kernel_path))

    def isdir(self, kernel_path: str) -> bool:
        return os.path.isdir(self.path(kernel_path))

    def read_text(self, kernel_path: str) -> str | None:
        """The file's text, or None when it is missing or unreadable."""
        try:
            with open(self.path(kernel_path), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return None

    def listdir(self, kernel_path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(kernel_path)))
        except OSError:
            return []

    # --- parsed files ---------------------------------------------------

    def kernel_release(self) -> str:
        text = self.read_text("/proc/sys/kernel/osrelease")
        if text:
            return text.strip()
        version = self.read_text("/proc/version") or ""
        parts = version.split()
        return parts[2] if len(parts) > 2 else "unknown"

    def kernel_version(self) -> str | None:
        """``uname -v`` ("#1 SMP Debian 5.10.262-1 (2026-07-31)"): where Debian
        keeps the upstream version its ``uname -r`` leaves out."""
        text = self.read_text("/proc/sys/kernel/version")
        if text and text.strip():
            return text.strip()
        # /proc/version ends with uname -v, which starts at " #<build number>"
        version = self.read_text("/proc/version") or ""
        i = version.find(" #")
        return version[i + 1:].strip() if i >= 0 else None

    def version_signature(self) -> str | None:
        """Ubuntu's /proc/version_signature ("Ubuntu 5.15.0-91.101-generic 5.15.131")."""
        text = self.read_text("/proc/version_signature")
        return text.strip() if text else None

    def mounts(self) -> list[Mount]:
        out = []
        for line in (self.read_text("/proc/mounts") or "").splitlines():
            fields = line.split()
            if len(fields) >= 4:
                out.append(Mount(fields[0], _unescape(fields[1]), fields[2],
                                 frozenset(fields[3].split(","))))
        return out

    def kernel_config(self) -> tuple[dict[str, str], str | None]:
        """(CONFIG_* -> value, where it came from); ({}, None) when unknown."""
        release = self.kernel_release()
        candidates = ["/proc/config.gz", f"/boot/config-{release}"]
        for kernel_path in candidates:
            full = self.path(kernel_path)
            try:
                if kernel_path.endswith(".gz"):
                    with gzip.open(full, "rt", errors="replace") as f:
                        text = f.read()
                else:
                    with open(full, errors="replace") as f:
                        text = f.read()
            except OSError:
                continue
            return _parse_config(text), kernel_path
        return {}, None

    def kallsyms(self, wanted: set[str] | None = None) -> list[KallsymsEntry] | None:
        """Text symbols from /proc/kallsyms; with `wanted`, only those names
        and their compiler clones (name.constprop.N, .isra.N, .part.N, ...)."""
        text = self.read_text("/proc/kallsyms")
        if text is None:
            return None
        out = []
        if wanted is not None:
            # one regex pass over the text (a line loop over ~200k symbols
            # is most of doctor's time in a TCG guest)
            if not wanted:
                return out
            names = "|".join(re.escape(n) for n in sorted(wanted))
            pat = re.compile(rf"^\S+ ([tTwW]) ((?:{names})(?:\.\S*)?)(?:[ \t]+\[([^\]]+)\])?[ \t]*$", re.M)
            return [KallsymsEntry(m.group(2), m.group(1), m.group(3)) for m in pat.finditer(text)]
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 3 or fields[1] not in "tTwW":
                continue
            name = fields[2]
            if wanted is not None and name.split(".", 1)[0] not in wanted:
                continue
            module = fields[3].strip("[]") if len(fields) > 3 else None
            out.append(KallsymsEntry(name, fields[1], module))
        return out

    def tracing_dir(self) -> str | None:
        """Where tracefs is mounted, as a kernel path, or None."""
        for m in self.mounts():
            if m.fstype == "tracefs":
                return m.mountpoint
        for candidate in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
            if self.exists(candidate + "/events"):
                return candidate
        return None

    def proc_self_cgroup(self) -> dict[str, str]:
        """controller (or "" for v2, "name=systemd" ...) -> cgroup path."""
        out: dict[str, str] = {}
        for line in (self.read_text("/proc/self/cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            controllers = parts[1].split(",") if parts[1] else [""]
            for c in controllers:
                out[c] = parts[2]
        return out

    def swaps(self) -> list[str]:
        lines = (self.read_text("/proc/swaps") or "").splitlines()
        return [line.split()[0] for line in lines[1:] if line.strip()]

    def cmdline(self) -> list[str]:
        return (self.read_text("/proc/cmdline") or "").split()


def _parse_config(text: str) -> dict[str, str]:
    config = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            config[key] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-len(" is not set")]] = "n"
    return config


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))
