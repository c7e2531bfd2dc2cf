"""A probing session: pick a mode, compile, attach, stream episodes, read
the in-kernel aggregates, detach.

    with Session(mode=None) as s:            # None: the best usable mode
        for probe in s.status(): ...
        while running:
            for episode in s.poll(timeout_ms=200): ...
        aggregates = s.aggregates()

Closing detaches everything; `Session` is a context manager and `close()`
is idempotent, so normal exit, an exception, SIGINT and SIGTERM (turned into
an exception by the caller, see collector/record_cmd.py) all detach.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass, field

from .btf import BTF
from .bpfsys import try_fentry
from .detect import Report, bcc_kernel_source, detect, tracefs_mounted
from .assembly import EpisodeAssembler
from .episodes import CALLERS, EVENT_SIZE, LIMIT_KINDS, Visibility, decode_bytes, visibility
from .program import Program, ProgramError, ProbeStatus, build_program, fentry_arg_reads
from .sysroot import SysRoot

__all__ = ["Session", "SessionError", "Aggregates", "CgroupAggregate"]

# tasks sleeping in reclaim hold a kretprobe instance each; a return missed
# when all are taken is handled by the BPF side (see on_charge_enter)
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


class Session:
    def __init__(self, mode: str | None = None, *, sysroot: SysRoot | None = None,
                 report: Report | None = None, max_cgroups: int = 4096, ringbuf_pages: int = 256,
                 use_perf_buffer: bool | None = None, on_episode=None, memcg_state: bool = False):
        self.requested_mode = mode
        self.sysroot = sysroot or SysRoot("/")
        self.report = report
        self.max_cgroups = max_cgroups
        self.ringbuf_pages = ringbuf_pages
        self.use_perf_buffer = use_perf_buffer
        self.on_episode = on_episode
        self.memcg_state = memcg_state
        self.bpf = None
        self.program: Program | None = None
        self.mode: str | None = None
        self._probes: list[ProbeStatus] = []
        self._pending: list = []
        self._names_cache: dict[str, dict[int, str]] = {}
        self.assembler: EpisodeAssembler | None = None
        self.events_seen = 0
        self._tracefs = None
        # held while the BPF object is read from another thread (a scrape)
        # and while it is closed, so no read runs on freed maps
        self._lock = threading.RLock()
        self._paused = None

    # --- life cycle -------------------------------------------------------

    def open(self) -> "Session":
        if os.geteuid() != 0:
            raise SessionError("probing needs root (BPF programs); run as root")
        # bcc reads tracepoint formats and ids from tracefs while compiling
        # and attaching: keep it mounted for the session when we mount it
        self._tracefs = tracefs_mounted(self.sysroot)
        self._tracefs.__enter__()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def build(self, *, check_fentry: bool = True) -> Program:
        """Detects the kernel and builds the program for the mode, without
        compiling or loading anything (``--ebpf`` prints it).
        ``check_fentry``: test-load a minimal fentry program per probe
        (needs root)."""
        self._build(check_fentry)
        return self.program

    def _build(self, check_fentry: bool) -> None:
        report = self.report or detect(self.sysroot)
        self.report = report
        mode = self.requested_mode or report.mode
        if mode is None:
            raise SessionError(f"no probe mode is usable on this kernel: {report.mode_reason}; see 'memcgscope doctor'")
        verdict = report.modes.get(mode)
        if verdict is None:
            raise SessionError(f"--mode {mode}: unknown mode; use fentry, kprobe or tracepoint")
        if not verdict.usable:
            raise SessionError(f"--mode {mode} is not usable here ({verdict.reason}); "
                               f"see 'memcgscope doctor'" + (f", which suggests {report.mode}" if report.mode else ""))
        try:
            btf = BTF.from_file(self.sysroot.path("/sys/kernel/btf/vmlinux"))
        except Exception as e:
            raise SessionError(f"{e}") from e

        if self.use_perf_buffer is None:
            # BPF ring buffers arrived in 5.8; older kernels get the perf buffer
            self.use_perf_buffer = btf.func_id("bpf_ringbuf_output") is None

        arg_reads = fentry_arg_reads(btf)

        def fentry_check(btf_id):
            # load the way the program reads its arguments, not just an attach
            r = try_fentry(btf_id, args=arg_reads)
            return r.state == "ok", r.detail

        try:
            self.program = build_program(report, mode, btf, max_cgroups=self.max_cgroups,
                                         ringbuf_pages=self.ringbuf_pages, use_perf_buffer=self.use_perf_buffer,
                                         fentry_check=fentry_check if mode == "fentry" and check_fentry else None,
                                         memcg_state=self.memcg_state)
        except ProgramError as e:
            raise SessionError(str(e)) from e
        self.mode = mode
        self._btf = btf
        self._probes = list(self.program.probes)
        self.assembler = EpisodeAssembler(memsw=bool(report.cgroups.v1_memory and report.cgroups.swap_accounting))

    def _open(self) -> None:
        self._build(True)
        source = bcc_kernel_source(self.sysroot)
        if source:
            os.environ["BCC_KERNEL_SOURCE"] = source
        try:
            from bcc import BPF
        except ImportError as e:
            raise SessionError("python module bcc not importable; run scripts/setup.sh (python3-bpfcc)") from e
        compiler_output: list[str] = []
        try:
            with _captured_stderr(compiler_output):
                self.bpf = BPF(text=self.program.text, cflags=self.program.cflags)
        except Exception as e:
            self.close()
            first_error = next((line for line in compiler_output if "error" in line), "")
            detail = first_error or (str(e).splitlines()[0] if str(e) else repr(e))
            raise SessionError(f"compiling or loading the {self.mode} program failed: {detail} "
                               f"(MEMCGSCOPE_DEBUG_BPF=1 shows everything)") from e
        self._attach_kprobes()
        self._open_events()

    def _attach_kprobes(self) -> None:
        by_role: dict[str, list[bool]] = {}
        failures: dict[str, str] = {}
        for symbol, fn, is_ret in self.program.kprobes:
            role = fn[len("kp_"):].rsplit("_", 1)[0]  # kp_<role>_enter[N] / kp_<role>_exit
            try:
                if is_ret:
                    self.bpf.attach_kretprobe(event=symbol, fn_name=fn, maxactive=KRETPROBE_MAXACTIVE)
                else:
                    self.bpf.attach_kprobe(event=symbol, fn_name=fn)
                by_role.setdefault(role, []).append(True)
            except Exception as e:
                by_role.setdefault(role, []).append(False)
                failures[role] = f"attach failed: {e}"
        for p in self._probes:
            if "kprobe" in p.kind and p.attached and not all(by_role.get(p.role, [False])):
                p.attached = False
                p.reason = failures.get(p.role, "attach failed")
        core = next((p for p in self._probes if p.role == "charge_core"), None)
        if core is not None and not core.attached:
            raise SessionError(f"kprobe on {core.target} failed ({core.reason}); try --mode tracepoint")

    def pause(self) -> None:
        """Detaches every probe but keeps the programs and maps loaded, so
        `resume()` re-attaches without compiling again (bench_probes.py
        alternates bare and probed runs this way)."""
        b = self.bpf
        self._paused = {
            "tracepoints": [(tp, "tracepoint__" + tp.decode().replace(":", "__")) for tp in list(b.tracepoint_fds)],
            # the memcg:* probes are raw tracepoints: they run on every fault
            "raw_tracepoints": [(tp, "raw_tracepoint__" + tp.decode()) for tp in list(b.raw_tracepoint_fds)],
            "kfunc_entry": list(b.kfunc_entry_fds), "kfunc_exit": list(b.kfunc_exit_fds),
            "kprobes": list(self.program.kprobes),
        }
        for tp, _ in self._paused["tracepoints"]:
            b.detach_tracepoint(tp)
        for tp, _ in self._paused["raw_tracepoints"]:
            b.detach_raw_tracepoint(tp)
        for fn in self._paused["kfunc_entry"]:
            b.detach_kfunc(fn)
        for fn in self._paused["kfunc_exit"]:
            b.detach_kretfunc(fn)
        for symbol, fn, is_ret in self._paused["kprobes"]:
            try:
                (b.detach_kretprobe if is_ret else b.detach_kprobe)(symbol, fn_name=fn)
            except Exception:
                pass  # was not attached (its attach failed at open)

    def resume(self) -> None:
        b, paused = self.bpf, self._paused
        for tp, fn in paused["tracepoints"]:
            b.attach_tracepoint(tp=tp, fn_name=fn)
        for tp, fn in paused["raw_tracepoints"]:
            b.attach_raw_tracepoint(tp=tp, fn_name=fn)
        for fn in paused["kfunc_entry"]:
            b.attach_kfunc(fn_name=fn)
        for fn in paused["kfunc_exit"]:
            b.attach_kretfunc(fn_name=fn)
        for symbol, fn, is_ret in paused["kprobes"]:
            try:
                if is_ret:
                    b.attach_kretprobe(event=symbol, fn_name=fn, maxactive=KRETPROBE_MAXACTIVE)
                else:
                    b.attach_kprobe(event=symbol, fn_name=fn)
            except Exception:
                pass
        self._paused = None

    def _open_events(self) -> None:
        def callback(*args):  # (ctx or cpu, data, size)
            self._pending.append(decode_bytes(ctypes.string_at(args[1], EVENT_SIZE)))
            return 0

        if self.use_perf_buffer:
            def lost_cb(count):
                self._perf_lost += count
            self._perf_lost = 0
            self.bpf["events"].open_perf_buffer(callback, page_cnt=self.ringbuf_pages, lost_cb=lost_cb)
        else:
            self.bpf["events"].open_ring_buffer(callback)
        self._callback = callback  # keep a reference: bcc holds only a C pointer

    def close(self) -> None:
        with self._lock:
            bpf, self.bpf = self.bpf, None
        if bpf is not None:
            with self._lock:   # no reader is inside the maps from here on
                try:
                    bpf.cleanup()
                except Exception:
                    pass
        tracefs, self._tracefs = self._tracefs, None
        if tracefs is not None:
            tracefs.__exit__(None, None, None)

    def __enter__(self) -> "Session":
        if self.bpf is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ----------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list:
        """Waits up to timeout_ms for events; returns completed episodes."""
        if self.bpf is None:
            raise SessionError("session is closed")
        if self.use_perf_buffer:
            self.bpf.perf_buffer_poll(timeout=timeout_ms)
        else:
            self.bpf.ring_buffer_poll(timeout=timeout_ms)
        return self._drain_pending()

    def _drain_pending(self) -> list:
        events, self._pending = self._pending, []
        self.events_seen += len(events)
        out = []
        for e in events:
            out.extend(self.assembler.feed(e))
        if self.on_episode:
            for ep in out:
                self.on_episode(ep)
        return out

    def finish(self) -> list:
        """Consumes what is buffered and returns it plus episodes left open."""
        if self.bpf is not None and not self.use_perf_buffer:
            self.bpf.ring_buffer_consume()
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
        """The open BPF object, held against close() while in use; raises
        SessionError when the session is closed (the scrape thread uses it)."""
        with self._lock:
            if self.bpf is None:
                raise SessionError("session is closed")
            yield self.bpf

    def contexts_lost(self) -> int:
        """Charges whose per-CPU fast context was overwritten by another
        task's charge (the first was preempted mid-charge): not counted."""
        with self._lock:
            if self.bpf is None:
                return 0
            return sum(int(v) for v in self.bpf["ctx_lost"][ctypes.c_int(0)])

    def map_full(self) -> dict[str, int]:
        """Updates dropped because a map was full, by map name."""
        from .program import COUNTED_MAPS
        with self._lock:
            if self.bpf is None:
                return {}
            t = self.bpf["map_full"]
            out = {}
            for i, name in enumerate(COUNTED_MAPS):
                n = sum(int(v) for v in t[ctypes.c_int(i)])
                if n:
                    out[name] = n
            return out

    def contexts_reset(self) -> int:
        """Charge contexts dropped as stale (their return was never seen)."""
        with self._lock:
            if self.bpf is None:
                return 0
            return sum(int(v) for v in self.bpf["ctx_reset"][ctypes.c_int(0)])

    def lost(self) -> list[int]:
        with self._lock:
            if self.bpf is None:
                return []
            counts = [int(v) for v in self.bpf["lost"][ctypes.c_int(0)]]
            if self.use_perf_buffer:
                counts[0] += self._perf_lost
            return counts

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """program name -> (run time ns, run count) from /proc/self/fdinfo;
        zero unless kernel.bpf_stats_enabled is 1."""
        out = {}
        with self._lock:   # the fds stay ours while we read their fdinfo
            if self.bpf is None:
                return out
            for name, fn in list(self.bpf.funcs.items()):
                try:
                    with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                        info = dict(line.split(":", 1) for line in f if ":" in line)
                except OSError:
                    continue
                key = name.decode() if isinstance(name, bytes) else name
                out[key] = (int(info.get("run_time_ns", "0").strip() or 0),
                            int(info.get("run_cnt", "0").strip() or 0))
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
            if self.bpf is None:
                return 0
            return self._forget(self.bpf, cgids)

    @staticmethod
    def _forget(bpf, cgids: set) -> int:
        removed = 0

        def delete(table, key) -> None:
            nonlocal removed
            try:
                del table[key]
                removed += 1
            except KeyError:
                pass

        addresses = set()   # the per-CPU charge maps are keyed by the memcg's address
        for name in ("charge_stats", "page_charge_stats"):
            t = bpf[name]
            for k, per_cpu in list(t.items()):
                if any(int(v.cgid) in cgids for v in per_cpu):
                    addresses.add(int(k.value))
                    delete(t, k)
        t = bpf["charge_lat"]
        for k in [k for k in t.keys() if int(k.memcg) in addresses]:
            delete(t, k)
        for name in ("oom_stats", "high_stats"):
            t = bpf[name]
            for k in [k for k in t.keys() if int(k.value) in cgids]:
                delete(t, k)
        for name in ("reclaim_stats", "reclaim_lat", "limit_stats", "counter_fails",
                     "memcg_events", "memcg_state", "high_lat"):
            t = bpf[name]
            for k in [k for k in t.keys() if int(k.cgid) in cgids]:
                delete(t, k)
        return removed

    def forget_tasks(self, alive) -> int:
        """Drops per-task contexts of threads that no longer exist
        (``alive(tid) -> bool``): a thread that died inside a charge, or whose
        return probe was missed, would otherwise hold its entry for ever and
        the map would fill."""
        with self._lock:
            if self.bpf is None:
                return 0
            t = self.bpf["tasks"]
            dead = [k for k in t.keys() if not alive(int(k.value))]
            for k in dead:
                try:
                    del t[k]
                except KeyError:
                    pass
            return len(dead)

    def item_names(self, kind: str) -> dict[int, str]:
        """Kernel enum names for memcg:* tracepoint items (they differ between builds)."""
        if kind not in self._names_cache:
            if kind == "events":
                names = self._btf.enumerators("vm_event_item")
            else:
                names = dict(self._btf.enumerators("node_stat_item"))
                names.update(self._btf.enumerators("memcg_stat_item"))
                # lruvec items are marked with bit 16 by the BPF side
                names.update({k | 0x10000: "lruvec_" + v for k, v in self._btf.enumerators("node_stat_item").items()})
            self._names_cache[kind] = names
        return self._names_cache[kind]

    def aggregates(self) -> Aggregates:
        """The in-kernel per-cgroup maps, read without stopping the probes."""
        with self.reading():
            return self._aggregates()

    def _aggregates(self) -> Aggregates:
        out: dict[int, CgroupAggregate] = {}

        def agg(cgid: int) -> CgroupAggregate:
            return out.setdefault(int(cgid), CgroupAggregate())

        # charges: per-CPU values keyed by the memcg's address, summed here
        fields = ("calls", "pages", "slow", "fail_enomem", "fail_eintr", "fail_other", "ns")
        cgid_of: dict[int, int] = {}
        for table, attr in (("charge_stats", "charges"), ("page_charge_stats", "page_charges")):
            for k, per_cpu in self.bpf[table].items():
                cgid = max(int(v.cgid) for v in per_cpu)
                cgid_of[int(k.value)] = cgid
                sums = getattr(agg(cgid), attr)
                for f in fields:
                    sums[f] = sums.get(f, 0) + sum(int(getattr(v, f)) for v in per_cpu)
        for k, per_cpu in self.bpf["charge_lat"].items():
            cgid = cgid_of.get(int(k.memcg))
            if cgid is not None:
                slots = agg(cgid).charge_latency
                slots[int(k.slot)] = slots.get(int(k.slot), 0) + sum(int(v) for v in per_cpu)
        for k, v in self.bpf["reclaim_stats"].items():
            agg(k.cgid).reclaim[CALLERS.get(k.caller, "other")] = {
                "calls": int(v.calls), "asked": int(v.asked), "freed": int(v.freed), "ns": int(v.ns)}
        for k, v in self.bpf["reclaim_lat"].items():
            agg(k.cgid).reclaim_latency.setdefault(CALLERS.get(k.caller, "other"), {})[int(k.slot)] = int(v.value)
        for k, v in self.bpf["limit_stats"].items():
            agg(k.cgid).limit_writes[(LIMIT_KINDS.get(k.kind, str(k.kind)), int(k.ret))] = int(v.value)
        for k, v in self.bpf["oom_stats"].items():
            agg(k.value).oom = {"invocations": int(v.invocations), "returned_true": int(v.returned_true),
                                "kills": int(v.kills), "victims": int(v.victims)}
        for k, v in self.bpf["high_stats"].items():
            agg(k.value).high = {"calls": int(v.calls), "sleep_ns": int(v.sleep_ns), "reclaim_ns": int(v.reclaim_ns)}
        for k, v in self.bpf["high_lat"].items():
            agg(k.cgid).high_latency[int(k.slot)] = int(v.value)
        for k, v in self.bpf["counter_fails"].items():
            agg(k.cgid).counter_failures["memsw" if k.counter else "memory"] = int(v.value)
        event_names, state_names = self.item_names("events"), self.item_names("state")
        for k, v in self.bpf["memcg_events"].items():
            agg(k.cgid).memcg_events[event_names.get(int(k.item), str(k.item))] = (int(v.count), int(v.sum))
        for k, v in self.bpf["memcg_state"].items():
            agg(k.cgid).memcg_state[state_names.get(int(k.item), str(k.item))] = (int(v.count), int(v.sum))
        return Aggregates(out, self.lost())


@contextlib.contextmanager
def _captured_stderr(lines: list[str]):
    """bcc's clang prints warnings about fallback headers on fd 2: keep them
    from the user's terminal, but hand them back for the error message."""
    if os.environ.get("MEMCGSCOPE_DEBUG_BPF"):
        yield
        return
    import tempfile
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())
