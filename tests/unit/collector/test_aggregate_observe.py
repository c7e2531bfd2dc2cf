"""AggregateChecker.observe adds each result's counts in place (no
Counter.update per episode): the same totals as Counter.update, for the
plain dicts CheckResult holds and for Counters."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from memcgscope.collector.crosscheck import AggregateChecker
from memcgscope.collector.crosscheck.reasons import CheckResult

pytestmark = pytest.mark.unit


def _reference(results):
    """What observe did with Counter.update."""
    failures, events, victims, kills, unknown = Counter(), Counter(), Counter(), 0, 0
    for r in results:
        failures.update(r.failures)
        events.update(r.events)
        kills += r.kills
        known = sum(r.victims.values())
        victims.update(r.victims)
        unknown += max(0, r.kills - known)
    return failures, events, victims, kills, unknown


@pytest.mark.parametrize("seed", range(10))
def test_observe_adds_like_counter_update(seed):
    r = random.Random(seed)
    results = []
    for _ in range(200):
        res = CheckResult()
        for _ in range(r.choice([0, 0, 1, 3])):
            k = (r.choice([5, 9]), r.choice(["memory", "memsw"]))
            res.failures[k] = res.failures.get(k, 0) + r.randint(1, 3)
        for _ in range(r.choice([0, 1, 2])):
            res.events[(r.choice([5, 9]), r.choice(["max", "oom"]))] = r.randint(1, 40)
        res.kills = r.choice([0, 0, 1, 2])
        for _ in range(r.randint(0, res.kills + 1)):   # more known victims than kills: none unknown
            res.victims[r.choice([5, 9, 11])] = r.randint(1, 2)
        if r.random() < 0.2:   # a Counter is added like a dict
            res.events = Counter(res.events)
        results.append(res)
    agg = AggregateChecker("6.12", "v2", False)
    for res in results:
        agg.observe(res)
    f, e, v, kills, unknown = _reference(results)
    assert (agg.failures, agg.events, agg.victims, agg.kills, agg.unknown_victims) == (f, e, v, kills, unknown)
    assert isinstance(agg.events, Counter) and list(agg.events) == list(e)
    assert unknown > 0 and kills > 0 and f and e and v
