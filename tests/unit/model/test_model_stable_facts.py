"""The facts stable releases and 7.x changed, each under a profile that has
it (the branch taken) and one that lacks it (not taken): the MMF_OOM_SKIP
bail, 7.3.4's max event on a rejected charge, the superseded-limit and
dying-memcg breaks of the limit loops, the dying-task bail of
mem_cgroup_handle_over_high, the gfp of the sync memory.high reclaim
(6.1.56), the stock's eviction (6.18 random, 6.18.36+ and 7.x round
robin) and 7.3's release of an empty slot, memsw failcnt (6.15–6.18.49 vs
6.18.50+ and 7.2.4+) and sock_throttled (7.2+)."""

import errno

import pytest
from model_helpers import fill, freeing, limited, pages

from memcgscope.model import GFP, Kernel, Task
from memcgscope.model.context import DYING_POINTS, SUPERSEDED_POINTS
from memcgscope.model.profiles import PROFILES

pytestmark = pytest.mark.unit

ENOMEM = -errno.ENOMEM


def recorder(answer):
    calls = []

    def oracle(*args):
        calls.append(args)
        return answer(*args)
    oracle.calls = calls
    return oracle


def max_events(r):
    return [s.cgroup for s in r.of("event") if s.name == "max"]


def having(field):
    return [n for n, p in PROFILES.items() if getattr(p, field)]


def lacking(field):
    return [n for n, p in PROFILES.items() if not getattr(p, field)]


def test_the_profiles_are_the_researched_ones():
    assert having("oom_skip_bails") == ["6.12", "6.18.51", "7.2", "7.3.0", "7.3"]
    assert having("limit_superseded_break") == ["6.1", "6.12.109", "6.12", "6.18.50", "6.18.51",
                                                "7.2.4", "7.2", "7.3.0", "7.3"]
    assert having("limit_dying_break") == ["7.3.0", "7.3"]
    assert having("rejected_charge_raises_max") == ["7.3"]
    assert having("stock_release_empty") == ["7.3.0", "7.3"]
    assert [n for n, p in PROFILES.items() if p.stock_evict == "round_robin"] == \
        ["6.18.36", "6.18.50", "6.18.51", "7.2.0", "7.2.4", "7.2", "7.3.0", "7.3"]
    assert [n for n, p in PROFILES.items() if p.failcnt_counters == ("memory",)] == \
        ["6.18", "6.18.36", "7.2.0"]
    assert [n for n, p in PROFILES.items() if "sock_throttled" in p.memory_events_keys] == \
        ["7.2.0", "7.2.4", "7.2", "7.3.0", "7.3"]
    assert lacking("over_high_dying_bail") == ["5.10.0", "5.10", "5.15", "6.1.0", "6.1.56", "6.1", "6.6"]
    assert lacking("sync_high_charge_gfp") == ["5.10.0", "5.10", "5.15", "6.1.0"]


# -- MMF_OOM_SKIP: an OOM victim the reaper is done with --------------------------------

@pytest.mark.parametrize("profile", ["5.10", "6.1", "6.12.109", "6.12", "6.18", "6.18.50", "6.18.51",
                                     "7.2.4", "7.2", "7.3.0", "7.3"])
def test_a_reaped_oom_victim_fails_before_reclaim(profile):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.KERNEL, task=Task(oom_reaped=True))
    assert r.ret == ENOMEM
    if k.profile.oom_skip_bails:
        # right after the counter failures: no max event (7.3.4+: the one at
        # `out:`), no reclaim, no drain, no OOM
        assert r.steps[-1].reason == "oom_skip"
        assert r.kinds() == ["counter_fail", "batch_shrink", "retry", "counter_fail"] + \
            (["event"] if k.profile.rejected_charge_raises_max else []) + ["nomem"]
        assert max_events(r) == (["/a"] if profile == "7.3" else [])
    else:
        assert r.steps[-1].reason == "oom" and len(r.of("reclaim")) == 18


