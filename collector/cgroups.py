"""Cgroup id -> path, the --cgroup filter and the bounded `cgroup` label.

The kernel names a memory cgroup in tracepoints and BPF by its cgroup id,
the id of the cgroup's kernfs node. Since Linux v5.5 (Tejun Heo's commit
"kernfs: convert kernfs_node->id from union kernfs_node_id to u64") that id
is also the inode number of the cgroup's directory in cgroupfs, and on
64-bit kernels it is never reused. So an id is resolved by walking the
hierarchy's mount (the v1 memory mount, or the cgroup2 mount) and indexing
directories by st_ino (seen on a 6.18 host, where the memcg:* tracepoints'
`id` equals the inode of the cgroup's directory in the v1 memory mount, and
in 6.1 and 6.12 guests, where `memcg->css.cgroup->kn->id` read by the BPF
side does).

`CgroupResolver` caches the walk, remembers misses for a while, and walks
again at most once per `rescan_interval` seconds, so a flood of events from
unknown (usually already removed) cgroups costs at most one walk per
interval. Each walk replaces the index, so ids of removed cgroups drop out
and memory follows the number of live cgroups, not of cgroups ever seen.

All reads of /proc go through `memcgscope.probes.sysroot.SysRoot`.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from memcgscope.probes.sysroot import SysRoot

__all__ = [
    "CgroupError", "MemoryHierarchy", "find_memory_hierarchy", "CgroupResolver", "resolver_for",
    "matches", "CgroupLimiter", "OTHER",
]

log = logging.getLogger(__name__)

OTHER = "other"

# errnos that mean "this directory went away while we looked"
_VANISHED = {errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.ENODEV}


class CgroupError(Exception):
    """A one-line message: what is wrong, where, and the fix."""


# --- the memory hierarchy -----------------------------------------------------

@dataclass(frozen=True)
class MemoryHierarchy:
    version: int          # 1 or 2
    mountpoint: str       # kernel path of the mount, e.g. /sys/fs/cgroup/memory
    own_cgroup: str       # this process's memory cgroup, relative to the mount ("/" for the root)


def find_memory_hierarchy(sysroot: SysRoot | None = None) -> MemoryHierarchy:
    """Where the memory controller is mounted and which cgroup we are in.

    A v1 mount with the `memory` option wins: the controller can be bound to
    one hierarchy only, so when v1 has it, cgroup2 does not. Otherwise the
    first cgroup2 mount whose root `cgroup.controllers` lists `memory`.
    Paths from /proc/self/cgroup are relative to our cgroup namespace root,
    which is what the mount shows inside that namespace.
    """
    sysroot = sysroot or SysRoot("/")
    mounts = sysroot.mounts()
    own = sysroot.proc_self_cgroup()
    for m in mounts:
        if m.fstype == "cgroup" and "memory" in m.options:
            return MemoryHierarchy(1, m.mountpoint, _own(own, "memory", m.mountpoint))
    for m in mounts:
        if m.fstype == "cgroup2":
            controllers = (sysroot.read_text(f"{m.mountpoint}/cgroup.controllers") or "").split()
            if "memory" in controllers:
                return MemoryHierarchy(2, m.mountpoint, _own(own, "", m.mountpoint))
    raise CgroupError("no memory cgroup hierarchy in /proc/mounts (neither a v1 cgroup mount with 'memory' "
                      "nor cgroup2 with the memory controller); mount one, e.g. "
                      "mount -t cgroup2 none /sys/fs/cgroup — see 'memcgscope doctor'")


def _own(own: dict[str, str], key: str, mountpoint: str) -> str:
    path = own.get(key)
    if path is None:
        where = "'memory' line" if key else "'0::' line"
        raise CgroupError(f"/proc/self/cgroup has no {where} although {mountpoint} is mounted; "
                          "run in a process that belongs to the memory hierarchy")
    return path or "/"


# --- id -> path -----------------------------------------------------------------

class CgroupResolver:
    """Resolves cgroup ids to paths below one cgroupfs mount.

    `mountpoint` is a real directory (use `SysRoot.path()` on a kernel path).
    `rescan_interval`: at least this many seconds between two full walks.
    `negative_ttl`: how long an id not found in a walk stays "not found"
    without another walk. `negative_max`: cap on remembered misses (LRU).
    `clock`: monotonic seconds, injectable for tests.
    """

    def __init__(self, mountpoint: str, rescan_interval: float = 5.0, negative_ttl: float = 60.0,
                 negative_max: int = 4096, clock: Callable[[], float] = time.monotonic):
        if not os.path.isdir(mountpoint):
            raise CgroupError(f"{mountpoint}: not a directory; give the mount point of the memory "
                              "cgroup hierarchy (see 'memcgscope doctor')")
        self.mountpoint = mountpoint
        self.rescan_interval = rescan_interval
        self.negative_ttl = negative_ttl
        self.negative_max = negative_max
        self.clock = clock
        self._paths: dict[int, str] = {}
        self._by_path: dict[str, int] | None = None
        self._negative: OrderedDict[int, float] = OrderedDict()  # id -> expiry
        self._last_scan: float | None = None
        self._lock = threading.Lock()
        self.scans = 0  # full walks done, exported by the collector and used by tests

    def path(self, cgroup_id: int) -> str | None:
        """The cgroup's path relative to the mount ("/" for the root), or None
        when no cgroup with this id exists (or it is not known yet and the
        rescan budget is spent)."""
        with self._lock:
            found = self._paths.get(cgroup_id)
            if found is not None:
                return found
            now = self.clock()
            expiry = self._negative.get(cgroup_id)
            if expiry is not None:
                if expiry > now:
                    self._negative.move_to_end(cgroup_id)
                    return None
                del self._negative[cgroup_id]
            if self._last_scan is not None and now - self._last_scan < self.rescan_interval:
                return None  # unknown, but walking again now would let a flood of misses spin
            self._scan(now)
            found = self._paths.get(cgroup_id)
            if found is None:
                self._negative[cgroup_id] = now + self.negative_ttl
                while len(self._negative) > self.negative_max:
                    self._negative.popitem(last=False)
            return found

    def rescan(self) -> None:
        """Walk now, regardless of the rate limit (e.g. at start-up)."""
        with self._lock:
            self._scan(self.clock())

    def ancestors(self, cgroup_id: int) -> list[int] | None:
        """Ids of the cgroup's ancestors, parent first, root last; None when
        the cgroup is unknown. (The cross-check uses it to tell whether a
        failing counter's cgroup is above the charged one.)"""
        path = self.path(cgroup_id)
        if path is None:
            return None
        with self._lock:
            by_path = self._by_path
            if by_path is None:
                by_path = self._by_path = {p: i for i, p in self._paths.items()}
        out = []
        while path != "/":
            path = path.rsplit("/", 1)[0] or "/"
            parent = by_path.get(path)
            if parent is None:
                return None  # an ancestor went away mid-walk: unknown
            out.append(parent)
        return out

    def known(self) -> dict[int, str]:
        """A copy of the current index (id -> path)."""
        with self._lock:
            return dict(self._paths)

    def negative_size(self) -> int:
        return len(self._negative)

    def _scan(self, now: float) -> None:
        self._last_scan = now
        self.scans += 1
        try:
            root_ino = os.stat(self.mountpoint).st_ino
        except OSError as e:
            # Keep the old index: a transient failure must not forget every cgroup.
            log.warning("cannot read the cgroup mount %s (%s); keeping %d known cgroups",
                        self.mountpoint, e.strerror, len(self._paths))
            return
        paths = {root_ino: "/"}
        stack = [(self.mountpoint, "")]
        while stack:
            directory, rel = stack.pop()
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        try:
                            if not entry.is_dir(follow_symlinks=False):
                                continue
                            ino = entry.stat(follow_symlinks=False).st_ino
                        except OSError:
                            continue  # removed between readdir and stat, or unreadable: skip it alone
                        child = f"{rel}/{entry.name}"
                        paths[ino] = child
                        stack.append((entry.path, child))
            except OSError as e:
                if e.errno in _VANISHED:
                    continue  # a cgroup removed while we walked: not an error
                log.debug("skipping %s while walking cgroups: %s", directory, e)
                continue
        self._paths = paths
        self._by_path = None  # rebuilt on demand by ancestors()
        for ino in paths:
            self._negative.pop(ino, None)


def resolver_for(sysroot: SysRoot | None = None, **kwargs) -> tuple[MemoryHierarchy, CgroupResolver]:
    """The memory hierarchy and a resolver over its mount; `kwargs` go to
    CgroupResolver (rescan_interval, negative_ttl, negative_max, clock)."""
    sysroot = sysroot or SysRoot("/")
    h = find_memory_hierarchy(sysroot)
    return h, CgroupResolver(sysroot.path(h.mountpoint), **kwargs)


# --- the --cgroup filter -----------------------------------------------------------

def matches(path: str, globs: Iterable[str]) -> bool:
    """Whether a cgroup path passes `--cgroup GLOB` filters (any of them).

    No globs means every cgroup. A glob is matched with fnmatch against the
    whole path relative to the mount; a glob without a leading "/" is
    anchored at the root anyway. `*` also matches "/", so "/system.slice/*"
    takes every descendant.
    """
    globs = list(globs)
    if not globs:
        return True
    for glob in globs:
        if not glob.startswith("/"):
            glob = "/" + glob
        if fnmatch.fnmatchcase(path, glob):
            return True
    return False


# --- the bounded label ------------------------------------------------------------------

class CgroupLimiter:
    """Keeps the `cgroup` label bounded: the first `max_cgroups` distinct
    cgroups keep their path as the label; any more are labelled "other".

    A removed cgroup keeps its slot for `grace` seconds after `removed()`,
    because its last events may still be in the ring buffer; then the slot is
    free for a new cgroup. `released()` returns the paths whose slots were
    freed since the last call, so the caller can drop their series.
    `max_cgroups=None` means no limit.
    """

    def __init__(self, max_cgroups: int | None, grace: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_cgroups is not None and max_cgroups < 0:
            raise ValueError(f"max_cgroups {max_cgroups}: must be 0 or more; give the largest number "
                             "of cgroups to label by path")
        self.max_cgroups = max_cgroups
        self.grace = grace
        self.clock = clock
        self._slots: set[str] = set()
        self._leaving: OrderedDict[str, float] = OrderedDict()  # path -> when its slot frees
        self._released: list[str] = []
        self._lock = threading.Lock()

    def label(self, path: str) -> str:
        with self._lock:
            if self._leaving:     # nothing to expire: no clock read (once per episode)
                self._expire()
            if path in self._slots:
                return path
            if self.max_cgroups is None or len(self._slots) < self.max_cgroups:
                self._slots.add(path)
                return path
            return OTHER

    def removed(self, path: str) -> None:
        """The cgroup at `path` is gone; free its slot after the grace period."""
        with self._lock:
            if path in self._slots:
                self._leaving[path] = self.clock() + self.grace
                self._leaving.move_to_end(path)

    def released(self) -> list[str]:
        with self._lock:
            self._expire()
            out, self._released = self._released, []
            return out

    def tracked(self) -> set[str]:
        with self._lock:
            self._expire()
            return set(self._slots)

    def _expire(self) -> None:
        now = self.clock()
        # Deadlines are added in time order with one grace, so the front is
        # always the next to expire.
        while self._leaving:
            path, deadline = next(iter(self._leaving.items()))
            if deadline > now:
                break
            del self._leaving[path]
            self._slots.discard(path)
            self._released.append(path)
