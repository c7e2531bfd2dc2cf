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


@pytest.fixture
def one_cpu():
    """Per-CPU contexts: the calls of a test on one CPU."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
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


def test_fast_charges_are_timed_one_in_lat_sample(one_cpu):
    """No clock read on most fast charges: 1 in LAT_SAMPLE is timed and
    stands for LAT_SAMPLE charges in the histogram and the ns sum; with
    LAT_SAMPLE=1 every charge is (the old behaviour)."""
    for n, charges in ((8, 32), (1, 5)):
        d = Drive(LAT_SAMPLE=n)
        try:
            memcg = MEMCG + 0x20
            for _ in range(charges):
                charge(d, memcg)
            st = d.stats("charge_stats", memcg)
            assert st["calls"] == charges
            assert d.latency(memcg) == charges, (n, d.latency(memcg))   # (charges / n) samples x n
            assert st["ns"] > 0
        finally:
            d.close()
    d = Drive(LAT_SAMPLE=1000)
    try:
        for _ in range(10):
            charge(d, MEMCG + 0x30)
        assert d.stats("charge_stats", MEMCG + 0x30)["calls"] == 10
        assert d.latency(MEMCG + 0x30) == 0 and d.stats("charge_stats", MEMCG + 0x30)["ns"] == 0
    finally:
        d.close()


def test_a_slow_charge_is_timed_even_when_not_sampled(one_cpu):
    d = Drive(LAT_SAMPLE=1000)
    try:
        memcg = MEMCG + 0x40
        d.call("charge_enter", memcg, 0xcc0, 1, 4000)
        d.call("pc_enter", memcg + 0x100, 64, 0)     # promoted: timed from here
        d.call("pc_exit", 1)
        d.call("charge_exit", 0)
        assert d.latency(memcg) == 1                # weight 1: slow charges exactly
        assert d.stats("charge_stats", memcg)["calls"] == 1
    finally:
        d.close()


def test_the_page_charge_exit_takes_the_charge_core_call_inside_it(one_cpu):
    """The page charge has no entry program: its exit counts the memcg and
    size the charge core left on this CPU, once; a page charge without one
    (the root memcg, 6.1+) counts under memcg 0; a failure is an event with
    the core's memcg, size and gfp."""
    d = Drive()
    try:
        memcg = MEMCG + 0x50
        d.poll()
        d.call("charge_enter", memcg, 0xcc0, 4, 4000)
        d.call("charge_exit", 0)
        d.call("page_exit", 0)
        assert d.stats("page_charge_stats", memcg)["calls"] == 1
        assert d.stats("page_charge_stats", memcg)["pages"] == 4
        zero = d.stats("page_charge_stats", 0)["calls"]
        d.call("page_exit", 0)                      # no core call since: not memcg's again
        assert d.stats("page_charge_stats", memcg)["calls"] == 1
        assert d.stats("page_charge_stats", 0)["calls"] == zero + 1
        # a failing page charge: its core call failed just before
        d.call("charge_enter", memcg, 0x1c20ca, 512, 4000)
        d.call("charge_exit", -12)
        d.call("page_exit", -12)
        st = d.stats("page_charge_stats", memcg)
        assert st["calls"] == 2 and st["fail_enomem"] == 1
        from memcgscope.probes.episodes import EV, decode_bytes
        evs = [decode_bytes(b) for b in d.poll()]
        fails = [e for e in evs if e.type == EV.PAGE_CHARGE_FAIL]
        assert len(fails) == 1 and fails[0].arg0 == 512 and fails[0].arg1 == 0x1c20ca and fails[0].ret == -12
        assert [e.type for e in evs].count(EV.CHARGE_EXIT) == 1     # the core's own episode
    finally:
        d.close()


def _oom_loop(d, memcg, results):
    """A slow charge whose steps are OOM passes with these results."""
    d.call("charge_enter", memcg, 0xcc0, 1, 4000)
    d.call("pc_enter", memcg + 0x100, 64, 0)
    for r in results:
        d.call("oom_enter", memcg, 0xcc0, 0)
        d.call("oom_exit", r)
    d.call("charge_exit", -12)


def _kinds(d):
    from memcgscope.probes.episodes import EV, decode_bytes
    names = {v: k for k, v in vars(EV).items() if k.isupper()}
    return [(names[e.type], e.arg0 if e.type == EV.REPEAT else e.ret if e.type == EV.OOM else None)
            for e in (decode_bytes(b) for b in d.poll())]


def test_identical_oom_passes_go_out_as_one_repeat(one_cpu):
    """The OOM retry loop, run-length encoded: the first pass is sent, the
    identical ones after it are counted and sent as one EV_REPEAT before the
    episode's next event; a different pass ends the run."""
    d = Drive()
    try:
        d.poll()
        _oom_loop(d, MEMCG + 0x60, [1, 1, 1, 1, 1])
        assert _kinds(d) == [("CHARGE_ENTER", None), ("OOM", 1), ("REPEAT", 4), ("CHARGE_EXIT", None)]
        _oom_loop(d, MEMCG + 0x60, [1, 1, 0, 1])
        assert _kinds(d) == [("CHARGE_ENTER", None), ("OOM", 1), ("REPEAT", 1), ("OOM", 0), ("OOM", 1),
                             ("CHARGE_EXIT", None)]
        _oom_loop(d, MEMCG + 0x60, [1])          # a new episode starts a new run
        assert _kinds(d) == [("CHARGE_ENTER", None), ("OOM", 1), ("CHARGE_EXIT", None)]
    finally:
        d.close()


def test_repeats_go_before_the_episodes_next_step(one_cpu):
    """The flush sits only at the sends that can follow an OOM step of the
    same episode (emit_step): a reclaim after the loop (memory.high's
    synchronous reclaim after a charge that an OOM let through) gets the
    repeats ahead of it, and the episode's exit finds no run left."""
    d = Drive()
    try:
        memcg = MEMCG + 0x64
        d.poll()
        d.call("charge_enter", memcg, 0xcc0, 1, 4000)
        d.call("pc_enter", memcg + 0x100, 64, 0)
        for _ in range(3):
            d.call("oom_enter", memcg, 0xcc0, 0)
            d.call("oom_exit", 1)
        d.call("reclaim_enter", memcg, 96, 0xcc0, 2)
        d.call("reclaim_exit", 40)
        d.call("charge_exit", 0)
        assert _kinds(d) == [("CHARGE_ENTER", None), ("OOM", 1), ("REPEAT", 2), ("RECLAIM", None),
                             ("CHARGE_EXIT", None)]
    finally:
        d.close()


def test_an_endless_oom_loop_still_shows_progress(one_cpu):
    d = Drive(REPEAT_FLUSH=3)
    try:
        d.poll()
        _oom_loop(d, MEMCG + 0x70, [1] * 8)
        assert _kinds(d) == [("CHARGE_ENTER", None), ("OOM", 1), ("REPEAT", 3), ("REPEAT", 3), ("REPEAT", 1),
                             ("CHARGE_EXIT", None)]
    finally:
        d.close()
