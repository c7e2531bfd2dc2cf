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


#: memory.stat fields exported, by their v2 names (bytes unless in EVENT_STATS)
STAT_BYTES = ("anon", "file", "kernel", "sock", "shmem", "file_mapped", "file_dirty", "file_writeback",
              "active_anon", "inactive_anon", "active_file", "inactive_file")
EVENT_STATS = ("workingset_refault_anon", "workingset_refault_file", "pgscan", "pgsteal")
#: v1 memory.stat names for the same things (mm/memcontrol-v1.c memcg1_stat_names)
V1_STAT_NAMES = {"rss": "anon", "cache": "file", "shmem": "shmem", "mapped_file": "file_mapped",
                 "dirty": "file_dirty", "writeback": "file_writeback", "active_anon": "active_anon",
                 "inactive_anon": "inactive_anon", "active_file": "active_file", "inactive_file": "inactive_file"}
#: 5.10 has no "kernel" line (it arrived in 5.18): it is the sum of these
KERNEL_PARTS = ("kernel_stack", "pagetables", "percpu", "sock", "slab", "vmalloc")


@dataclass
class CgroupSnapshot:
    usage: float | None = None
    limit: float | None = None
    failcnt: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)
    #: memory.stat items (STAT_BYTES in bytes, EVENT_STATS as counts)
    stat: dict = field(default_factory=dict)
    #: memory.pressure totals in seconds: {"some": s, "full": s} (v2 only)
    pressure: dict = field(default_factory=dict)
    swap_usage: float | None = None
    swap_events: dict = field(default_factory=dict)
    #: memory.high / memory.low / memory.min in bytes (+Inf for max; v2 only)
    protection: dict = field(default_factory=dict)


def merge(into: CgroupSnapshot, snap: CgroupSnapshot) -> None:
    """Adds `snap` to a label that sums several cgroups ("other"): sums,
    not one cgroup's numbers, so no limit and no high/low/min."""
    into.usage = (into.usage or 0) + (snap.usage or 0)
    into.limit = None
    into.protection = {}
    if snap.swap_usage is not None:
        into.swap_usage = (into.swap_usage or 0) + snap.swap_usage
    for mine, theirs in ((into.failcnt, snap.failcnt), (into.events, snap.events), (into.stat, snap.stat),
                         (into.pressure, snap.pressure), (into.swap_events, snap.swap_events)):
        for k, v in theirs.items():
            mine[k] = mine.get(k, 0) + v


def parse_keyed(text: str | None) -> dict:
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def parse_pressure(text: str | None) -> dict:
    """memory.pressure ("some avg10=0.00 avg60=0.00 avg300=0.00 total=123")
    → {"some": seconds, "full": seconds} (total is in microseconds)."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if parts and parts[0] in ("some", "full"):
            for kv in parts[1:]:
                if kv.startswith("total="):
                    try:
                        out[parts[0]] = int(kv[6:]) / 1e6
                    except ValueError:
                        pass
    return out


def stat_items(text: str | None, version: int) -> dict:
    """The exported memory.stat items, under their v2 names."""
    raw = parse_keyed(text)
    if version == 1:
        return {v2: raw[v1] for v1, v2 in V1_STAT_NAMES.items() if v1 in raw}
    out = {k: raw[k] for k in STAT_BYTES + EVENT_STATS if k in raw}
    if "kernel" not in raw and any(k in raw for k in KERNEL_PARTS):
        out["kernel"] = sum(raw.get(k, 0) for k in KERNEL_PARTS)
    if "workingset_refault_anon" not in raw and "workingset_refault" in raw:
        out["workingset_refault_file"] = raw["workingset_refault"]   # before 5.9: file only
    return out


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
            snap.events = parse_keyed(read("memory.events.local"))
            snap.pressure = parse_pressure(read("memory.pressure"))
            swap = read("memory.swap.current")
            snap.swap_usage = float(swap) if swap else None
            snap.swap_events = parse_keyed(read("memory.swap.events"))
            for name in ("high", "low", "min"):
                text = read(f"memory.{name}")
                if text:
                    snap.protection[name] = float("inf") if text.strip() == "max" else float(text)
        snap.stat = stat_items(read("memory.stat"), self.version)
        if self.version == 1:
            memsw = read("memory.memsw.usage_in_bytes")
            if memsw and snap.usage is not None:
                snap.swap_usage = max(0.0, float(memsw) - snap.usage)
        return snap
