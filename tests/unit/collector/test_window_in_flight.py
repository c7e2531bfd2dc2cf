"""An aggregate window does not close over an episode in progress.

A charge's OOM loop raises a ``max`` event per reclaim pass into
memory.events at once, while its episode (and so the model's count) comes
with its exit. A cgroupfs read in the middle used to split the loop over two
windows: the kernel's count in one, the model's in the next, a divergence in
each (seen in a 7.3 guest's node run: events_max_mismatch twice). Busy
cgroups now keep their window open."""

from __future__ import annotations

import time
from types import SimpleNamespace

from memcgscope.collector.crosscheck.aggregate import AggregateChecker
from memcgscope.collector.crosscheck.reasons import CheckResult
from memcgscope.collector.daemon import Daemon
from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import EV, Event

PARENT, CHILD, SIBLING = 10, 11, 12
WATCHED = {PARENT: "/p", CHILD: "/p/a", SIBLING: "/p/b"}


def snap(max_events: int):
    return SimpleNamespace(failcnt={}, events={"max": max_events, "oom": 0, "oom_kill": 0})


def raw(parent_max: int) -> dict:
    return {"/p": snap(parent_max), "/p/a": snap(0), "/p/b": snap(0)}


def loop_result(n: int) -> CheckResult:
    """What replaying the OOM loop's episode gives: n max events on the parent."""
    return CheckResult(events={(PARENT, "max"): n})


def windows(defer: bool) -> list:
    """Baseline; the loop half done at the next read (20 max events in the
    file, the episode still open); it ends (no more events) and is replayed."""
    agg = AggregateChecker("7.3", "v2", memsw=False, forced_charges_visible=True)
    out = [agg.check(raw(0), WATCHED)]
    out.append(agg.check(raw(20), WATCHED, busy={PARENT, CHILD} if defer else ()))
    agg.observe(loop_result(20))
    out.append(agg.check(raw(20), WATCHED))
    return out


def test_a_window_stays_open_over_an_episode_in_progress():
    base, mid, end = windows(defer=True)
    assert not mid.divergences
    # the busy cgroups were not checked mid-loop; the sibling was
    assert mid.checks.count(("events_max", "ok")) == 1
    # the next read closes it: 20 in the file, 20 from the replay
    assert not end.divergences, end.divergences
    assert end.checks.count(("events_max", "ok")) == 3


def test_closing_the_window_mid_loop_diverges_twice():
    """The check can fail: without the deferral the same reads and replay
    are a divergence in each window."""
    _, mid, end = windows(defer=False)
    assert [d.reason for d in mid.divergences] == ["events_max_mismatch"]
    assert [d.reason for d in end.divergences] == ["events_max_mismatch"]


def test_the_deferred_cgroup_keeps_its_observations_the_others_do_not():
    agg = AggregateChecker("7.3", "v2", memsw=False, forced_charges_visible=True)
    agg.check(raw(0), WATCHED)
    agg.observe(CheckResult(events={(PARENT, "max"): 3, (SIBLING, "max"): 5}))
    res = agg.check(raw(3), WATCHED, busy={PARENT})
    # the sibling's 5 were consumed (its file said 0: beyond the slack of 2)
    assert [d.episode["cgroup_id"] for d in res.divergences] == [SIBLING]
    assert agg.events == {(PARENT, "max"): 3}


class _Resolver:
    def __init__(self, paths):
        self.paths = paths

    def path(self, cid):
        return self.paths.get(cid)


def _daemon(open_ids, extra_paths=None):
    d = Daemon.__new__(Daemon)
    d.session = SimpleNamespace(in_flight=lambda: set(open_ids))
    d.watch = SimpleNamespace(resolver=_Resolver(extra_paths or {}))
    return d


def test_busy_is_the_open_episodes_cgroup_and_its_ancestors():
    assert _daemon({CHILD})._busy(WATCHED) == {PARENT, CHILD}
    assert _daemon({SIBLING})._busy(WATCHED) == {PARENT, SIBLING}
    assert _daemon(set())._busy(WATCHED) == set()
    # an unwatched descendant found by the resolver
    assert _daemon({99}, {99: "/p/a/x"})._busy(WATCHED) == {PARENT, CHILD}
    # a prefix of a name is not an ancestor
    assert _daemon({99}, {99: "/p/ab"})._busy(WATCHED) == {PARENT}
    # unknown path (a removed cgroup): it holds no window
    assert _daemon({98})._busy(WATCHED) == set()
    assert _daemon({98, CHILD})._busy(WATCHED) == {PARENT, CHILD}


def _ev(type_, ts, tid=7, cgid=CHILD, **kw):
    return Event(type=type_, cpu=0, pid=tid, tid=tid, ts=ts, episode=ts, cgid=cgid, **kw)


def test_the_assembler_names_open_charges_and_limit_writes():
    a = EpisodeAssembler()
    now = time.monotonic_ns()
    a.feed(_ev(EV.CHARGE_ENTER, now, tid=1, cgid=CHILD))
    a.feed(_ev(EV.LIMIT_ENTER, now, tid=2, cgid=PARENT))
    a.feed(_ev(EV.CHARGE_ENTER, now - 60 * 10**9, tid=3, cgid=SIBLING))  # its exit was lost
    assert a.open_cgroups(now - 30 * 10**9) == {CHILD, PARENT}
    assert a.open_cgroups() == {CHILD, PARENT, SIBLING}
    a.feed(_ev(EV.CHARGE_EXIT, now + 5, tid=1, cgid=CHILD))
    assert a.open_cgroups(now - 30 * 10**9) == {PARENT}


def test_in_flight_reads_what_the_ring_buffer_holds_now():
    """The window the 6.18 guest's node run split although the episode was
    tracked: the OOM charge began and raised its 20 max events between the
    last poll and the cgroupfs read. in_flight() reads the ring buffer at
    the moment it is asked (after the read), without handing anything out."""
    import threading

    from memcgscope.probes.session import Session

    now = time.monotonic_ns()
    edges = [_ev(EV.CHARGE_ENTER, now, tid=1, cgid=CHILD), _ev(EV.LIMIT_EXIT, now, tid=2, cgid=SIBLING),
             _ev(EV.OOM_KILL, now, tid=3, cgid=PARENT, arg1=77, flags=2)]

    from dataclasses import astuple

    from memcgscope.probes.episodes import _EVENT

    def pack(e):   # the bytes the BPF side writes (decode_bytes reads them back)
        return _EVENT.pack(*(v if not isinstance(v, str) else v.encode() for v in astuple(e)))

    class Ring:
        def consume(self, limit=None):
            out, edges[:] = [pack(e) for e in edges], []
            return out

    s = Session.__new__(Session)
    s._ring_lock = threading.Lock()
    s._ring = Ring()
    s._pending = []
    s.assembler = EpisodeAssembler()
    assert s.in_flight() == {CHILD, SIBLING, PARENT, 77}
    # nothing handed out: the next poll gets them
    assert len(s._pending) == 3
