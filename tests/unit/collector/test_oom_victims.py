"""OOM trigger and victim: an oom_kill step or episode that names the
victim's cgroup is counted there, where the kernel counts memory.events
oom_kill; the per-cgroup check is two-sided once every victim is known."""

from __future__ import annotations

import pytest

from memcgscope.collector.crosscheck import AggregateChecker, CrossChecker, Tolerance
from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import EV, Event

pytestmark = pytest.mark.unit

PARENT, CHILD_A, CHILD_B = 10, 11, 12


def kill(victim_cgroup=None):
    ep = {"type": "episode", "kind": "oom_kill", "cgroup_id": PARENT, "victim_pid": 77, "pid": 5, "tid": 5,
          "comm": "charger", "ts_ns": 1, "cpu": 0, "steps": [], "ret": 0, "duration_ns": 0}
    if victim_cgroup is not None:
        ep["victim_cgroup_id"] = victim_cgroup
    return ep


def test_kills_count_on_the_victims_cgroup():
    cc = CrossChecker("6.12", "v2", False)
    agg = AggregateChecker("6.12", "v2", False, Tolerance(slack=0))
    for _ in range(2):
        agg.observe(cc.check(kill(CHILD_B)))
    assert agg.check_v2(CHILD_B, {"oom_kill": 2}) == []
    assert agg.check_v2(CHILD_A, {"oom_kill": 0}) == []
    # the kernel counting them on the sibling that charged is a divergence
    (d,) = agg.check_v2(CHILD_A, {"oom_kill": 2})
    assert d.reason == "events_oom_kill_mismatch" and "victims" in d.detail
    # and so is counting fewer on the victim's cgroup: two-sided once every victim is known
    (d,) = agg.check_v2(CHILD_B, {"oom_kill": 0})
    assert d.reason == "events_oom_kill_mismatch"


def test_one_sided_while_a_victim_is_unknown():
    cc = CrossChecker("6.12", "v2", False)
    agg = AggregateChecker("6.12", "v2", False, Tolerance(slack=0))
    agg.observe(cc.check(kill()))          # a kernel whose mark_victim hands over no task
    agg.observe(cc.check(kill(CHILD_B)))
    # a kill of an unknown cgroup may be anyone's: fewer is admitted, more than seen is not
    assert agg.check_v2(CHILD_A, {"oom_kill": 1}) == []
    assert agg.check_v2(CHILD_A, {"oom_kill": 0}) == []
    assert agg.check_v2(CHILD_B, {"oom_kill": 2}) == []
    (d,) = agg.check_v2(CHILD_A, {"oom_kill": 2})
    assert d.reason == "events_oom_kill_mismatch"


def test_assembly_carries_the_victim():
    a = EpisodeAssembler()
    (ep,) = a.feed(Event(EV.OOM_KILL, 0, 5, 5, 100, 0, PARENT, arg0=77, arg1=CHILD_B, flags=2,
                         comm=b"charger", data=b"victim\0"))
    d = ep.to_json()
    assert (d["cgroup_id"], d["victim_pid"], d["victim_cgroup_id"], d["victim_comm"]) == (PARENT, 77, CHILD_B,
                                                                                         "victim")
    (old,) = a.feed(Event(EV.OOM_KILL, 0, 5, 5, 100, 0, PARENT, arg0=77, flags=0, comm=b"charger"))
    assert "victim_cgroup_id" not in old.to_json()
