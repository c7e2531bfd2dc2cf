"""Events from the BPF side assembled into episodes (design in
docs/architecture.md; the event layout and the episode JSON form are the
contract of probes/episodes.py).

An episode is one slow-path call of the charge core, or one limit write,
with its nested steps in order; page-charge failures, OOM kills outside a
charge and (tracepoint mode) memcg reclaims stand alone. Assembly is pure
Python: `EpisodeAssembler.feed(Event)` returns the episodes that event
completed; `feed_all([decode_fields(buf), ...])`, the collector's path,
does the same for a poll's events as field tuples (one implementation:
`feed` and `feed_fields` hand their one event to it).
"""

from __future__ import annotations

from operator import attrgetter

from .episodes import CALLERS, EV, EVENT_FIELDS, LIMIT_KINDS, Episode, Event, text as _text

__all__ = ["EpisodeAssembler"]


#: an Event's fields as the tuple decode_fields() gives (struct event_t order)
_fields_of = attrgetter(*(name for name, _, _ in EVENT_FIELDS))
_STEP_TYPES = frozenset((EV.RECLAIM, EV.COUNTER_FAIL, EV.DRAIN, EV.OOM, EV.OOM_KILL))
_OOM, _RECLAIM, _COUNTER_FAIL, _DRAIN = EV.OOM, EV.RECLAIM, EV.COUNTER_FAIL, EV.DRAIN
_CHARGE_ENTER, _CHARGE_EXIT, _REPEAT = EV.CHARGE_ENTER, EV.CHARGE_EXIT, EV.REPEAT
_COMMS_MAX = 4096   # distinct comm texts remembered


def _counters(usage, mx, memsw_usage, memsw_max, memsw: bool) -> dict:
    if memsw:
        return {"usage": usage, "max": mx, "memsw_usage": memsw_usage, "memsw_max": memsw_max}
    return {"usage": usage, "max": mx}


def _victim(arg0, arg1, flags, data) -> dict:
    """An OOM kill's victim: its pid, and where the tracepoint handed over
    its task (flags bit 1), its own memcg and comm. The event's cgroup is
    the trigger: the memcg whose OOM ran."""
    d = {"victim_pid": arg0}
    if flags & 2:
        d["victim_cgroup_id"] = arg1
        d["victim_comm"] = _text(data)
    return d