@pytest.mark.parametrize("profile", ["6.12", "7.2", "6.12.109"])
def test_the_bail_goes_to_nomem_where_high_and_nofail_force(profile):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    for extra, reason in ((GFP.HIGH, "high"), (GFP.NOFAIL, "nofail")):
        r = k.charge(a, 1, GFP.KERNEL | extra, task=Task(oom_reaped=True))
        assert r.ret == 0 and r.steps[-2].reason == reason
        # forced with the one max event a forced charge raises (≥ 6.1)
        assert max_events(r) == ["/a"] * (1 if k.profile.oom_skip_bails else 18)
        assert bool(r.of("reclaim")) != k.profile.oom_skip_bails


def test_oom_skip_is_asked_after_the_blocking_test_and_the_oracle_decides():
    k, a = limited("6.12", "v2", 10)
    fill(k, a, 10)
    sig = recorder(lambda m, where: where == "oom_skip")
    r = k.charge(a, 1, GFP.NOWAIT, signal=sig)
    assert r.steps[-1].reason == "no_direct_reclaim" and sig.calls == []
    r = k.charge(a, 1, GFP.KERNEL, task=Task(oom_reaped=False), signal=sig)
    assert r.steps[-1].reason == "oom_skip" and [c[1] for c in sig.calls] == ["oom_skip"]
    # the task field answers without an oracle
    assert k.charge(a, 1, task=Task(oom_reaped=False)).steps[-1].reason == "oom"


# -- 7.3.4: max on a rejected charge ----------------------------------------------------

@pytest.mark.parametrize("profile", ["7.2", "7.3.0", "7.3"])
def test_a_v1_memcg_in_oom_rejection_raises_max_on_7_3_4(profile):
    k, a = limited(profile, "v1", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(memcg_in_oom=a))
    assert r.ret == ENOMEM and r.steps[-1].reason == "memcg_in_oom"
    assert max_events(r) == (["/a"] if profile == "7.3" else [])
    assert a.event("max", local=True) == (1 if profile == "7.3" else 0)


@pytest.mark.parametrize("profile", ["7.2", "7.3"])
def test_a_rejection_after_reclaim_raises_no_second_max(profile):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.KERNEL | GFP.NORETRY)
    # two passes (the drain in between), each raised its own
    assert r.steps[-1].reason == "noretry" and max_events(r) == ["/a", "/a"]


@pytest.mark.parametrize("profile,late", [("6.12", False), ("7.2", False), ("7.3", True)])
def test_a_forced_charge_raises_max_at_out_after_the_charge_on_7_3_4(profile, late):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(pf_memalloc=True))
    kinds = r.kinds()
    assert r.ret == 0 and kinds.count("event") == 1
    assert (kinds.index("event") > kinds.index("force")) == late


# -- the superseded-limit break ---------------------------------------------------------

@pytest.mark.parametrize("fname", ["memory.max", "memory.high"])
@pytest.mark.parametrize("profile", ["5.10", "6.1.56", "6.1", "6.12.0", "6.12.109", "6.18", "6.18.50",
                                     "7.2.0", "7.2.4", "7.3"])
def test_a_limit_write_stops_once_superseded(profile, fname):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 600)
    # another writer's limit lands after the first pass (the drain)
    sup = recorder(lambda m, where: len(sup.calls) >= 2)
    r = k.write_ex(a, fname, pages(200), superseded=sup, reclaim=freeing(1, 1, 1))
    where = "max_write" if fname == "memory.max" else "high_write"
    if k.profile.limit_superseded_break:
        assert sup.calls == [(a, where)] * 2
        assert r.of("drain") and r.of("reclaim") == [] and r.of("oom") == []
    else:
        assert sup.calls == [] and len(r.of("reclaim")) >= 16
    assert r.ret == 0


@pytest.mark.parametrize("profile", ["6.1", "7.3"])
def test_without_the_oracle_the_model_keeps_its_own_limit(profile):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 600)
    r = k.write_ex(a, "memory.max", pages(200), reclaim=freeing(1, 1, 1))
    # a call runs alone: nobody supersedes it, the loop runs to its OOM
    assert len(r.of("reclaim")) == 19 and r.of("oom")


def test_superseded_points_are_the_loops():
    assert SUPERSEDED_POINTS == ("max_write", "high_write")
    k, a = limited("6.1", "v2", 1000)
    fill(k, a, 600)
    with pytest.raises(ValueError, match="superseded oracle returned 1"):
        k.write(a, "memory.max", pages(200), superseded=lambda m, w: 1)


