"""The collector's main loop: episodes in, checks and metrics out.

`Daemon` owns a probe session, resolves cgroup ids to paths, filters and
bounds the `cgroup` label, replays each episode through the cross-checker,
counts what it saw, writes divergences as JSON lines, and at a fixed
interval reads cgroupfs for the watched cgroups (gauges and the aggregate
checks) and prunes the in-kernel maps of removed cgroups. The Prometheus
side (metrics.MemcgCollector) reads it at scrape time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .cgroups import CgroupLimiter, CgroupResolver, matches

log = logging.getLogger(__name__)

__all__ = ["Daemon", "Counts", "CgroupSnapshot", "profile_for_kernel", "DivergenceLog"]

PAGE = os.sysconf("SC_PAGE_SIZE")
UNLIMITED_V1 = 9223372036854771712


def profile_for_kernel(release: str) -> tuple[str, str | None]:
    """(model profile, warning) for a kernel release: the exact family when
    the model has it, else the nearest older one, said in the warning."""
    from memcgscope.model.profiles import PROFILES, get_profile
    try:
        return get_profile(release).name, None
    except ValueError:
        pass
    try:
        major, minor = (int(x) for x in release.split("-")[0].split("+")[0].split(".")[:2])
    except ValueError:
        return "6.18", f"kernel {release!r} not understood; checking against profile 6.18 (use --profile)"
    known = sorted((tuple(int(x) for x in name.split(".")[:2]), name) for name in PROFILES if name.count(".") == 1)
    older = [name for ver, name in known if ver <= (major, minor)]
    chosen = older[-1] if older else known[0][1]
    return chosen, (f"no model profile for kernel {release}; checking against {chosen}, the nearest older one "
                    f"(use --profile to choose)")


@dataclass
class CgroupSnapshot:
    usage: float | None = None
    limit: float | None = None
    failcnt: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)


class Counts:
    def __init__(self):
        self.episodes: Counter = Counter()
        self.checks: Counter = Counter()
        self.divergences: Counter = Counter()
        self.unresolved = 0
        self.total_episodes = 0


class DivergenceLog:
    """JSON lines, one divergence with its episode per line; rotated once
    (FILE.1) above `max_bytes` so a flood cannot fill the disk."""

    def __init__(self, path: str | None, max_bytes: int = 64 << 20):
        self.path = path
        self.max_bytes = max_bytes
        self._f = None
        self.written = 0
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self._f = open(path, "a")

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.written += 1
        if self._f.tell() > self.max_bytes:
            self._f.close()
            os.replace(self.path, self.path + ".1")
            self._f = open(self.path, "a")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Daemon:
    def __init__(self, session, *, resolver: CgroupResolver, cgroup_version: int, mountpoint: str,
                 globs: list[str] | None = None, max_cgroups: int | None = 1000, grace: float = 60.0,
                 checker=None, aggregate_checker=None, divergence_log: DivergenceLog | None = None,
                 interval: float = 15.0, profile: str | None = None, kernel: str = "", version: str = "",
                 clock=time.monotonic):
        self.session = session
        self.resolver = resolver
        self.cgroup_version = cgroup_version
        self.mountpoint = mountpoint
        self.globs = list(globs or [])
        self.limiter = CgroupLimiter(max_cgroups, grace=grace, clock=clock)
        self.checker = checker
        self.aggregate_checker = aggregate_checker
        self.divergence_log = divergence_log or DivergenceLog(None)
        self.interval = interval
        self.profile = profile
        self.kernel = kernel
        self.version = version
        self.clock = clock
        self.counts = Counts()
        self._snapshot: dict[str, CgroupSnapshot] = {}
        self._raw_snapshot: dict[str, CgroupSnapshot] = {}
        self._watched: dict[int, str] = {}       # cgid -> path, cgroups seen in maps or episodes
        self._unresolved: list[dict] = []        # episodes waiting for the next cgroup walk
        self._unseen_since: dict[int, float] = {}  # cgid -> when it stopped resolving
        self._lock = threading.Lock()
        self.last_tick = 0.0
        self.grace = grace

    # --- facts for metrics and the landing page ---------------------------------

    @property
    def mode(self) -> str | None:
        return getattr(self.session, "mode", None)

    @property
    def cgroup_version_name(self) -> str:
        return f"v{self.cgroup_version}"

    def probe_status(self):
        return self.session.status()

    def lost(self) -> list[int]:
        return self.session.lost()

    def contexts_lost(self) -> int:
        counter = getattr(self.session, "contexts_lost", None)
        return counter() if counter else 0

    def aggregates(self):
        try:
            return self.session.aggregates()
        except Exception as e:  # a closed session during shutdown
            log.debug("aggregates unavailable: %s", e)
            return None

    def bpf_program_stats(self) -> dict[str, tuple[int, int]]:
        stats = getattr(self.session, "program_stats", None)
        return stats() if stats else {}

    def path_for(self, cgid: int) -> str | None:
        if cgid == 0:
            return "/"  # a charge that never reached a memcg (root bypass)
        return self.resolver.path(cgid)

    def label_for(self, cgid: int) -> str | None:
        """The `cgroup` label for an id: None when it does not resolve (yet)
        or is filtered out by --cgroup."""
        path = self.path_for(cgid)
        if path is None or (self.globs and not matches(path, self.globs)):
            return None
        self._watched[cgid] = path
        return self.limiter.label(path)

    def cgroupfs_snapshot(self) -> dict[str, CgroupSnapshot]:
        with self._lock:
            return dict(self._snapshot)

    # --- episodes -----------------------------------------------------------------

    # episodes of cgroups created since the last walk wait for the next
    # tick's walk instead of being dropped; bounded
    MAX_PENDING = 10000

    def handle(self, episode, *, retry: bool = False) -> None:
        d = episode.to_json() if hasattr(episode, "to_json") else episode
        if not retry:
            self.counts.total_episodes += 1
        cgid = d["cgroup_id"]
        path = self.path_for(cgid)
        if path is None:
            if retry or len(self._unresolved) >= self.MAX_PENDING:
                self.counts.unresolved += 1
            else:
                self._unresolved.append(d)
            return
        if self.globs and not matches(path, self.globs):
            return
        self._watched[cgid] = path  # a single dict store: atomic for the scrape thread
        label = self.limiter.label(path)
        self.counts.episodes[(label, d["kind"])] += 1
        d["cgroup"] = path
        if self.checker is None:
            return
        result = self.checker.check(d)
        if self.aggregate_checker is not None:
            # what the replay implied (counter failures, events, kills) feeds
            # the interval's aggregate check: each episode is replayed once
            self.aggregate_checker.observe(result)
        self._record(result, d)

    def _record(self, result, episode) -> None:
        """Counts a check result and logs each divergence with its episode."""
        for check, verdict in result.checks:
            self.counts.checks[(check, verdict)] += 1
        for div in result.divergences:
            self.counts.divergences[(div.check, div.reason)] += 1
            self.divergence_log.write({"type": "divergence", "check": div.check, "reason": div.reason,
                                       "detail": div.detail, "kernel": self.kernel, "profile": self.profile,
                                       "mode": self.mode, "time_unix": time.time(),
                                       "episode": episode if episode is not None else div.episode})

    # --- the periodic work -----------------------------------------------------------

    def tick(self) -> None:
        """cgroupfs gauges, aggregate checks, and forgetting removed cgroups."""
        self.last_tick = self.clock()
        if self._unresolved:
            pending, self._unresolved = self._unresolved, []
            self.resolver.rescan()
            for d in pending:
                self.handle(d, retry=True)
        with self._lock:
            watched = dict(self._watched)
        snapshot: dict[str, CgroupSnapshot] = {}
        raw: dict[str, CgroupSnapshot] = {}
        gone = []
        for cgid, path in watched.items():
            snap = self._read_cgroupfs(path)
            if snap is None:
                gone.append((cgid, path))
                continue
            raw[path] = snap
            label = self.limiter.label(path)
            if label in snapshot and label != path:
                merged = snapshot[label]  # "other": sums, not a single cgroup's numbers
                merged.usage = (merged.usage or 0) + (snap.usage or 0)
                merged.limit = None
                for k, v in snap.failcnt.items():
                    merged.failcnt[k] = merged.failcnt.get(k, 0) + v
                for k, v in snap.events.items():
                    merged.events[k] = merged.events.get(k, 0) + v
            else:
                snapshot[label] = CgroupSnapshot(snap.usage, snap.limit, dict(snap.failcnt), dict(snap.events))
        self._aggregate_checks(raw, watched)
        now = self.clock()
        for cgid, path in gone:
            first = self._unseen_since.setdefault(cgid, now)
            if now - first >= self.grace:
                self.limiter.removed(path)
                with self._lock:
                    self._watched.pop(cgid, None)
                self._unseen_since.pop(cgid, None)
                prune = getattr(self.session, "forget_cgroup", None)
                if prune:
                    prune(cgid)
        self.limiter.released()
        with self._lock:
            self._snapshot = snapshot
            self._raw_snapshot = raw

    def _aggregate_checks(self, raw: dict[str, CgroupSnapshot], watched: dict[int, str]) -> None:
        if self.aggregate_checker is None or self.checker is None:
            return
        try:
            # the interval's episodes were observed one by one in handle()
            results = self.aggregate_checker.check(raw, watched, None, self.aggregates())
        except Exception as e:  # a checker bug must not stop the collector; it is counted
            log.warning("aggregate check failed: %s", e)
            self.counts.checks[("aggregate", "error")] += 1
            return
        self._record(results, None)

    def _read_cgroupfs(self, path: str) -> CgroupSnapshot | None:
        base = os.path.join(self.mountpoint, path.lstrip("/"))

        def read(name: str) -> str | None:
            try:
                with open(os.path.join(base, name)) as f:
                    return f.read()
            except OSError:
                return None

        if not os.path.isdir(base):
            return None
        snap = CgroupSnapshot()
        if self.cgroup_version == 1:
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
            text = read("memory.events.local") or ""
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2:
                    snap.events[parts[0]] = int(parts[1])
        return snap

    # --- the loop -----------------------------------------------------------------

    def run(self, stop: threading.Event, poll_ms: int = 200) -> None:
        self.tick()
        while not stop.is_set():
            for episode in self.session.poll(timeout_ms=poll_ms):
                self.handle(episode)
            if self.clock() - self.last_tick >= self.interval:
                self.tick()
        for episode in self.session.finish():
            self.handle(episode)