class EpisodeAssembler:
    """Groups events by task into episodes. `memsw` says whether the v1
    memsw counters are meaningful (v1 with swap accounting)."""

    STEP_TYPES = _STEP_TYPES
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
        self._comms: dict = {}  # comm as sent -> its text

    def feed(self, e: Event) -> list[Episode]:
        return self.feed_fields(_fields_of(e))

    def feed_fields(self, f: tuple) -> list[Episode]:
        """``feed`` of an event as its field tuple, in struct event_t order
        (``decode_fields`` of the ring buffer's bytes)."""
        return self.feed_all((f,))

    def feed_all(self, events) -> list[Episode]:
        """``feed_fields`` of each field tuple in turn → the episodes they
        completed, in order: the collector's path (a poll's records in one
        call, no Event built per event, the assembler's state read once)."""
        out: list[Episode] = []
        memsw = self.memsw
        open_get, open_pop = self._open.get, self._open.pop
        max_steps = self.MAX_STEPS
        for f in events:
            (t, cpu, pid, tid, ts, episode, cgid, arg0, arg1, arg2, ret, usage, mx, memsw_usage, memsw_max,
             duration_ns, caller, flags, comm, data) = f
            slots = open_get(tid)
            hit = False
            if slots and t in _STEP_TYPES:
                # the common case first: a step of the innermost open episode it was tagged with
                for ep in slots.values():
                    if ep.ts_ns == episode:
                        steps = ep.steps
                        if len(steps) < max_steps:
                            # the dicts of _step(), built inline (one call less per step)
                            if t == _OOM:
                                steps.append({"kind": "oom", "ts_ns": ts, "cgroup_id": cgid, "gfp": arg0,
                                              "order": arg1, "result": bool(ret), "duration_ns": duration_ns,
                                              "after": {"usage": usage, "max": mx, "memsw_usage": memsw_usage,
                                                        "memsw_max": memsw_max} if memsw
                                              else {"usage": usage, "max": mx}})
                            elif t == _RECLAIM:
                                steps.append({"kind": "reclaim", "ts_ns": ts, "cgroup_id": cgid, "nr_pages": arg0,
                                              "gfp": arg1, "options": arg2, "freed": ret,
                                              "caller": CALLERS.get(caller, "other"), "duration_ns": duration_ns,
                                              "after": {"usage": usage, "max": mx, "memsw_usage": memsw_usage,
                                                        "memsw_max": memsw_max} if memsw
                                              else {"usage": usage, "max": mx}})
                            elif t == _COUNTER_FAIL:
                                steps.append({"kind": "counter_fail", "ts_ns": ts, "cgroup_id": cgid,
                                              "counter": "memsw" if arg0 else "memory", "nr_pages": arg1,
                                              "at": {"usage": usage, "max": mx, "memsw_usage": memsw_usage,
                                                     "memsw_max": memsw_max} if memsw
                                              else {"usage": usage, "max": mx}})
                            elif t == _DRAIN:
                                steps.append({"kind": "drain", "ts_ns": ts, "cgroup_id": cgid or None})
                            else:
                                steps.append({"kind": "oom_kill", "ts_ns": ts, "cgroup_id": cgid,
                                              **_victim(arg0, arg1, flags, data)})
                        else:
                            ep.complete = False
                            self.steps_dropped += 1
                        hit = True
                        break
                if hit:
                    continue
            if t == _REPEAT:
                self._repeat(episode, arg0, ts, duration_ns, slots)
                continue
            if t == _CHARGE_ENTER:
                comm = self._comms.get(comm) or self._comm(comm)
                ep = Episode("charge", ts, pid, tid, comm, cpu, cgid, {"gfp": arg0, "nr_pages": arg1},
                             entry={"usage": usage, "max": mx, "memsw_usage": memsw_usage, "memsw_max": memsw_max}
                             if memsw else {"usage": usage, "max": mx})
                if slots is None:
                    slots = self._slots(tid)
                slots["charge"] = ep
                continue
            if t == _CHARGE_EXIT:
                ep = slots.pop("charge", None) if slots else None
                if ep is None:
                    self.orphans += 1
                    ep = Episode("charge", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                 {"gfp": arg0, "nr_pages": arg1}, complete=False)
                ep.ret, ep.duration_ns = ret, duration_ns
                ep.exit = ({"usage": usage, "max": mx, "memsw_usage": memsw_usage, "memsw_max": memsw_max}
                           if memsw else {"usage": usage, "max": mx})
                if not slots:
                    open_pop(tid, None)   # _gc
                out.append(ep)
                continue
            if t == EV.LIMIT_ENTER:
                kind = LIMIT_KINDS.get(arg0, str(arg0))
                if kind == "memory.limit_in_bytes" and arg2:
                    kind = "memory.memsw.limit_in_bytes"
                args = {"file": kind, "value": arg1}
                text = _text(data)
                if text:
                    args["text"] = text
                ep = Episode("limit_write", ts, pid, tid, self._comm(comm), cpu, cgid, args,
                             entry=_counters(usage, mx, memsw_usage, memsw_max, memsw) if arg0 == 1 else None)
                self._slots(tid)["limit"] = ep
                continue
            if t == EV.LIMIT_EXIT:
                ep = slots.pop("limit", None) if slots else None
                if ep is None:
                    self.orphans += 1
                    ep = Episode("limit_write", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                 {"file": LIMIT_KINDS.get(arg0, str(arg0)), "value": arg1}, complete=False)
                ep.ret, ep.duration_ns = ret, duration_ns
                ep.exit = _counters(usage, mx, memsw_usage, memsw_max, memsw) if flags & 1 else None
                self._gc(tid)
                out.append(ep)
                continue
            if t in _STEP_TYPES:
                if episode:
                    self.orphans += 1
                if t == EV.OOM_KILL:
                    out.append(Episode("oom_kill", ts, pid, tid, self._comm(comm), cpu, cgid,
                                       _victim(arg0, arg1, flags, data), ret=0, duration_ns=0))
                    continue
                if t == EV.RECLAIM:
                    out.append(Episode("reclaim", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                       {"caller": CALLERS.get(caller, "other"), "nr_pages": arg0, "gfp": arg1,
                                        "options": arg2}, steps=[], ret=ret,
                                       exit=_counters(usage, mx, memsw_usage, memsw_max, memsw),
                                       duration_ns=duration_ns))
                # else a drain or OOM outside any episode: counted in the maps
                continue
            if t == EV.PAGE_CHARGE_FAIL:
                out.append(Episode("page_charge_fail", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                   {"nr_pages": arg0, "gfp": arg1}, ret=ret, duration_ns=duration_ns))
                continue
            if t == EV.TP_RECLAIM:
                out.append(Episode("reclaim", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                   {"caller": "unknown", "gfp": arg1, "attribution": "task"},
                                   ret=ret, exit=_counters(usage, mx, memsw_usage, memsw_max, memsw),
                                   duration_ns=duration_ns))
                continue
            if t == EV.HIGH_ENTER:
                # memory.high throttling on return to user space; counters carry
                # memory.high (the v2 memsw slot, see high_counters in the C)
                ep = Episode("over_high", ts, pid, tid, self._comm(comm), cpu, cgid, {"nr_pages": arg0},
                             entry={"usage": usage, "max": mx, "high": memsw_max})
                self._slots(tid)["high"] = ep
                continue
            if t == EV.HIGH_EXIT:
                ep = slots.pop("high", None) if slots else None
                if ep is None:
                    self.orphans += 1
                    ep = Episode("over_high", ts - duration_ns, pid, tid, self._comm(comm), cpu, cgid,
                                 {"nr_pages": arg0}, complete=False)
                ep.ret, ep.exit, ep.duration_ns = 0, {"usage": usage, "max": mx, "high": memsw_max}, duration_ns
                ep.args["sleep_ns"] = arg1
                ep.args["penalty_jiffies"] = arg2
                self._gc(tid)
                out.append(ep)
                continue
            # an event this memcgscope does not know (a newer BPF side): counted, not fatal
            self.unknown += 1
        return out

    def _repeat(self, episode: int, n: int, ts: int, duration_ns: int, slots) -> None:
        """EV_REPEAT: the episode's last step (an OOM step) happened ``n``
        more times (probes/memcgscope.bpf.c on_oom_exit: the OOM retry loop,
        run-length encoded); expanded here into that many steps (one dict,
        shared), so every consumer sees the loop as the kernel ran it. Their
        duration is the repeats' mean, their time the send's."""
        for ep in (slots or {}).values():
            if ep.ts_ns == episode and ep.steps:
                room = max(0, self.MAX_STEPS - len(ep.steps))
                total = n
                if n > room:
                    ep.complete = False
                    self.steps_dropped += n - room
                    n = room
                if n:
                    last = ep.steps[-1]
                    step = dict(last, ts_ns=ts)
                    if "duration_ns" in last:
                        step["duration_ns"] = duration_ns // total
                    ep.steps.extend([step] * n)
                return
        self.orphans += 1   # its episode (or its first step) was never seen

    def _comm(self, comm) -> str:
        """text(comm), remembered: a node has few distinct comms, and every
        episode's first event converts one."""
        s = self._comms.get(comm)
        if s is None:
            s = _text(comm)
            if len(self._comms) < _COMMS_MAX:
                self._comms[comm] = s
        return s

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
