"""Which cgroups the collector watches, and the `cgroup` label of each.

The main loop is the only writer: it `observe`s every cgroup id it meets
(in episodes, and in the BPF maps at each tick), `sweep`s the ones whose
directory went away, and `publish`es an immutable id -> label map.  A
Prometheus scrape only reads `labels()`; it never resolves, labels or
watches anything (a scrape changes no state).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .cgroups import CgroupLimiter, CgroupResolver, matches

__all__ = ["WatchList"]


class WatchList:
    """``resolver``: cgroup id -> path; ``globs``: --cgroup filters;
    ``max_cgroups``/``grace``: the bounded label (CgroupLimiter)."""

    MAX_REMOVED = 65536

    def __init__(self, resolver: CgroupResolver, *, globs: Iterable[str] = (), max_cgroups: int | None = 1000,
                 grace: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.resolver = resolver
        self.globs = list(globs)
        self.grace = grace
        self.clock = clock
        self.limiter = CgroupLimiter(max_cgroups, grace=grace, clock=clock)
        self._watched: dict[int, str] = {}        # cgid -> path
        self._excluded: set[int] = set()          # resolved, not matching --cgroup
        self._gone_since: dict[int, float] = {}   # cgid -> when its directory went
        # swept ids: cgroup ids are never reused (64-bit kernfs ids), so an id
        # met again (a late event, a map entry not yet pruned) stays removed
        self._removed: OrderedDict[int, None] = OrderedDict()
        self._published: Mapping[int, str] = MappingProxyType({})
        self._lock = threading.Lock()

    def path_for(self, cgid: int) -> str | None:
        if cgid == 0:
            return "/"   # a charge that never reached a memcg (root bypass)
        return self.resolver.path(cgid)

    def observe(self, cgid: int) -> tuple[str | None, str | None]:
        """(path, label) of a cgroup id, watching it from now on; (path,
        None) when --cgroup filters it out; (None, None) when the id does not
        resolve (yet)."""
        if cgid in self._removed:
            return None, None
        path = self.path_for(cgid)
        if path is None:
            return None, None
        if self.globs and not matches(path, self.globs):
            self._excluded.add(cgid)
            return path, None
        self._watched[cgid] = path
        return path, self.limiter.label(path)

    def watched(self) -> dict[int, str]:
        return dict(self._watched)

    def take_excluded(self) -> set[int]:
        """Ids seen but filtered out since the last call: their BPF map
        entries should go (they would fill the maps otherwise)."""
        out, self._excluded = self._excluded, set()
        return out

    def sweep(self, gone: Iterable[tuple[int, str]]) -> tuple[list[tuple[int, str]], list[str]]:
        """``gone``: watched (id, path) whose directory is missing now.  Ids
        missing for ``grace`` seconds are dropped → (removed ids, labels
        whose slot was freed, so their series can go)."""
        now = self.clock()
        removed = []
        for cgid, path in gone:
            if cgid not in self._gone_since:
                self._gone_since[cgid] = now
                self.limiter.removed(path)   # its label slot frees after the same grace
            if now - self._gone_since[cgid] >= self.grace:
                self._watched.pop(cgid, None)
                self._gone_since.pop(cgid, None)
                self._removed[cgid] = None
                while len(self._removed) > self.MAX_REMOVED:
                    self._removed.popitem(last=False)
                removed.append((cgid, path))
        return removed, self.limiter.released()

    def publish(self) -> Mapping[int, str]:
        """Makes the current labels what scrapes see."""
        labels = MappingProxyType({cgid: self.limiter.label(path) for cgid, path in self._watched.items()})
        with self._lock:
            self._published = labels
        return labels

    def labels(self) -> Mapping[int, str]:
        """The published id -> label map (any thread)."""
        with self._lock:
            return self._published
