"""Reads the watched cgroups' control files (the daemon's cgroupfs side).

One `CgroupfsReader` per memory hierarchy; `read(path)` returns a
`CgroupSnapshot` of one cgroup, or None when its directory is gone.
Values are bytes and counts as the kernel prints them; nothing here is
kept between calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["CgroupSnapshot", "CgroupfsReader", "UNLIMITED_V1", "merge"]

#: v1 prints an unlimited memory.limit_in_bytes as PAGE_COUNTER_MAX pages
#: in bytes (LONG_MAX rounded down to a page, x86_64)
UNLIMITED_V1 = 9223372036854771712


@dataclass
class CgroupSnapshot:
    usage: float | None = None
    limit: float | None = None
    failcnt: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)


def merge(into: CgroupSnapshot, snap: CgroupSnapshot) -> None:
    """Adds `snap` to a label that sums several cgroups ("other"): sums,
    not one cgroup's numbers, so no limit."""
    into.usage = (into.usage or 0) + (snap.usage or 0)
    into.limit = None
    for k, v in snap.failcnt.items():
        into.failcnt[k] = into.failcnt.get(k, 0) + v
    for k, v in snap.events.items():
        into.events[k] = into.events.get(k, 0) + v


class CgroupfsReader:
    """``mountpoint``: a real directory (SysRoot.path of the kernel path);
    ``version``: 1 or 2."""

    def __init__(self, mountpoint: str, version: int):
        self.mountpoint = mountpoint
        self.version = version

    def directory(self, path: str) -> str:
        return os.path.join(self.mountpoint, path.lstrip("/"))

    def read(self, path: str) -> CgroupSnapshot | None:
        base = self.directory(path)

        def read(name: str) -> str | None:
            try:
                with open(os.path.join(base, name)) as f:
                    return f.read()
            except OSError:
                return None

        if not os.path.isdir(base):
            return None
        snap = CgroupSnapshot()
        if self.version == 1:
            usage, limit = read("memory.usage_in_bytes"), read("memory.limit_in_bytes")
            snap.usage = float(usage) if usage else None
            if limit:
                snap.limit = float("inf") if int(limit) >= UNLIMITED_V1 else float(limit)
            for counter, name in (("memory", "memory.failcnt"), ("memsw", "memory.memsw.failcnt")):
                text = read(name)
                if text:
                    snap.failcnt[counter] = int(text)
        else:
            usage, limit = read("memory.current"), read("memory.max")
            snap.usage = float(usage) if usage else None
            if limit:
                snap.limit = float("inf") if limit.strip() == "max" else float(limit)
            for line in (read("memory.events.local") or "").splitlines():
                parts = line.split()
                if len(parts) == 2:
                    snap.events[parts[0]] = int(parts[1])
        return snap