# -- the dying-memcg breaks (7.3) -------------------------------------------------------

@pytest.mark.parametrize("profile", ["6.12", "7.2", "7.3.0", "7.3"])
@pytest.mark.parametrize("cgroup,fname,where,dying_ret,ret", [
    ("v2", "memory.max", "max_write", 0, 0),
    ("v2", "memory.high", "high_write", 0, 0),
    ("v2", "memory.reclaim", "reclaim_write", -errno.EAGAIN, -errno.EAGAIN),
    ("v1", "memory.limit_in_bytes", "resize", -errno.EBUSY, -errno.EBUSY),
])
def test_a_limit_loop_stops_when_the_memcg_is_dying(profile, cgroup, fname, where, dying_ret, ret):
    k, a = limited(profile, cgroup, 1000)
    fill(k, a, 600)
    dying = recorder(lambda m, w: True)
    r = k.write_ex(a, fname, pages(200), memcg_dying=dying, reclaim=freeing())
    if k.profile.limit_dying_break:
        assert dying.calls == [(a, where)]
        # at the first pass: no drain, no reclaim, no OOM
        assert r.ret == dying_ret and r.of("drain") == r.of("reclaim") == r.of("oom") == []
    else:
        assert dying.calls == [] and r.ret == ret and r.of("reclaim")


def test_dying_is_asked_after_the_signal_and_the_points_are_documented():
    k, a = limited("7.3", "v2", 1000)
    fill(k, a, 600)
    dying = recorder(lambda m, w: True)
    r = k.write_ex(a, "memory.max", pages(200), memcg_dying=dying, signal_pending=True)
    assert dying.calls == [] and r.ret == 0
    assert set(DYING_POINTS) == {"max_write", "high_write", "resize", "reclaim_write"}
    with pytest.raises(ValueError, match="memcg_dying oracle returned None"):
        k.write(a, "memory.max", pages(100), memcg_dying=lambda m, w: None)


# -- mem_cgroup_handle_over_high: a dying task is not throttled (≥ 6.8) ------------------

def over_high(profile):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 100)
    assert k.write(a, "memory.high", pages(10), reclaim=freeing()) == 0
    return k, a


@pytest.mark.parametrize("profile", ["5.10", "6.1", "6.6", "6.12.0", "6.18", "7.3"])
def test_a_dying_task_is_not_throttled_on_memory_high(profile):
    k, a = over_high(profile)
    task = Task(dying=True, memcg_nr_pages_over_high=200)
    r = k.return_to_user(a, reclaim=freeing(), task=task)
    assert task.memcg_nr_pages_over_high == 0
    if k.profile.over_high_dying_bail:
        assert r.kinds() == ["high_bail"] and r.steps[0].reason == "dying"
    else:
        assert r.of("reclaim") and r.of("high_throttle")[-1].slept


def test_over_high_is_asked_at_each_retry():
    k, a = over_high("6.12")
    sig = recorder(lambda m, where: len(sig.calls) >= 3)
    r = k.return_to_user(a, reclaim=freeing(1, 1), task=Task(memcg_nr_pages_over_high=200),
                         signal=sig)
    # two reclaims that made progress, then the task was found dying
    assert [c[1] for c in sig.calls] == ["over_high"] * 3
    assert len(r.of("reclaim")) == 2 and r.kinds()[-1] == "high_bail"


# -- 6.1.56: the sync memory.high reclaim takes the charge's gfp -------------------------

@pytest.mark.parametrize("profile,charge_gfp", [("6.1.0", False), ("6.1.56", True), ("6.1", True),
                                                ("6.12", True), ("7.3", True)])
def test_the_sync_high_reclaim_gfp(profile, charge_gfp):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    assert k.write(a, "memory.high", pages(1)) == 0
    # 65 pages (> BATCH, no stock): over high by more than a batch at once
    r = k.charge(a, 65, GFP.NOFS, reclaim=freeing())
    high = [s for s in r.of("reclaim") if s.reason == "high"]
    assert r.ret == 0 and high
    assert {s.gfp for s in high} == {GFP.NOFS if charge_gfp else GFP.KERNEL}


# -- the stock: eviction, and 7.3's empty slots -----------------------------------------

