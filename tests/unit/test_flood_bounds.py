"""Bounds under a flood of events. A memory.max write that another writer
supersedes loops for ever on kernels without the break (5.10.262, 6.18.15:
mem_cgroup_out_of_memory finds margin under the new limit and returns true,
pass after pass), tracing thousands of OOM steps a second. In a 5.10 guest
the reader never found the ring buffer empty, poll() never returned, and the
open episode's steps filled 1.7 GB until the guest's OOM killer ended the
collector. poll() now returns after CONSUME_LIMIT records and an episode
keeps MAX_STEPS steps."""

from __future__ import annotations

import threading

import pytest

from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import EV, Event
from memcgscope.probes.session import Session

pytestmark = pytest.mark.unit


class _EndlessRing:
    """A ring buffer whose producer is always ahead (what consume() sees
    under a flood): it hands out as many records as it is asked for."""

    def __init__(self):
        self.asked = []

    def consume(self, limit=None):
        self.asked.append(limit)
        if limit is None:
            raise AssertionError("an unbounded consume() never returns under a flood")
        return [b""] * limit


def test_poll_reads_a_bounded_batch():
    s = Session.__new__(Session)
    s._ring_lock = threading.Lock()
    s._ring = _EndlessRing()
    s._pending = []
    s._consume()
    assert s._ring.asked == [Session.CONSUME_LIMIT]


def _ev(type_, ts, episode, **kw):
    return Event(type=type_, cpu=0, pid=5, tid=5, ts=ts, episode=episode, cgid=9, **kw)


def test_an_episode_keeps_at_most_max_steps(monkeypatch):
    monkeypatch.setattr(EpisodeAssembler, "MAX_STEPS", 10)
    a = EpisodeAssembler()
    a.feed(_ev(EV.LIMIT_ENTER, 100, 100, arg0=1, arg1=4096))
    for i in range(25):
        assert a.feed(_ev(EV.OOM, 101 + i, 100, ret=1)) == []
    (ep,) = a.feed(_ev(EV.LIMIT_EXIT, 200, 100, arg0=1, ret=3, duration_ns=100))
    assert len(ep.steps) == 10 and a.steps_dropped == 15
    assert ep.complete is False   # the cross-check skips it rather than replaying a part


def test_a_short_episode_is_whole(monkeypatch):
    monkeypatch.setattr(EpisodeAssembler, "MAX_STEPS", 10)
    a = EpisodeAssembler()
    a.feed(_ev(EV.LIMIT_ENTER, 100, 100, arg0=1, arg1=4096))
    for i in range(10):
        a.feed(_ev(EV.OOM, 101 + i, 100, ret=1))
    (ep,) = a.feed(_ev(EV.LIMIT_EXIT, 200, 100, arg0=1, ret=3, duration_ns=100))
    assert len(ep.steps) == 10 and ep.complete and a.steps_dropped == 0


def test_a_repeat_is_the_last_step_again():
    """EV_REPEAT (the BPF side's run-length encoded OOM loop) expands into
    that many copies of the episode's last step, with the repeats' mean
    duration: consumers see the loop as the kernel ran it."""
    a = EpisodeAssembler()
    a.feed(_ev(EV.LIMIT_ENTER, 100, 100, arg0=2, arg1=4096))
    a.feed(_ev(EV.OOM, 101, 100, ret=1, duration_ns=50))
    assert a.feed(_ev(EV.REPEAT, 150, 100, arg0=4, duration_ns=400)) == []
    (ep,) = a.feed(_ev(EV.LIMIT_EXIT, 200, 100, arg0=2, ret=3, duration_ns=100))
    assert [s["kind"] for s in ep.steps] == ["oom"] * 5
    assert [s["result"] for s in ep.steps] == [True] * 5
    assert ep.steps[0]["duration_ns"] == 50 and {s["duration_ns"] for s in ep.steps[1:]} == {100}
    assert {s["ts_ns"] for s in ep.steps[1:]} == {150} and ep.complete is not False
    assert a.orphans == 0


def test_repeats_past_max_steps_are_dropped_and_counted(monkeypatch):
    monkeypatch.setattr(EpisodeAssembler, "MAX_STEPS", 10)
    a = EpisodeAssembler()
    a.feed(_ev(EV.LIMIT_ENTER, 100, 100, arg0=2, arg1=4096))
    a.feed(_ev(EV.OOM, 101, 100, ret=1))
    a.feed(_ev(EV.REPEAT, 150, 100, arg0=65536, duration_ns=65536))
    a.feed(_ev(EV.REPEAT, 160, 100, arg0=3))
    (ep,) = a.feed(_ev(EV.LIMIT_EXIT, 200, 100, arg0=2, ret=3, duration_ns=100))
    assert len(ep.steps) == 10 and a.steps_dropped == 65536 + 3 - 9 and ep.complete is False


def test_a_repeat_without_its_episode_is_an_orphan():
    a = EpisodeAssembler()
    assert a.feed(_ev(EV.REPEAT, 150, 100, arg0=4)) == []
    a.feed(_ev(EV.LIMIT_ENTER, 200, 200, arg0=2, arg1=4096))
    assert a.feed(_ev(EV.REPEAT, 250, 200, arg0=4)) == []     # no step yet to repeat
    assert a.orphans == 2
