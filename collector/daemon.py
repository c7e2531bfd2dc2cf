"""The collector's main loop: episodes in, checks and metrics out.

`Daemon` owns the loop and nothing the scrape thread writes to.  Its parts:

* the probe session (probes.session.Session): episodes and the BPF maps;
* the watch list (watch.WatchList): cgroup id -> path -> bounded label;
* the check pipeline (pipeline.CheckPipeline): every episode checked;
* the cgroupfs reader (cgroupfs.CgroupfsReader): gauges and the
  aggregate checks' counters, once per interval;
* its own episode counts per label.

At each `tick` it publishes a `View` (labels, cgroupfs snapshot); the
Prometheus side (metrics.MemcgCollector) reads the published view, copies
of the counters taken under their locks, and the BPF maps through the
session's lock.  A scrape changes no state.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from .cgroupfs import CgroupfsReader, CgroupSnapshot, merge
from .identity import Identity, NodeNames, identify
from .pipeline import CheckPipeline, PipelineCounts
from .watch import WatchList

log = logging.getLogger(__name__)

__all__ = ["Daemon", "View", "DivergenceLog", "Facts"]


@dataclass(frozen=True)
class Facts:
    """What build_info and the landing page say about this run."""
    version: str = ""
    kernel: str = ""
    upstream: str | None = None
    profile: str | None = None
    profile_exact: bool = True
    cgroup_version: int = 2


@dataclass(frozen=True)
class View:
    """What a scrape reads; replaced whole at each tick."""
    labels: Mapping[int, str] = field(default_factory=dict)                # cgid -> label
    cgroupfs: Mapping[str, CgroupSnapshot] = field(default_factory=dict)   # label -> snapshot
    identities: Mapping[str, Identity] = field(default_factory=dict)       # label -> workload


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
    # episodes of cgroups created since the last walk wait for the next
    # tick's walk instead of being dropped; bounded
    MAX_PENDING = 10000

    def __init__(self, session, *, watch: WatchList, reader: CgroupfsReader,
                 pipeline: CheckPipeline | None = None, divergence_log: DivergenceLog | None = None,
                 interval: float = 15.0, facts: Facts | None = None, clock=time.monotonic,
                 task_alive=None, names: NodeNames | None = None):
        self.session = session
        self.watch = watch
        self.reader = reader
        self.pipeline = pipeline
        self.divergence_log = divergence_log or DivergenceLog(None)
        if pipeline is not None and pipeline.on_divergence is None:
            pipeline.on_divergence = self._log_divergence
        self.interval = interval
        self.facts = facts or Facts()
        self.clock = clock
        self.task_alive = task_alive or _tid_alive
        self.names = names if names is not None else NodeNames()
        self._lock = threading.Lock()           # guards the counters below
        self._episodes: Counter = Counter()     # (label, kind) -> n
        self._unresolved = 0
        self._total = 0
        self._pending: list[dict] = []          # episodes waiting for the next cgroup walk
        self._view = View()
        self.last_tick = 0.0
        self.pruned = 0                         # BPF map entries dropped (removed or unwatched)

    # --- what scrapes read (any thread) ----------------------------------------

    @property
    def mode(self) -> str | None:
        return getattr(self.session, "mode", None)

    def view(self) -> View:
        with self._lock:
            return self._view

    def episode_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._episodes)

    def unresolved(self) -> int:
        with self._lock:
            return self._unresolved

    def total_episodes(self) -> int:
        with self._lock:
            return self._total

    def check_counts(self) -> PipelineCounts:
        return self.pipeline.counts() if self.pipeline is not None else PipelineCounts()

    def aggregates(self):
        """The BPF maps, read through the session's lock; None when closed."""
        try:
            return self.session.aggregates()
        except Exception as e:  # a closed session during shutdown
            log.debug("aggregates unavailable: %s", e)
            return None

    # --- episodes (main loop) -------------------------------------------------------

    def handle(self, episode, *, retry: bool = False) -> None:
        d = episode if type(episode) is dict else episode.to_json()
        path, label = self.watch.observe(d["cgroup_id"])
        # one lock per episode: the total and, when it is watched, its count
        with self._lock:
            if not retry:
                self._total += 1
            if path is None:
                if retry or len(self._pending) >= self.MAX_PENDING:
                    self._unresolved += 1
                else:
                    self._pending.append(d)
                return
            if label is None:
                return   # --cgroup does not watch it
            self._episodes[(label, d["kind"])] += 1
        d["cgroup"] = path
        if self.pipeline is not None:
            self.pipeline.feed(d)

    def _log_divergence(self, div, episode) -> None:
        self.divergence_log.write({"type": "divergence", "check": div.check, "reason": div.reason,
                                   "detail": div.detail, "kernel": self.facts.kernel,
                                   "profile": self.facts.profile, "mode": self.mode,
                                   "time_unix": time.time(), "episode": episode})

    # --- the periodic work (main loop) ------------------------------------------------

    def tick(self) -> None:
        """Learn the cgroups the maps mention, read cgroupfs, run the
        aggregate checks, forget removed and unwatched cgroups, publish."""
        self.last_tick = self.clock()
        if self._pending:
            pending, self._pending = self._pending, []
            self.watch.resolver.rescan()
            for d in pending:
                self.handle(d, retry=True)
        aggregates = self.aggregates()
        if aggregates is not None:
            for cgid in aggregates.cgroups:
                self.watch.observe(cgid)
        watched = self.watch.watched()
        raw: dict[str, CgroupSnapshot] = {}
        gone = []
        for cgid, path in watched.items():
            snap = self.reader.read(path)
            if snap is None:
                gone.append((cgid, path))
            else:
                raw[path] = snap
        if self.pipeline is not None:
            checked = {c: p for c, p in watched.items() if p in raw}
            self.pipeline.check_aggregates(raw, checked, aggregates, busy=self._busy(checked))
        removed, released = self.watch.sweep(gone)
        forget = {cgid for cgid, _ in removed} | self.watch.take_excluded()
        if forget:
            prune = getattr(self.session, "forget_cgroups", None)
            if prune is not None:
                self.pruned += prune(forget)
        forget_tasks = getattr(self.session, "forget_tasks", None)
        if forget_tasks is not None:
            forget_tasks(self.task_alive)
        labels = self.watch.publish()
        by_label: dict[str, CgroupSnapshot] = {}
        for cgid, path in self.watch.watched().items():
            snap = raw.get(path)
            if snap is None:
                continue
            label = labels[cgid]
            if label in by_label and label != path:
                merge(by_label[label], snap)
            else:
                by_label[label] = CgroupSnapshot(snap.usage, snap.limit, dict(snap.failcnt), dict(snap.events),
                                                 dict(snap.stat), dict(snap.pressure), snap.swap_usage,
                                                 dict(snap.swap_events), dict(snap.protection))
        self.names.refresh()
        identities = {labels[cgid]: identify(path, self.names)
                      for cgid, path in self.watch.watched().items() if labels.get(cgid) == path}
        with self._lock:
            if released:
                gone_labels = set(released)
                self._episodes = Counter({k: n for k, n in self._episodes.items() if k[0] not in gone_labels})
            self._view = View(labels, by_label, identities)

    def _busy(self, watched: dict) -> set:
        """Watched cgroups at or above a cgroup with a charge or limit write
        in progress (a limit's ``max`` events are raised at the failing
        ancestor's level): their aggregate window stays open until it ends.
        An episode on a cgroup whose path is unknown (removed since: a
        task killed in its charge, its scratch cgroup gone) holds nothing:
        holding every window for it stopped all aggregate checks in a
        guest's probe workload."""
        in_flight = getattr(self.session, "in_flight", None)
        open_ids = in_flight() if in_flight is not None else set()
        if not open_ids:
            return set()
        paths = []
        for cid in open_ids:
            path = watched.get(cid) or self.watch.resolver.path(cid)
            if path is not None:
                paths.append(path)
        return {cid for cid, w in watched.items()
                if any(p == w or w == "/" or p.startswith(w.rstrip("/") + "/") for p in paths)}

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


def _tid_alive(tid: int) -> bool:
    # a thread of any process: /proc/<tid> exists for every thread id
    return os.path.exists(f"/proc/{tid}")
