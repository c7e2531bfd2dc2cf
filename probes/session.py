"""A probing session: pick a mode, load, attach, stream episodes, read the
in-kernel aggregates, detach.

    with Session(mode=None) as s:            # None: the best usable mode
        for probe in s.status(): ...
        while running:
            for episode in s.poll(timeout_ms=200): ...
        aggregates = s.aggregates()

Loading runs in a short-lived child (probes/loader.py: detect, build, bcc
compile and load), which hands the map and program fds over and exits; this
process never imports bcc, so LLVM is never mapped here. It attaches the
programs itself (probes/attach.py), reads maps through bpf(2)
(probes/maps.py) and the ring buffer through mmap (probes/ringbuf.py).

Closing detaches everything; `Session` is a context manager and `close()`
is idempotent, so normal exit, an exception, SIGINT and SIGTERM (turned into
an exception by the caller, see collector/record_cmd.py) all detach. Every
attachment is an fd of this process: if it dies, the kernel detaches them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

from . import attach as _attach
from . import loader as _loader
from .assembly import EpisodeAssembler
from .bpfsys import prog_run_stats
from .detect import tracefs_mounted
from .episodes import CALLERS, EV, EVENT_SIZE, LIMIT_KINDS, Event, Visibility, decode_fields, visibility
from .maps import BpfMap, Layout, MapError
from .program import COUNTED_MAPS, Program, ProbeStatus
from .ringbuf import RingBuffer, RingBufferError
from .sysroot import SysRoot

__all__ = ["Session", "SessionError", "Aggregates", "CgroupAggregate"]

# tasks sleeping in reclaim hold a kretprobe instance each; a return missed
# when all are taken is handled by the BPF side (see on_charge_enter).
# 0: the kprobe PMU's default (max(10, 2 * CPUs)) and no tracefs event
# (probes/attach.py says why a maxactive needs one)
KRETPROBE_MAXACTIVE = int(os.environ.get("MEMCGSCOPE_KRETPROBE_MAXACTIVE", "512"))


class SessionError(Exception):
    """One line: what failed, where, and what to do."""


@dataclass
class CgroupAggregate:
    charges: dict = field(default_factory=dict)       # calls pages slow fail_enomem fail_eintr fail_other ns
    charge_latency: dict = field(default_factory=dict)  # log2(ns) slot -> count
    page_charges: dict = field(default_factory=dict)
    reclaim: dict = field(default_factory=dict)        # caller -> calls asked freed ns
    reclaim_latency: dict = field(default_factory=dict)  # caller -> {slot: count}
    limit_writes: dict = field(default_factory=dict)   # (file, ret) -> count
    oom: dict = field(default_factory=dict)            # invocations returned_true kills (as trigger) victims
    high: dict = field(default_factory=dict)           # memory.high handler: calls sleep_ns reclaim_ns
    high_latency: dict = field(default_factory=dict)   # log2(sleep ns) slot -> count
    counter_failures: dict = field(default_factory=dict)  # "memory"/"memsw" -> count
    memcg_events: dict = field(default_factory=dict)   # item -> (count, sum)
    memcg_state: dict = field(default_factory=dict)


@dataclass
class Aggregates:
    cgroups: dict[int, CgroupAggregate]
    lost_per_cpu: list[int]


#: events that open or close a charge or limit-write episode (Session.in_flight)
_EPISODE_EDGES = frozenset({EV.CHARGE_ENTER, EV.CHARGE_EXIT, EV.LIMIT_ENTER, EV.LIMIT_EXIT})


class Session:
    #: ring-buffer records read per poll() at most (see _consume)
    CONSUME_LIMIT = 8192

    def __init__(self, mode: str | None = None, *, sysroot: SysRoot | None = None,
                 report=None, max_cgroups: int = 4096, ringbuf_pages: int = 256,
                 use_perf_buffer: bool | None = None, on_episode=None, memcg_state: bool = False,
                 latency_sample: int = 64, without=()):
        self.requested_mode = mode
        self.sysroot = sysroot or SysRoot("/")
        self.report = report
        self.max_cgroups = max_cgroups
        self.ringbuf_pages = ringbuf_pages
        # every kernel memcgscope supports (5.10+) has BPF ring buffers
        # (5.8+): there is no perf buffer path any more
        self.use_perf_buffer = False
        self._perf_buffer_requested = bool(use_perf_buffer)
        self.on_episode = on_episode
        self.memcg_state = memcg_state
        #: 1 in N fast charges timed (probes/memcgscope.bpf.c LAT_SAMPLE)
        self.latency_sample = latency_sample
        #: probes left out (--no-probe; program.optional_probes)
        self.without = tuple(without)
        self.program: Program | None = None
        self.mode: str | None = None
        self._probes: list[ProbeStatus] = []
        self._pending: list = []
        self._item_names: dict[str, dict[int, str]] = {}
        self.assembler: EpisodeAssembler | None = None
        self.events_seen = 0
        self.loader_pid: int | None = None
        self._tracefs = None
        self._tracing_dir: str | None = None
        self._maps: dict[str, BpfMap] | None = None
        self._progs: dict[str, tuple[int, str, str | None]] = {}
        self._ring: RingBuffer | None = None
        self._ring_fd: int | None = None
        self._attachments: list[_attach.Attachment] = []
        # held while the maps are read from another thread (a scrape) and
        # while they are closed, so no read runs on closed fds
        self._lock = threading.RLock()
        # held while the ring buffer is consumed and while it is unmapped
        self._ring_lock = threading.Lock()
        self._paused = False
        #: the command that runs the loader (tests replace it)
        self.loader_command: list[str] | None = None

    # --- life cycle -------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._maps is not None

    def open(self) -> "Session":
        if os.geteuid() != 0:
            raise SessionError("probing needs root (BPF programs); run as root")
        if self._perf_buffer_requested:
            raise SessionError("use_perf_buffer: there is no perf buffer path; every kernel memcgscope supports "
                               "(Linux 5.10+) has BPF ring buffers (5.8+)")
        # tracepoint ids, kprobe_events and bcc's tracepoint formats are in
        # tracefs: keep it mounted for the session when we mount it
        self._tracefs = tracefs_mounted(self.sysroot)
        self._tracefs.__enter__()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _params(self, check_fentry: bool) -> _loader.LoadParams:
        return _loader.LoadParams(mode=self.requested_mode, sysroot=self.sysroot.root, report=self.report,
                                  max_cgroups=self.max_cgroups, ringbuf_pages=self.ringbuf_pages,
                                  memcg_state=self.memcg_state, check_fentry=check_fentry,
                                  latency_sample=self.latency_sample, without=self.without)

    def build(self, *, check_fentry: bool = True) -> Program:
        """Detects the kernel and builds the program for the mode, without
        compiling or loading anything (``--ebpf`` prints it), in this
        process. ``check_fentry``: test-load a minimal fentry program per
        probe (needs root)."""
        try:
            prepared = _loader.prepare(self._params(check_fentry))
        except _loader.LoadError as e:
            raise SessionError(str(e)) from e
        self.report, self.mode, self.program = prepared.report, prepared.mode, prepared.program
        self._probes = list(self.program.probes)
        self._item_names = _loader.item_names(prepared.btf)
        self.assembler = EpisodeAssembler(memsw=self._memsw())
        return self.program

    def _memsw(self) -> bool:
        c = self.report.cgroups
        return bool(c.v1_memory and c.swap_accounting)

    def _open(self) -> None:
        self._tracing_dir = self.sysroot.tracing_dir() if self.sysroot.live else None
        _attach.sweep_stale(self._tracing_dir)
        try:
            h = _loader.load(self._params(True), command=self.loader_command)
        except _loader.LoadError as e:
            raise SessionError(str(e)) from e
        try:
            self._take(h)
        except BaseException:
            h.close()
            raise
        self._attach_all()

    def _take(self, h: _loader.Handover) -> None:
        """Owns the handed-over fds: maps (checked against the kernel's
        sizes), the ring buffer (mapped) and the programs."""
        self.report, self.mode, self.program = h.report, h.mode, h.program
        self.loader_pid = h.loader_pid
        self._probes = list(self.program.probes)
        self._item_names = h.item_names
        self.assembler = EpisodeAssembler(memsw=self._memsw())
        maps: dict[str, BpfMap] = {}
        try:
            for name, (fd, key, value) in list(h.maps.items()):
                if key is None:          # the ring buffer
                    from .bpfsys import map_info
                    size = map_info(fd).max_entries
                    self._ring = RingBuffer.open(fd, size)
                    self._ring_fd = fd
                else:
                    maps[name] = BpfMap(name, fd, Layout.from_wire(key), Layout.from_wire(value))
                del h.maps[name]
        except (MapError, RingBufferError, OSError) as e:
            for m in maps.values():
                m.close()
            raise SessionError(f"the loader's maps: {e}") from e
        if self._ring is None:
            for m in maps.values():
                m.close()
            raise SessionError("the loader handed over no ring buffer map named in memcgscope.bpf.c")
        self._progs = dict(h.progs)
        h.progs = {}
        with self._lock:
            self._maps = maps

    # --- attaching --------------------------------------------------------

    def _attach(self, kind: str, target: str, prog: str) -> _attach.Attachment:
        fd = self._progs[prog][0]
        a = _attach.attach(kind, target, prog, fd, tracing_dir=self._tracing_dir,
                           maxactive=KRETPROBE_MAXACTIVE)
        self._attachments.append(a)
        return a

    def _attach_all(self) -> None:
        """Tracepoints, raw tracepoints and fentry/fexit first (any failure
        is fatal, as it is for bcc), then the kprobes (a failed one turns its
        probe off; the charge core's is fatal)."""
        for name, (_fd, kind, target) in self._progs.items():
            if kind == "kprobe":
                continue
            try:
                self._attach(kind, target, name)
            except _attach.AttachError as e:
                raise SessionError(f"attaching the {self.mode} program failed: {e}") from e
        by_role: dict[str, list[bool]] = {}
        failures: dict[str, str] = {}
        for symbol, fn, is_ret in self.program.kprobes:
            role = fn[len("kp_"):].rsplit("_", 1)[0]  # kp_<role>_enter[N] / kp_<role>_exit
            try:
                self._attach("kretprobe" if is_ret else "kprobe", symbol, fn)
                by_role.setdefault(role, []).append(True)
            except _attach.AttachError as e:
                by_role.setdefault(role, []).append(False)
                failures[role] = f"attach failed: {e}"
        for p in self._probes:
            if "kprobe" in p.kind and p.attached and not all(by_role.get(p.role, [False])):
                p.attached = False
                p.reason = failures.get(p.role, "attach failed")
        core = next((p for p in self._probes if p.role == "charge_core"), None)
        if core is not None and not core.attached:
            raise SessionError(f"kprobe on {core.target} failed ({core.reason}); try --mode tracepoint")

    def attachments(self) -> list[tuple[str, str, str]]:
        """(kind, target, program) of every attachment held now."""
        return [(a.kind, a.target, a.prog) for a in self._attachments]

    def _detach_all(self) -> None:
        attachments, self._attachments = self._attachments, []
        for a in reversed(attachments):
            with contextlib.suppress(OSError):
                _attach.detach(a)

    def pause(self) -> None:
        """Detaches every probe but keeps the programs and maps loaded, so
        `resume()` re-attaches without compiling again (bench_probes.py
        alternates bare and probed runs this way)."""
        self._paused = [(a.kind, a.target, a.prog) for a in self._attachments]
        self._detach_all()

    def resume(self) -> None:
        paused, self._paused = self._paused, False
        for kind, target, prog in paused or []:
            try:
                self._attach(kind, target, prog)
            except _attach.AttachError as e:
                if kind not in ("kprobe", "kretprobe"):
                    # 5.10.262 attaches a tracing program once: its first link
                    # gone, bpf_tracing_prog_attach (kernel/bpf/syscall.c) says
                    # ENOENT (6.1 and 6.12 re-attach: bench_probes_vm.py ran there)
                    hint = ("; this kernel attaches an fentry/fexit program only once: "
                            "open a new Session instead of resume(), or use kprobe mode"
                            if kind in ("fentry", "fexit") and "No such file" in str(e) else "")
                    raise SessionError(f"re-attaching {prog}: {e}{hint}") from e

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, None
        # detach first: no program runs on maps that are going
        self._detach_all()
        with self._ring_lock:
            ring, self._ring = self._ring, None
            if ring is not None:
                ring.close()
        if self._ring_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._ring_fd)
            self._ring_fd = None
        if maps is not None:
            with self._lock:   # no reader is inside the maps from here on
                for m in maps.values():
                    with contextlib.suppress(OSError):
                        m.close()
        progs, self._progs = self._progs, {}
        for fd, _kind, _target in progs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        tracefs, self._tracefs = self._tracefs, None
        if tracefs is not None:
            tracefs.__exit__(None, None, None)

    def __enter__(self) -> "Session":
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ----------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list:
        """Waits up to timeout_ms for events; returns completed episodes."""
        ring = self._ring
        if ring is None:
            raise SessionError("session is closed")
        if ring.available() == 0:
            ring.wait(timeout_ms)
        self._consume()
        return self._drain_pending()

    def _consume(self) -> None:
        with self._ring_lock:
            if self._ring is None:
                return
            # bounded: under a flood (a kernel loop tracing thousands of steps
            # a second) an unbounded read never finds the buffer empty and
            # poll() never returns to its caller
            records = self._ring.consume(limit=self.CONSUME_LIMIT)
        pending = self._pending
        for r in records:
            if len(r) >= EVENT_SIZE:
                pending.append(decode_fields(r))   # field tuples: the assembler's fast path

    def _drain_pending(self) -> list:
        events, self._pending = self._pending, []
        self.events_seen += len(events)
        out = self.assembler.feed_all(events)
        if self.on_episode:
            for ep in out:
                self.on_episode(ep)
        return out

    def in_flight(self, max_age_s: float = 30.0) -> set[int]:
        """Cgroup ids with a charge or limit-write episode in progress (its
        steps seen: what it raised is in the cgroup's files already, its
        exit not yet), or whose start or end is in the ring buffer and not
        handed out yet, and the trigger and victim of an OOM kill not handed
        out yet. Episodes open longer than ``max_age_s`` lost their exit and
        are not counted. Timestamps are bpf_ktime_get_ns, CLOCK_MONOTONIC."""
        if self.assembler is None:
            return set()
        # what the ring buffer holds now counts too: a caller that read the
        # cgroup files a moment ago must see episodes begun (or ended) since
        # the last poll. Read into the pending events, which the next poll()
        # hands out as usual.
        self._consume()
        ids = self.assembler.open_cgroups(time.monotonic_ns() - int(max_age_s * 1e9))
        for f in self._pending:
            e = Event(*f)
            if e.type in _EPISODE_EDGES:
                ids.add(e.cgid)
            elif e.type == EV.OOM_KILL:
                ids.add(e.cgid)
                if e.flags & 2:
                    ids.add(e.arg1)   # the victim's own memcg (assembly._victim)
        return ids

    def finish(self) -> list:
        """Consumes what is buffered and returns it plus episodes left open."""
        if self._ring is not None:
            self._consume()
        return self._drain_pending() + self.assembler.flush()

    def status(self) -> list[ProbeStatus]:
        return list(self._probes)

    def visibility(self) -> Visibility:
        """What these probes can see (the rules: probes/episodes.py)."""
        return visibility(self.mode, self._probes)

    def forced_charges_visible(self) -> bool:
        return self.visibility().forced_charges

    def drains_visible(self) -> bool:
        return self.visibility().drains

    @contextlib.contextmanager
    def reading(self):
        """The open maps (name -> BpfMap), held against close() while in
        use; raises SessionError when the session is closed (the scrape
        thread uses it)."""
        with self._lock:
            if self._maps is None:
                raise SessionError("session is closed")
            yield self._maps

    def _array_sum(self, name: str) -> int:
        with self._lock:
            if self._maps is None:
                return 0
            return self._maps[name].array_sum(0)

    def contexts_lost(self) -> int:
        """Charges whose per-CPU fast context was overwritten by another
        task's charge (the first was preempted mid-charge): not counted."""
        return self._array_sum("ctx_lost")

    def map_full(self) -> dict[str, int]:
        """Updates dropped because a map was full, by map name."""
        with self._lock:
            if self._maps is None:
                return {}
            t = self._maps["map_full"]
            out = {}
            for i, name in enumerate(COUNTED_MAPS):
                n = t.array_sum(i)
                if n:
                    out[name] = n
            return out

    def contexts_reset(self) -> int:
        """Charge contexts dropped as stale (their return was never seen)."""
        return self._array_sum("ctx_reset")

    def lost(self) -> list[int]:
        with self._lock:
            if self._maps is None:
                return []
            v = self._maps["lost"].lookup(0)
            return [int(x) for x in v] if v is not None else []

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """program name -> (run time ns, run count) from /proc/self/fdinfo;
        zero unless kernel.bpf_stats_enabled is 1."""
        out = {}
        with self._lock:   # the fds stay ours while we read their fdinfo
            if self._maps is None:
                return out
            for name, (fd, _kind, _target) in list(self._progs.items()):
                try:
                    out[name] = prog_run_stats(fd)
                except OSError:
                    continue
        return out

    def forget_cgroup(self, cgid: int) -> int:
        return self.forget_cgroups({cgid})

    def forget_cgroups(self, cgids) -> int:
        """Deletes every per-cgroup map entry of these cgroup ids (removed
        cgroups, or cgroups --cgroup does not watch), each map walked once,
        so the maps stay bounded under churn. Returns how many went."""
        cgids = {int(c) for c in cgids}
        if not cgids:
            return 0
        with self._lock:
            if self._maps is None:
                return 0
            return self._forget(self._maps, cgids)

    @staticmethod
    def _forget(maps: dict, cgids: set) -> int:
        removed = 0
        addresses = set()   # the per-CPU charge maps are keyed by the memcg's address
        for name in ("charge_stats", "page_charge_stats"):
            t = maps[name]
            gone = []
            for raw, k, per_cpu in t.entries():
                if any(int(v.cgid) in cgids for v in per_cpu):
                    addresses.add(int(k))
                    gone.append(raw)
            removed += t.delete_raw(gone)
        t = maps["charge_lat"]
        removed += t.delete_raw([raw for raw, k, _ in t.entries() if int(k.memcg) in addresses])
        for name in ("oom_stats", "high_stats"):
            t = maps[name]
            removed += t.delete_raw([raw for raw, k, _ in t.entries() if int(k) in cgids])
        for name in ("reclaim_stats", "reclaim_lat", "limit_stats", "counter_fails",
                     "memcg_events", "memcg_state", "high_lat"):
            t = maps[name]
            removed += t.delete_raw([raw for raw, k, _ in t.entries() if int(k.cgid) in cgids])
        return removed

    def forget_tasks(self, alive) -> int:
        """Drops per-task contexts of threads that no longer exist
        (``alive(tid) -> bool``): a thread that died inside a charge, or whose
        return probe was missed, would otherwise hold its entry for ever and
        the map would fill."""
        with self._lock:
            if self._maps is None:
                return 0
            t = self._maps["tasks"]
            dead = [raw for raw in t.raw_keys() if not alive(int(t.key.unpack(raw)))]
            t.delete_raw(dead)
            return len(dead)

    def item_names(self, kind: str) -> dict[int, str]:
        """Kernel enum names for memcg:* tracepoint items (they differ between builds)."""
        return self._item_names.get(kind, {})

    def aggregates(self) -> Aggregates:
        """The in-kernel per-cgroup maps, read without stopping the probes."""
        with self.reading() as maps:
            return self._aggregates(maps)

    def _aggregates(self, maps: dict) -> Aggregates:
        out: dict[int, CgroupAggregate] = {}

        def agg(cgid: int) -> CgroupAggregate:
            return out.setdefault(int(cgid), CgroupAggregate())

        # charges: per-CPU values keyed by the memcg's address, summed here
        fields = ("calls", "pages", "slow", "fail_enomem", "fail_eintr", "fail_other", "ns")
        cgid_of: dict[int, int] = {}
        for table, attr in (("charge_stats", "charges"), ("page_charge_stats", "page_charges")):
            for k, per_cpu in maps[table].items():
                cgid = max(int(v.cgid) for v in per_cpu)
                cgid_of[int(k)] = cgid
                sums = getattr(agg(cgid), attr)
                for f in fields:
                    sums[f] = sums.get(f, 0) + sum(int(getattr(v, f)) for v in per_cpu)
        for k, per_cpu in maps["charge_lat"].items():
            cgid = cgid_of.get(int(k.memcg))
            if cgid is not None:
                slots = agg(cgid).charge_latency
                slots[int(k.slot)] = slots.get(int(k.slot), 0) + sum(per_cpu)
        for k, v in maps["reclaim_stats"].items():
            agg(k.cgid).reclaim[CALLERS.get(k.caller, "other")] = {
                "calls": int(v.calls), "asked": int(v.asked), "freed": int(v.freed), "ns": int(v.ns)}
        for k, v in maps["reclaim_lat"].items():
            agg(k.cgid).reclaim_latency.setdefault(CALLERS.get(k.caller, "other"), {})[int(k.slot)] = int(v)
        for k, v in maps["limit_stats"].items():
            agg(k.cgid).limit_writes[(LIMIT_KINDS.get(k.kind, str(k.kind)), int(k.ret))] = int(v)
        for k, v in maps["oom_stats"].items():
            agg(k).oom = {"invocations": int(v.invocations), "returned_true": int(v.returned_true),
                          "kills": int(v.kills), "victims": int(v.victims)}
        for k, v in maps["high_stats"].items():
            agg(k).high = {"calls": int(v.calls), "sleep_ns": int(v.sleep_ns), "reclaim_ns": int(v.reclaim_ns)}
        for k, v in maps["high_lat"].items():
            agg(k.cgid).high_latency[int(k.slot)] = int(v)
        for k, v in maps["counter_fails"].items():
            agg(k.cgid).counter_failures["memsw" if k.counter else "memory"] = int(v)
        event_names, state_names = self.item_names("events"), self.item_names("state")
        for k, v in maps["memcg_events"].items():
            agg(k.cgid).memcg_events[event_names.get(int(k.item), str(k.item))] = (int(v.count), int(v.sum))
        for k, v in maps["memcg_state"].items():
            agg(k.cgid).memcg_state[state_names.get(int(k.item), str(k.item))] = (int(v.count), int(v.sum))
        return Aggregates(out, self.lost())
