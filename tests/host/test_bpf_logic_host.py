"""The BPF side's state machine on this host's real verifier and JIT,
driven through BPF_PROG_TEST_RUN (bpfdrive.py): each test is a sequence of
probe hits of this thread, then a look at the maps."""

from __future__ import annotations

import os

import pytest

from bpfdrive import Drive

from memcgscope.collector.metrics import BUCKET_BOUND_EXPONENTS
from memcgscope.probes.program import HIST_SLOTS

MEMCG = 0x1000_0000   # made-up memcg addresses: map keys only
OTHER = 0x2000_0000


@pytest.fixture(scope="module")
def drive():
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})   # per-CPU contexts: stay on one CPU
    d = Drive()
    try:
        yield d
    finally:
        d.close()
        os.sched_setaffinity(0, saved)


def charge(d, memcg, nr=1, sp=4000, ret=0):
    d.call("charge_enter", memcg, 0xcc0, nr, sp)
    d.call("charge_exit", ret)


def test_fast_charges_are_counted(drive):
    before = drive.charge_stats(MEMCG)["calls"]
    for _ in range(3):
        charge(drive, MEMCG)
    assert drive.charge_stats(MEMCG)["calls"] == before + 3


def test_nested_charges_count_once(drive):
    before = drive.charge_stats(OTHER)["calls"]
    drive.call("charge_enter", OTHER, 0xcc0, 1, 4000)
    drive.call("pc_enter", OTHER + 0x100, 64, 0)    # the outer charge goes to its per-task context
    drive.call("charge_enter", OTHER, 0xcc0, 1, 3000)   # deeper on this stack: nested
    drive.call("charge_exit", 0)
    drive.call("charge_enter", OTHER, 0x820, 1, 1 << 60, 1)   # on another stack (an interrupt's)
    drive.call("charge_exit", 0)
    drive.call("charge_exit", 0)
    assert drive.charge_stats(OTHER)["calls"] == before + 1


def test_missed_return_does_not_swallow_later_charges(drive):
    """A kretprobe that found no free instance never reports the return: the
    task's open charge context must not make its later charges look nested
    (review bug: every later charge of the thread went uncounted)."""
    memcg = MEMCG + 0x10
    reset0 = drive.per_cpu_sum("ctx_reset")
    drive.call("charge_enter", memcg, 0xcc0, 1, 4000)
    drive.call("pc_enter", memcg + 0x100, 64, 0)   # promoted: a slow charge
    # ... its return is missed; the same thread charges again from as high a frame
    for _ in range(4):
        charge(drive, memcg, sp=4000)
    assert drive.charge_stats(memcg)["calls"] == 4
    assert drive.per_cpu_sum("ctx_reset") == reset0 + 1
    # and a missed return of a fast charge (per-CPU context) likewise
    drive.call("charge_enter", memcg, 0xcc0, 1, 4000)
    charge(drive, memcg, sp=4000)
    assert drive.charge_stats(memcg)["calls"] == 5


def test_log2_slots_cover_every_bucket_bound(drive):
    """Durations clamp into the last slot; every Prometheus bound must lie
    below it (review bug: slots clamped at 31 under bounds of 2^32, 2^34)."""
    assert drive.call("log2", 1 << 20) == 20
    top = max(BUCKET_BOUND_EXPONENTS)
    assert drive.call("log2", 1 << top) == top
    assert drive.call("log2", (1 << top) * 4) == top + 2
    assert drive.call("log2", 1 << 63) == HIST_SLOTS - 1 > top


def test_map_full_drops_are_counted():
    d = Drive(MAX_CGROUPS=2)
    try:
        for i in range(4):
            charge(d, MEMCG + 0x1000 * (i + 1))
        assert d.map_full("charge_stats") == 2
        assert d.map_full("tasks") == 0
    finally:
        d.close()