def seven_cached(profile, **kw):
    k = Kernel(profile, cgroup="v2", **kw)
    cgs = [k.mkdir(f"c{i}") for i in range(9)]
    for m in cgs[:7]:
        k.charge(m, 1)
    return k, cgs


@pytest.mark.parametrize("profile", ["6.18.36", "7.2", "7.3"])
def test_a_full_stock_evicts_round_robin(profile):
    k, cgs = seven_cached(profile)
    evicted = []
    for m in cgs[7:] + cgs[:1]:
        r = k.charge(m, 1)
        evicted += [s.cgroup for s in r.of("stock_drain") if s.reason == "evict"]
    # drain_idx 0, 1, 2: c0, c1, then (for c0 again) c2
    assert evicted == ["/c0", "/c1", "/c2"]
    assert k.stocks[0].drain_idx == 3


def test_6_18_evicts_where_evict_slot_says_and_7_x_refuses_the_choice():
    k, cgs = seven_cached("6.18", evict_slot=lambda cpu, n: 4)
    r = k.charge(cgs[7], 1)
    assert [s.cgroup for s in r.of("stock_drain") if s.reason == "evict"] == ["/c4"]
    for profile in ("6.18.36", "7.2", "6.12"):
        with pytest.raises(ValueError, match="does not evict a stock slot at random"):
            Kernel(profile, evict_slot=lambda cpu, n: 0)


@pytest.mark.parametrize("profile", ["7.2", "7.3"])
def test_7_3_empties_a_slot_whose_pages_run_out(profile):
    k, cgs = seven_cached(profile)
    # c3's slot holds 63 pages: take them all
    assert k.charge(cgs[3], 63).kinds() == ["stock_hit"]
    released = k.profile.stock_release_empty
    assert ("/c3", 0) not in k.stock_of(0) if released else ("/c3", 0) in k.stock_of(0)
    # an uncached memcg takes the empty slot (7.3) or evicts drain_idx's (7.2)
    r = k.charge(cgs[7], 1)
    evicts = [s.cgroup for s in r.of("stock_drain") if s.reason == "evict"]
    assert evicts == ([] if released else ["/c0"])
    slot = 3 if released else 0
    stock = k.stocks[0]
    assert stock.memcgs[slot] is cgs[7] and stock.nr_pages[slot] == 63


# -- failcnt on memsw, sock_throttled ---------------------------------------------------

@pytest.mark.parametrize("profile,counts", [("6.12", True), ("6.18", False), ("6.18.36", False),
                                            ("6.18.50", True), ("7.2.0", False), ("7.2.4", True),
                                            ("7.3", True)])
def test_memsw_failcnt_per_range(profile, counts):
    k, a = limited(profile, "v1", 100)
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(100)) == 0
    fill(k, a, 100)
    r = k.charge(a, 1)
    fails = r.of("counter_fail")
    assert {f.counter for f in fails} == {"memsw"} and all(f.failcnt == counts for f in fails)
    assert int(k.read(a, "memory.memsw.failcnt")) == (len(fails) if counts else 0)
    # v2 counts no failures from 6.15 on (no file shows them)
    k2, b = limited(profile, "v2", 10)
    fill(k2, b, 10)
    k2.charge(b, 1)
    assert (b.memory.failcnt > 0) == (k.profile.failcnt_counters is None)


@pytest.mark.parametrize("profile,printed", [("6.18", False), ("6.18.51", False), ("7.2.0", True),
                                             ("7.3", True)])
def test_sock_throttled_from_7_2(profile, printed):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    text = k.read(a, "memory.events")
    assert text.endswith("oom_group_kill 0\nsock_throttled 0\n" if printed else "oom_group_kill 0\n")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_oracles_that_say_no_change_nothing(profile):
    def run(**oracles):
        k, a = limited(profile, "v2", 1000)
        fill(k, a, 600)
        out = [k.write_ex(a, f, pages(200), reclaim=freeing(1, 1), **oracles).as_dict()
               for f in ("memory.high", "memory.max")]
        r = k.charge(a, 1, task=Task(oom_reaped=False),
                     **{x: y for x, y in oracles.items() if x == "signal"})
        return out, r.as_dict(), k.snapshot()
    no = dict(superseded=lambda m, w: False, memcg_dying=lambda m, w: False,
              signal=lambda m, w: False)
    assert run() == run(**no)
