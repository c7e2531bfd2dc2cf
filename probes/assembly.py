"""Events from the BPF side assembled into episodes (design in
docs/architecture.md; the event layout and the episode JSON form are the
contract of probes/episodes.py).

An episode is one slow-path call of the charge core, or one limit write,
with its nested steps in order; page-charge failures, OOM kills outside a
charge and (tracepoint mode) memcg reclaims stand alone. Assembly is pure
Python: `EpisodeAssembler.feed(Event)` returns the episodes that event
completed.
"""

from __future__ import annotations

from .episodes import CALLERS, EV, LIMIT_KINDS, Episode, Event, text as _text

__all__ = ["EpisodeAssembler"]


def _counters(e: Event, memsw: bool) -> dict:
    d = {"usage": e.usage, "max": e.max}
    if memsw:
        d["memsw_usage"] = e.memsw_usage
        d["memsw_max"] = e.memsw_max
    return d


def _high_counters(e: Event) -> dict:
    return {"usage": e.usage, "max": e.max, "high": e.memsw_max}


def _victim(e: Event) -> dict:
    """An OOM kill's victim: its pid, and where the tracepoint handed over
    its task (flags bit 1), its own memcg and comm. The event's cgroup is
    the trigger: the memcg whose OOM ran."""
    d = {"victim_pid": e.arg0}
    if e.flags & 2:
        d["victim_cgroup_id"] = e.arg1
        d["victim_comm"] = _text(e.data)
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
        return {"kind": "oom_kill", "ts_ns": e.ts, "cgroup_id": e.cgid, **_victim(e)}
    raise ValueError(f"event type {e.type} is not a step")


class EpisodeAssembler:
    """Groups events by task into episodes. `memsw` says whether the v1
    memsw counters are meaningful (v1 with swap accounting)."""

    STEP_TYPES = {EV.RECLAIM, EV.COUNTER_FAIL, EV.DRAIN, EV.OOM, EV.OOM_KILL}
    #: steps kept per episode: a memory.max write that loops for ever (a
    #: superseded limit on a kernel without the break,
    #: profile limit_superseded_break: mem_cgroup_out_of_memory
    #: returns true pass after pass) traces thousands of OOM steps a second;
    #: past this the episode is marked incomplete (the cross-check skips it)
    #: and further steps are counted in ``steps_dropped``
    MAX_STEPS = 65536

    def __init__(self, memsw: bool = False, max_open: int = 65536):
        self.memsw = memsw
        self.max_open = max_open
        # tid -> {"charge": Episode|None, "limit": Episode|None}
        self._open: dict[int, dict[str, Episode]] = {}
        self.orphans = 0  # events whose episode start was never seen
        self.unknown = 0  # events of a type this assembler does not know
        self.steps_dropped = 0  # steps past MAX_STEPS of their episode

    def feed(self, e: Event) -> list[Episode]:
        t = e.type
        slots = self._open.get(e.tid)
        if t in self.STEP_TYPES and slots:
            # the common case first: a step of the innermost open episode it was tagged with
            for ep in slots.values():
                if ep.ts_ns == e.episode:
                    if len(ep.steps) < self.MAX_STEPS:
                        ep.steps.append(_step(e, self.memsw))
                    else:
                        ep.complete = False
                        self.steps_dropped += 1
                    return []
        if t == EV.REPEAT:
            return self._repeat(e, slots)
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
                                _victim(e), ret=0, duration_ns=0)]
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
        if t == EV.HIGH_ENTER:
            # memory.high throttling on return to user space; counters carry
            # memory.high (the v2 memsw slot, see high_counters in the C)
            ep = Episode("over_high", e.ts, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid, {"nr_pages": e.arg0},
                         entry=_high_counters(e))
            self._slots(e.tid)["high"] = ep
            return []
        if t == EV.HIGH_EXIT:
            ep = slots.pop("high", None) if slots else None
            if ep is None:
                self.orphans += 1
                ep = Episode("over_high", e.ts - e.duration_ns, e.pid, e.tid, _text(e.comm), e.cpu, e.cgid,
                             {"nr_pages": e.arg0}, complete=False)
            ep.ret, ep.exit, ep.duration_ns = 0, _high_counters(e), e.duration_ns
            ep.args["sleep_ns"] = e.arg1
            ep.args["penalty_jiffies"] = e.arg2
            self._gc(e.tid)
            return [ep]
        # an event this memcgscope does not know (a newer BPF side): counted, not fatal
        self.unknown += 1
        return []

    def _repeat(self, e: Event, slots) -> list:
        """EV_REPEAT: the episode's last step (an OOM step) happened
        ``e.arg0`` more times; expanded here into that many steps (one dict,
        shared), so every consumer sees the loop as the kernel ran it.
        Their durations are the repeats' mean; their time is the send's."""
        for ep in (slots or {}).values():
            if ep.ts_ns == e.episode and ep.steps:
                n = e.arg0
                room = max(0, self.MAX_STEPS - len(ep.steps))
                if n > room:
                    ep.complete = False
                    self.steps_dropped += n - room
                    n = room
                if n:
                    last = ep.steps[-1]
                    step = dict(last, ts_ns=e.ts, duration_ns=e.duration_ns // e.arg0) \
                        if "duration_ns" in last else dict(last, ts_ns=e.ts)
                    ep.steps.extend([step] * n)
                return []
        self.orphans += 1   # its episode (or its first step) was never seen
        return []

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

    def open_cgroups(self, since_ns: int = 0) -> set[int]:
        """Cgroup ids of the charge and limit-write episodes still open (their
        exit not seen yet) that started at or after ``since_ns`` (older ones
        lost their exit: a missed return probe)."""
        return {ep.cgroup_id for slots in self._open.values() for kind, ep in slots.items()
                if kind in ("charge", "limit") and ep.ts_ns >= since_ns}

    def flush(self) -> list[Episode]:
        """Episodes still open (at close): returned incomplete."""
        out = []
        for slots in self._open.values():
            for ep in slots.values():
                ep.complete = False
                out.append(ep)
        self._open.clear()
        return out
