"""Events from the BPF side, decoded, and assembled into episodes.

An episode is one slow-path call of the charge core, or one limit write,
with its nested steps in order (design.md §3); page-charge failures, OOM
kills outside a charge and (tracepoint mode) memcg reclaims stand alone.
Assembly is pure Python: `EpisodeAssembler.feed(Event)` returns the
episodes that event completed. The JSON form is documented in
probes/README.md (schema memcgscope.episodes/1).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

__all__ = ["Event", "RawEvent", "Episode", "EpisodeAssembler", "EV", "CALLERS", "LIMIT_KINDS",
           "SCHEMA", "decode"]

SCHEMA = "memcgscope.episodes/1"


class EV:
    CHARGE_ENTER = 1
    CHARGE_EXIT = 2
    RECLAIM = 3
    DRAIN = 4
    OOM = 5
    OOM_KILL = 6
    COUNTER_FAIL = 7
    LIMIT_ENTER = 8
    LIMIT_EXIT = 9
    PAGE_CHARGE_FAIL = 10
    TP_RECLAIM = 11


CALLERS = {0: "other", 1: "charge", 2: "v1_limit", 3: "v2_max", 4: "v2_high", 5: "unknown"}
LIMIT_KINDS = {1: "memory.limit_in_bytes", 2: "memory.max", 3: "memory.high"}


class RawEvent(ctypes.Structure):
    """Mirror of struct event_t in memcgscope.bpf.c."""
    _fields_ = [
        ("type", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
        ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
        ("ts", ctypes.c_uint64), ("episode", ctypes.c_uint64), ("cgid", ctypes.c_uint64),
        ("arg0", ctypes.c_uint64), ("arg1", ctypes.c_uint64), ("arg2", ctypes.c_uint64),
        ("ret", ctypes.c_int64),
        ("usage", ctypes.c_uint64), ("max", ctypes.c_uint64),
        ("memsw_usage", ctypes.c_uint64), ("memsw_max", ctypes.c_uint64),
        ("duration_ns", ctypes.c_uint64),
        ("caller", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16), ("data", ctypes.c_char * 24),
    ]


@dataclass(slots=True)
class Event:
    type: int
    cpu: int
    pid: int
    tid: int
    ts: int
    episode: int
    cgid: int
    arg0: int = 0
    arg1: int = 0
    arg2: int = 0
    ret: int = 0
    usage: int = 0
    max: int = 0
    memsw_usage: int = 0
    memsw_max: int = 0
    duration_ns: int = 0
    caller: int = 0
    flags: int = 0
    comm: bytes | str = b""  # NUL-padded as sent; _text() when needed
    data: bytes | str = b""


# struct event_t as one precompiled unpack: ctypes field access costs ~10x
# more per event, and the collector decodes every event it receives
_EVENT = struct.Struct("<IIIIQQQQQQqQQQQQII16s24s")
assert _EVENT.size == ctypes.sizeof(RawEvent)
EVENT_SIZE = _EVENT.size


def decode_bytes(buf: bytes) -> Event:
    """An event from the bytes the ring buffer handed over. `comm` and
    `data` stay bytes: only an episode's first event needs them as text."""
    return Event(*_EVENT.unpack_from(buf))


