"""memory.high throttling: the handler's enter/exit events and the
reclaims between them make one over_high episode, which the cross-check
bounds by the model's penalty formula."""

from __future__ import annotations

import pytest

from memcgscope.collector.crosscheck import CrossChecker
from memcgscope.model.charge import high_penalty_jiffies
from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import CALLERS, EV, Event

pytestmark = pytest.mark.unit

CG, HIGH, USAGE, DEBT = 40, 8192, 8500, 200
HIGH_CALLER = next(k for k, v in CALLERS.items() if v == "high")


def handler(penalty, reclaim_pages=(DEBT,)):
    """The events of one handler call: enter (debt), reclaims tagged with
    the episode, exit with the sleep and the penalty the kernel computed."""
    ev = [Event(EV.HIGH_ENTER, 0, 7, 7, 1000, 0, CG, arg0=DEBT, usage=USAGE, max=1 << 20, memsw_max=HIGH,
                comm=b"hog")]
    for i, nr in enumerate(reclaim_pages):
        ev.append(Event(EV.RECLAIM, 0, 7, 7, 1100 + i, 1000, CG, arg0=nr, arg1=0xCC0, arg2=2, ret=3,
                        usage=USAGE, max=1 << 20, caller=HIGH_CALLER, duration_ns=50))
    ev.append(Event(EV.HIGH_EXIT, 0, 7, 7, 5000, 0, CG, arg0=DEBT, arg1=penalty * 4_000_000, arg2=penalty,
                    usage=USAGE, max=1 << 20, memsw_max=HIGH, duration_ns=4000))
    return ev


def assemble(events):
    a = EpisodeAssembler()
    out = [ep for e in events for ep in a.feed(e)]
    assert a.orphans == 0 and a.unknown == 0
    (ep,) = out
    return ep.to_json()


def test_handler_events_make_one_episode():
    low = high_penalty_jiffies("6.12", DEBT, USAGE, HIGH)
    d = assemble(handler(low, (DEBT, 32)))
    assert d["kind"] == "over_high" and d["nr_pages"] == DEBT and d["penalty_jiffies"] == low
    assert [s["nr_pages"] for s in d["steps"]] == [DEBT, 32] and d["steps"][0]["caller"] == "high"
    assert d["exit"]["high"] == HIGH and d["sleep_ns"] == low * 4_000_000
    assert CrossChecker("6.12", "v2", False).check(d).checks == [("over_high", "ok")]


def test_a_mutated_handler_episode_diverges():
    cc = CrossChecker("6.12", "v2", False)
    low = high_penalty_jiffies("6.12", DEBT, USAGE, HIGH)
    assert [x.reason for x in cc.check(assemble(handler(low // 2))).divergences] == ["high_penalty"]
    assert [x.reason for x in cc.check(assemble(handler(low, (DEBT, 48)))).divergences] == ["reclaim_args"]