def _text(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode(raw: RawEvent) -> Event:
    return decode_bytes(bytes(raw))


def _counters(e: Event, memsw: bool) -> dict:
    d = {"usage": e.usage, "max": e.max}
    if memsw:
        d["memsw_usage"] = e.memsw_usage
        d["memsw_max"] = e.memsw_max
    return d


@dataclass(slots=True)
class Episode:
    kind: str  # charge | limit_write | page_charge_fail | oom_kill | reclaim
    ts_ns: int
    pid: int
    tid: int
    comm: str
    cpu: int
    cgroup_id: int
    args: dict
    entry: dict | None = None
    steps: list = field(default_factory=list)
    ret: int | None = None
    exit: dict | None = None
    duration_ns: int | None = None
    complete: bool = True

    def to_json(self) -> dict:
        d = {"type": "episode", "kind": self.kind, "ts_ns": self.ts_ns, "pid": self.pid,
             "tid": self.tid, "comm": self.comm, "cpu": self.cpu, "cgroup_id": self.cgroup_id}
        d.update(self.args)
        if self.entry is not None:
            d["entry"] = self.entry
        d["steps"] = self.steps
        d["ret"] = self.ret
        if self.exit is not None:
            d["exit"] = self.exit
        d["duration_ns"] = self.duration_ns
        if not self.complete:
            d["complete"] = False
        return d


def _step(e: Event, memsw: bool) -> dict:
    if e.type == EV.RECLAIM:
        return {"kind": "reclaim", "ts_ns": e.ts, "cgroup_id": e.cgid, "nr_pages": e.arg0, "gfp": e.arg1,
                "options": e.arg2, "freed": e.ret, "caller": CALLERS.get(e.caller, "other"),
                "duration_ns": e.duration_ns, "after": _counters(e, memsw)}
    if e.type == EV.COUNTER_FAIL:
        return {"kind": "counter_fail", "ts_ns": e.ts, "cgroup_id": e.cgid,
                "counter": "memsw" if e.arg0 else "memory", "nr_pages": e.arg1, "at": _counters(e, memsw)}
    if e.type == EV.DRAIN:
        return {"kind": "drain", "ts_ns": e.ts, "cgroup_id": e.cgid or None}
    if e.type == EV.OOM:
        return {"kind": "oom", "ts_ns": e.ts, "cgroup_id": e.cgid, "gfp": e.arg0, "order": e.arg1,
                "result": bool(e.ret), "duration_ns": e.duration_ns, "after": _counters(e, memsw)}
    if e.type == EV.OOM_KILL:
        return {"kind": "oom_kill", "ts_ns": e.ts, "cgroup_id": e.cgid, "victim_pid": e.arg0}
    raise ValueError(f"event type {e.type} is not a step")


class EpisodeAssembler:
    """Groups events by task into episodes. `memsw` says whether the v1
    memsw counters are meaningful (v1 with swap accounting)."""

    STEP_TYPES = {EV.RECLAIM, EV.COUNTER_FAIL, EV.DRAIN, EV.OOM, EV.OOM_KILL}

    def __init__(self, memsw: bool = False, max_open: int = 65536):
        self.memsw = memsw
        self.max_open = max_open
        # tid -> {"charge": Episode|None, "limit": Episode|None}
        self._open: dict[int, dict[str, Episode]] = {}
        self.orphans = 0  # events whose episode start was never seen

    def feed(self, e: Event) -> list[Episode]:
        t = e.type
        slots = self._open.get(e.tid)
        if t in self.STEP_TYPES and slots:
            # the common case first: a step of the innermost open episode it was tagged with
            for ep in slots.values():
                if ep.ts_ns == e.episode:
                    ep.steps.append(_step(e, self.memsw))
                    return []
        if t == EV.CHARGE_ENTER:
            ep = Episode("charge", e.ts, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                         {"gfp": e.arg0, "nr_pages": e.arg1}, entry=_counters(e, self.memsw))
            self._slots(e.tid)["charge"] = ep
            return []
        if t == EV.CHARGE_EXIT:
            ep = slots.pop("charge", None) if slots else None
            if ep is None:
                self.orphans += 1
                ep = Episode("charge", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                             {"gfp": e.arg0, "nr_pages": e.arg1}, complete=False)
            ep.ret, ep.exit, ep.duration_ns = e.ret, _counters(e, self.memsw), e.duration_ns
            self._gc(e.tid)
            return [ep]
        if t == EV.LIMIT_ENTER:
            kind = LIMIT_KINDS.get(e.arg0, str(e.arg0))
            if kind == "memory.limit_in_bytes" and e.arg2:
                kind = "memory.memsw.limit_in_bytes"
            args = {"file": kind, "value": e.arg1}
            text = _text(e.data)
            if text:
                args["text"] = text
            ep = Episode("limit_write", e.ts, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid, args,
                         entry=_counters(e, self.memsw) if e.arg0 == 1 else None)
            self._slots(e.tid)["limit"] = ep
            return []
        if t == EV.LIMIT_EXIT:
            ep = slots.pop("limit", None) if slots else None
            if ep is None:
                self.orphans += 1
                ep = Episode("limit_write", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                             {"file": LIMIT_KINDS.get(e.arg0, str(e.arg0)), "value": e.arg1}, complete=False)
            ep.ret, ep.duration_ns = e.ret, e.duration_ns
            ep.exit = _counters(e, self.memsw) if e.flags & 1 else None
            self._gc(e.tid)
            return [ep]
        if t in self.STEP_TYPES:
            if e.episode:
                self.orphans += 1
            if t == EV.OOM_KILL:
                return [Episode("oom_kill", e.ts, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                                {"victim_pid": e.arg0}, ret=0, duration_ns=0)]
            if t == EV.RECLAIM:
                return [Episode("reclaim", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                                {"caller": CALLERS.get(e.caller, "other"), "nr_pages": e.arg0, "gfp": e.arg1,
                                 "options": e.arg2}, steps=[], ret=e.ret, exit=_counters(e, self.memsw),
                                duration_ns=e.duration_ns)]
            return []  # a drain or OOM outside any episode: counted in the maps
        if t == EV.PAGE_CHARGE_FAIL:
            return [Episode("page_charge_fail", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                            {"nr_pages": e.arg0, "gfp": e.arg1}, ret=e.ret, duration_ns=e.duration_ns)]
        if t == EV.TP_RECLAIM:
            return [Episode("reclaim", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                            {"caller": "unknown", "gfp": e.arg1, "attribution": "task"},
                            ret=e.ret, exit=_counters(e, self.memsw), duration_ns=e.duration_ns)]
        raise ValueError(f"unknown event type {t}")

    def _slots(self, tid: int) -> dict:
        slots = self._open.get(tid)
        if slots is None:
            if len(self._open) >= self.max_open:
                # tasks that died mid-episode: drop the oldest
                self._open.pop(next(iter(self._open)))
            slots = self._open[tid] = {}
        return slots

    def _gc(self, tid: int) -> None:
        if not self._open.get(tid):
            self._open.pop(tid, None)

    def flush(self) -> list[Episode]:
        """Episodes still open (at close): returned incomplete."""
        out = []
        for slots in self._open.values():
            for ep in slots.values():
                ep.complete = False
                out.append(ep)
        self._open.clear()
        return out
