"""try_charge_memcg, branch by branch (§3), per profile where it differs."""

import errno

import pytest
from model_helpers import ALL, fill, freeing, limited, pages

from memcgscope.model import GFP, Kernel, OomOutcome, Task

pytestmark = pytest.mark.unit

ENOMEM = -errno.ENOMEM


def reasons(r):
    return [s.reason for s in r.of("retry")]


def max_events(r):
    return [s.cgroup for s in r.of("event") if s.name == "max"]


# -- root, stock, batch --------------------------------------------------------

@pytest.mark.parametrize("profile", ALL)
def test_root_bypass_touches_no_counter(profile):
    k = Kernel(profile, cgroup="v1")
    r = k.charge(k.root, 5)
    assert r.ret == 0 and r.kinds() == ["root_bypass"]
    assert k.root.memory.usage == 0 and k.stocked(k.root) == 0
    # the v1 root reads its usage from statistics, which do count the pages
    assert k.read(k.root, "memory.usage_in_bytes") == pages(5) + "\n"


@pytest.mark.parametrize("profile,batch", [("5.10", 32), ("5.15", 32), ("6.1", 64),
                                           ("6.6", 64), ("6.12", 64), ("6.18", 64)])
def test_batch_32_before_6_1_and_64_after(profile, batch):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    r = k.charge(a, 1)
    assert r.ret == 0
    assert r.of("counter_charge")[0].nr == batch
    assert r.of("restock")[0].nr == batch - 1
    assert k.read(a, "memory.current") == pages(batch) + "\n"  # includes the stock
    assert k.stocked(a) == batch - 1
    hit = k.charge(a, 1)
    assert hit.kinds() == ["stock_hit"] and a.memory.usage == batch


def test_batch_shrinks_once_and_stays_shrunk():
    k, a = limited("6.1", "v2", 40)
    r = k.charge(a, 1)
    assert r.ret == 0
    assert r.kinds() == ["counter_fail", "batch_shrink", "retry", "counter_charge"]
    assert r.of("counter_fail")[0].nr == 64 and r.of("counter_charge")[0].nr == 1
    assert a.memory.usage == 1 and k.stocked(a) == 0


def test_big_charge_uses_nr_as_batch_and_never_hits_the_stock():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.charge(a, 1)
    r = k.charge(a, 65)
    assert "stock_hit" not in r.kinds() and r.of("counter_charge")[0].nr == 65
    assert "restock" not in r.kinds()


@pytest.mark.parametrize("profile,counter_nr", [("6.12", 64), ("6.18", 1), ("7.2", 1), ("7.3", 1)])
def test_6_18_batch_is_nr_without_reclaim_bits(profile, counter_nr):
    # !gfpflags_allow_spinning (the nolock allocators): no surplus for the stock
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    r = k.charge(a, 1, gfp=GFP.HIGH)  # no reclaim bits at all
    assert r.ret == 0 and r.of("counter_charge")[0].nr == counter_nr
    # a charge that may spin (the kswapd bit only, GFP_NOWAIT) takes a batch
    b = k.mkdir("b")
    r = k.charge(b, 1, gfp=GFP.NOWAIT)
    assert r.of("counter_charge")[0].nr == 64 and r.of("restock")[0].nr == 63


# -- limit failures and what comes next ------------------------------------------

@pytest.mark.parametrize("profile", ALL)
def test_small_charge_zero_progress_v1_18_passes_19_failcnt(profile):
    k, a = limited(profile, "v1", 100)
    fill(k, a, 100)
    before = int(k.read(a, "memory.failcnt"))
    r = k.charge(a, 1, GFP.KERNEL)
    assert r.ret == ENOMEM
    assert len(r.of("reclaim")) == 18
    assert len(max_events(r)) == 18
    # failcnt is counted on `memory`: memsw (unlimited) passed every time
    assert int(k.read(a, "memory.failcnt")) - before == 19
    assert k.read(a, "memory.memsw.failcnt") == "0\n"
    assert all(s.may_swap for s in r.of("reclaim"))
    assert reasons(r) == ["batch", "drain"] + ["retries"] * 16
    assert [s.result for s in r.of("oom")] == ["no_victim"]
    assert r.steps[-1].kind == "nomem" and r.steps[-1].reason == "oom"


@pytest.mark.parametrize("profile,memsw_failcnt", [(p, 0 if p == "6.18" else 19) for p in ALL])
def test_memsw_failure_counts_on_memsw_and_stops_swapping(profile, memsw_failcnt):
    k, a = limited(profile, "v1", 100)
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(100)) == 0
    fill(k, a, 100)
    r = k.charge(a, 1)
    assert r.ret == ENOMEM and len(r.of("reclaim")) == 18
    assert {s.counter for s in r.of("counter_fail")} == {"memsw"}
    assert not any(s.may_swap for s in r.of("reclaim"))
    assert k.read(a, "memory.failcnt") == "0\n"
    # 6.15–6.18: track_failcnt is set only on `memory`, so memsw.failcnt
    # never rises; 7.2/7.3 mem_cgroup_css_alloc sets it on memsw too
    assert int(k.read(a, "memory.memsw.failcnt")) == memsw_failcnt


@pytest.mark.parametrize("profile", ALL)
def test_v2_small_charge_zero_progress_same_passes(profile):
    k, a = limited(profile, "v2", 100)
    fill(k, a, 100)
    r = k.charge(a, 1)
    assert r.ret == ENOMEM and len(r.of("reclaim")) == 18
    assert k.read(a, "memory.events").splitlines()[2:4] == ["max 18", "oom 1"]


@pytest.mark.parametrize("profile", ALL)
def test_huge_charge_noretry_two_passes_no_oom(profile):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 1000)
    r = k.charge(a, 512, GFP.TRANSHUGE | GFP.NORETRY)
    assert r.ret == ENOMEM
    assert len(r.of("reclaim")) == 2 and len(max_events(r)) == 2
    assert r.of("oom") == [] and "oom 0" in k.read(a, "memory.events")
    assert r.steps[-1].reason == "noretry"


@pytest.mark.parametrize("profile", ALL)
def test_huge_charge_without_noretry_ooms_never(profile):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 1000)
    r = k.charge(a, 512, GFP.TRANSHUGE)
    assert r.ret == ENOMEM and len(r.of("reclaim")) == 18
    assert [s.result for s in r.of("oom")] == ["skipped_order"]
    assert "oom 0" in k.read(a, "memory.events")


@pytest.mark.parametrize("profile", ALL)
def test_transhuge_light_fails_at_once(profile):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 1000)
    r = k.charge(a, 512, GFP.TRANSHUGE_LIGHT)
    assert r.ret == ENOMEM
    # 7.3.4+: the rejection raises the one max event no pass raised
    rejected = ["/a"] if k.profile.rejected_charge_raises_max else []
    assert r.of("reclaim") == [] and max_events(r) == rejected
    assert r.steps[-1].reason == "no_direct_reclaim"
    assert f"max {len(rejected)}" in k.read(a, "memory.events")


@pytest.mark.parametrize("profile", ALL + ["7.3.0"])
def test_nowait_enomem_without_event_before_7_3_4(profile):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.for_profile(profile).NOWAIT)
    rejected = ["/a"] if profile == "7.3" else []
    assert r.ret == ENOMEM and max_events(r) == rejected and r.of("reclaim") == []
    assert r.steps[-1].kind == "nomem" and k.profile.rejected_charge_raises_max == (profile == "7.3")


def test_progress_retries_cost_nothing_for_small_charges():
    k, a = limited("6.1", "v2", 100)
    fill(k, a, 100)
    r = k.charge(a, 4, reclaim=freeing(1, 1, 1, 1))
    assert r.ret == 0
    # four passes free a page each: margin 1, 2, 3 (< 4: progress), then 4
    assert reasons(r) == ["batch", "drain", "progress", "progress", "margin"]
    assert [s.retries_left for s in r.of("retry")] == [16] * 5


def test_progress_does_not_retry_charges_above_8_pages():
    k, a = limited("6.1", "v2", 100)
    fill(k, a, 100)
    r = k.charge(a, 16, reclaim=freeing(1, 1, 1))
    assert reasons(r)[:4] == ["batch", "drain", "retries", "retries"]
    assert r.of("retry")[3].retries_left == 14


@pytest.mark.parametrize("profile,moves", [("6.12", 2), ("6.18", 0)])
def test_charge_move_wait_until_6_12(profile, moves):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    answers = iter([True, True])
    r = k.charge(a, 1, moving=lambda over: next(answers, False))
    assert reasons(r).count("move_wait") == moves
    assert len(r.of("reclaim")) == 18 + moves


def test_retry_mayfail_gives_up_before_oom():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.KERNEL | GFP.RETRY_MAYFAIL)
    assert r.ret == ENOMEM and r.of("oom") == [] and len(r.of("reclaim")) == 18
    assert r.steps[-1].reason == "retry_mayfail"


def test_ancestor_over_limit_is_the_target():
    k = Kernel("6.1", cgroup="v2")
    p = k.mkdir("p")
    c = k.mkdir("p/c")
    assert k.write(p, "memory.max", pages(100)) == 0
    fill(k, c, 100)
    r = k.charge(c, 1)
    assert {s.owner for s in r.of("counter_fail")} == {"/p"}
    assert {s.target for s in r.of("reclaim")} == {"/p"}
    assert set(max_events(r)) == {"/p"}
    assert k.read(c, "memory.events").splitlines()[2] == "max 0"
    assert k.read(p, "memory.events.local").splitlines()[2] == "max 18"


# -- forced charges --------------------------------------------------------------

@pytest.mark.parametrize("profile,events", [("5.10", 0), ("5.15", 0), ("6.1", 1), ("6.6", 1),
                                            ("6.12", 1), ("6.18", 1)])
def test_pf_memalloc_forces_and_6_1_counts_a_max_event(profile, events):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    k.set_task_flags(pf_memalloc=True)
    r = k.charge(a, 1)
    assert r.ret == 0 and r.of("force")[0].reason == "pf_memalloc"
    assert r.of("reclaim") == [] and len(max_events(r)) == events
    assert a.memory.usage == 11 and a.memory.usage > a.memory.max


@pytest.mark.parametrize("profile,reason,events,reclaims", [
    ("5.10", "atomic", 0, 0), ("5.15", "atomic", 0, 0),
    ("6.1", "high", 1, 0), ("6.6", "high", 1, 0), ("6.18", "high", 1, 0)])
def test_gfp_atomic_forces(profile, reason, events, reclaims):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.for_profile(profile).ATOMIC)
    assert r.ret == 0 and r.of("force")[0].reason == reason
    assert len(max_events(r)) == events and len(r.of("reclaim")) == reclaims


def test_gfp_atomic_bit_means_nothing_from_6_6():
    k, a = limited("6.6", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.NOWAIT | 0x200)
    assert r.ret == ENOMEM
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.NOWAIT | 0x200)  # 6.1 has the bit but no longer forces on it
    assert r.ret == ENOMEM


def test_gfp_high_with_reclaim_forces_at_nomem_after_oom_on_6_1():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.KERNEL | GFP.HIGH)
    assert r.ret == 0 and len(r.of("reclaim")) == 18 and len(r.of("oom")) == 1
    assert r.of("force")[0].reason == "high" and len(max_events(r)) == 18
    k, a = limited("5.15", "v2", 10)
    fill(k, a, 10)
    assert k.charge(a, 1, GFP.KERNEL | GFP.HIGH).ret == ENOMEM


@pytest.mark.parametrize("profile,ooms", [("5.10", 0), ("5.15", 1), ("6.1", 1), ("6.18", 1)])
def test_nofail_skips_oom_on_5_10_only(profile, ooms):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, GFP.KERNEL | GFP.NOFAIL)
    assert r.ret == 0 and r.of("force")[0].reason == "nofail"
    assert len(r.of("oom")) == ooms and len(r.of("reclaim")) == 18


def test_early_5_10_dying_forces_without_reclaim():
    k, a = limited("5.10.0", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(dying=True))
    assert r.ret == 0 and r.of("force")[0].reason == "dying" and r.of("reclaim") == []
    k, a = limited("5.10", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(dying=True))
    # 5.10.80+: the OOM "succeeds" for a dying task, one more round of
    # passes, then passed_oom && dying → -ENOMEM
    assert r.of("force") == [] and len(r.of("reclaim")) == 18 + 17
    assert r.ret == ENOMEM and r.steps[-1].reason == "passed_oom_dying"


def test_early_5_10_oom_failed_forces():
    k, a = limited("5.10.0", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1)
    assert r.ret == 0 and r.of("force")[0].reason == "oom_failed"
    k, a = limited("5.10", "v2", 10)
    fill(k, a, 10)
    assert k.charge(a, 1).ret == ENOMEM


def test_forced_charge_charges_memsw_too_on_v1():
    k, a = limited("6.1", "v1", 10)
    fill(k, a, 10)
    k.set_task_flags(pf_memalloc=True)
    assert k.charge(a, 3).ret == 0
    assert a.memory.usage == 13 and a.memsw.usage == 13


# -- OOM inside the charge -------------------------------------------------------

def test_oom_success_resets_retries_and_retries():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)

    def kill(target, order, gfp):
        return OomOutcome(True, victim=a, freed=5)
    r = k.charge(a, 1, oom=kill)
    assert r.ret == 0 and reasons(r)[-1] == "oom"
    assert r.of("retry")[-1].retries_left == 16
    assert [s.result for s in r.of("oom")] == ["killed"]
    assert k.read(a, "memory.events").splitlines()[3:5] == ["oom 1", "oom_kill 1"]
    assert a.memory.usage == 6


def test_second_oom_after_a_successful_one_without_progress():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    answers = iter([True, False])
    r = k.charge(a, 1, oom=lambda t, o, g: next(answers))
    assert r.ret == ENOMEM
    assert len(r.of("reclaim")) == 18 + 17 and len(r.of("oom")) == 2


@pytest.mark.parametrize("profile,ooms,last", [("6.12", 1, "passed_oom_dying"),
                                               ("6.18", 1, "passed_oom_dying")])
def test_passed_oom_and_dying_gives_up(profile, ooms, last):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(dying=True), oom=lambda t, o, g: True)
    assert r.ret == ENOMEM and len(r.of("oom")) == ooms and r.steps[-1].reason == last
    # ≤ 6.14 a dying task makes mem_cgroup_out_of_memory succeed without the
    # oracle; 6.18 asks out_of_memory()
    assert r.of("oom")[0].result == ("dying" if profile == "6.12" else "victim_exiting")


def test_oom_margin_check_succeeds_without_kill():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    reclaims = []

    def oracle(target, nr, gfp):
        reclaims.append(nr)
        return 0

    # a page is freed elsewhere after the last pass (moving() is consulted
    # between the margin check and the OOM): mem_cgroup_out_of_memory then
    # finds a margin and succeeds without calling out_of_memory()
    def moving(over):
        if len(reclaims) == 18 and a.charged == 10:
            k.uncharge(a, 1)
        return False
    r = k.charge(a, 1, reclaim=oracle, oom=lambda *x: pytest.fail("no kill expected"),
                 moving=moving)
    assert r.ret == 0 and r.of("oom")[0].result == "margin"


def test_v1_oom_kill_disable_waits_and_later_charges_fail_fast():
    k, a = limited("6.1", "v1", 10)
    assert k.write(a, "memory.oom_control", "1") == 0
    fill(k, a, 10)
    r = k.charge(a, 1)
    assert r.ret == ENOMEM and r.of("oom")[0].result == "async"
    assert k.task.memcg_in_oom is a
    assert "under_oom 1" in k.read(a, "memory.oom_control")
    r2 = k.charge(a, 1)
    assert r2.ret == ENOMEM and r2.of("reclaim") == [] and r2.steps[-1].reason == "memcg_in_oom"
    k.end_fault()
    assert "under_oom 0" in k.read(a, "memory.oom_control")
    assert k.task.memcg_in_oom is None


def test_v1_oom_kill_disable_outside_a_fault_is_skipped():
    k, a = limited("6.1", "v1", 10)
    assert k.write(a, "memory.oom_control", "1") == 0
    fill(k, a, 10)
    r = k.charge(a, 1, task=Task(in_user_fault=False))
    assert r.ret == ENOMEM and r.of("oom")[0].result == "skipped"
    assert k.read(a, "memory.oom_control").startswith("oom_kill_disable 1\nunder_oom 0")


# -- drain -----------------------------------------------------------------------

def _remote_stock_setup():
    k, a = limited("6.1", "v2", 100, cpus=2)
    k.charge(a, 1, cpu=1)  # 64 charged, 63 stocked on cpu 1
    return k, a


def test_drain_of_remote_stock_before_the_retry():
    k, a = _remote_stock_setup()
    r = k.charge(a, 37, cpu=0, drain=lambda t, c: "all")
    assert r.ret == 0 and len(r.of("reclaim")) == 1
    assert r.of("drain")[0].outcome == "all" and r.of("drain")[0].pages == 63
    assert a.memory.usage == 38


def test_drain_of_remote_stock_too_late():
    k, a = _remote_stock_setup()
    r = k.charge(a, 37, cpu=0, drain=lambda t, c: False)
    assert r.ret == ENOMEM and len(r.of("reclaim")) == 18
    assert r.steps[-1].kind == "drain_work" and r.steps[-1].pages == 63
    assert a.memory.usage == 1


def test_drain_skipped_when_another_drain_runs():
    k, a = _remote_stock_setup()
    r = k.charge(a, 37, cpu=0, drain=lambda t, c: "skipped")
    assert r.ret == ENOMEM and r.of("drain_work") == [] and k.stocked(a) == 63


def test_local_stock_drained_synchronously_whatever_the_remote_outcome():
    k, a = limited("6.1", "v2", 100, cpus=2)
    k.charge(a, 1, cpu=0)  # 63 stocked on this CPU
    # 70 > BATCH never hits the stock; the drain gives this CPU's pages back at once
    r = k.charge(a, 70, cpu=0, drain=lambda t, c: "local")
    assert r.ret == 0 and r.of("drain")[0].pages == 63
    assert r.of("drain_work") == [] and a.memory.usage == 71


# -- memory.high -----------------------------------------------------------------

def test_high_walk_records_over_high_and_6_1_reclaims_synchronously():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    assert k.write(a, "memory.high", pages(10)) == 0
    r = k.charge(a, 65)
    assert r.ret == 0
    assert r.of("high_over")[0].over_high == 65
    highs = [s for s in r.of("event") if s.name == "high"]
    assert len(highs) == 17 and len(r.of("reclaim")) == 17
    assert r.of("high_throttle")[0].slept and r.of("high_throttle")[0].jiffies == 500
    assert k.task.memcg_nr_pages_over_high == 0
    assert "high 17" in k.read(a, "memory.events")


def test_high_under_batch_waits_for_return_to_user_on_6_1():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10))
    r = k.charge(a, 1)
    assert r.of("high_over")[0].over_high == 64 and r.of("reclaim") == []
    u = k.return_to_user(a, reclaim=freeing(1))
    # the stocked pages cannot be reclaimed: only the charged page goes
    assert u.of("reclaim")[0].nr == 64 and u.of("reclaim")[0].uncharged == 1
    assert u.of("event")[0].name == "high" and k.task.memcg_nr_pages_over_high == 0


def test_5_15_never_reclaims_high_inside_the_charge():
    k = Kernel("5.15", cgroup="v2")
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10))
    r = k.charge(a, 65)
    assert r.of("high_over")[0].over_high == 65 and r.of("reclaim") == []
    assert k.task.memcg_nr_pages_over_high == 65
    u = k.return_to_user(a)
    assert len(u.of("reclaim")) == 17


def test_stock_hit_does_not_check_high():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10))
    assert k.charge(a, 1).of("high_over")
    r = k.charge(a, 1)
    assert r.kinds() == ["stock_hit"]


def test_pf_memalloc_skips_the_synchronous_high_reclaim():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10))
    r = k.charge(a, 65, task=Task(pf_memalloc=True))
    assert r.of("high_over") and r.of("reclaim") == []


# -- more memory.high ---------------------------------------------------------------

def test_small_overage_gives_up_without_sleeping():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10000))
    fill(k, a, 10000)
    # 0.65 % over: the quadratic penalty (0.0065² · 2^6 · HZ) is 0 jiffies
    r = k.charge(a, 65)
    assert len(r.of("reclaim")) == 1
    assert r.of("high_throttle")[0].slept is False and r.of("high_throttle")[0].jiffies <= 2


@pytest.mark.parametrize("hz,cap", [(250, 500), (1000, 2000)])
def test_throttle_is_capped_at_two_seconds(hz, cap):
    k = Kernel("6.1", cgroup="v2", hz=hz)
    a = k.mkdir("a")
    k.write(a, "memory.high", pages(10))
    r = k.charge(a, 500)
    assert r.of("high_throttle")[0].jiffies == cap


def test_calculate_high_delay_matches_the_kernel_formula():
    from memcgscope.model.charge import _calculate_overage, calculate_high_delay
    overage = _calculate_overage(1100, 1000)           # 10 % over
    assert overage == (100 << 20) // 1000
    # penalty = overage² · HZ >> 34, scaled by nr_pages / BATCH
    assert calculate_high_delay(64, overage, 250, 64) == (overage * overage * 250) >> 34
    assert calculate_high_delay(128, overage, 250, 64) == 2 * ((overage * overage * 250) >> 34)
    assert calculate_high_delay(64, 0, 250, 64) == 0


def test_high_walk_finds_an_ancestor_and_reclaim_high_walks_up():
    k = Kernel("6.1", cgroup="v2")
    p = k.mkdir("p")
    c = k.mkdir("p/c")
    k.write(p, "memory.high", pages(10))
    r = k.charge(c, 65, reclaim=freeing(60))
    assert r.of("high_over")[0].cgroup == "/p"
    highs = [s.cgroup for s in r.of("event") if s.name == "high"]
    assert highs[0] == "/p" and "/p/c" not in highs
    assert r.of("reclaim")[0].target == "/p"


def test_oom_group_kill_event():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    r = k.charge(a, 1, oom=lambda t, o, g: OomOutcome(True, victim=a, freed=10, group=True))
    assert r.ret == 0 and r.of("oom_kill")[0].group
    assert "oom_group_kill 1" in k.read(a, "memory.events")


def test_uncharge_must_match_a_charge():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.charge(a, 5)
    with pytest.raises(ValueError, match="no earlier charge matches"):
        k.uncharge(a, 6)
    k.uncharge(a, 5)
    assert a.memory.usage == 64 - 5  # the stock stays charged


def test_profiles_by_release_and_errors():
    from memcgscope.model import get_profile
    # a Debian ABI release (sublevel unknown): the family's newest profile
    assert get_profile("6.1.0-18-amd64").name == "6.1"
    assert get_profile("5.10.0-46-amd64").name == "5.10"
    assert [get_profile(f"6.1.{n}").name for n in (0, 55, 56, 187, 188)] == \
        ["6.1.0", "6.1.0", "6.1.56", "6.1.56", "6.1"]
    assert [get_profile(f"6.12.{n}").name for n in (19, 108, 109, 116, 117, 200)] == \
        ["6.12.0", "6.12.0", "6.12.109", "6.12.109", "6.12", "6.12"]
    assert [get_profile(f"6.18.{n}").name for n in (15, 36, 44, 50, 51)] == \
        ["6.18", "6.18.36", "6.18.36", "6.18.50", "6.18.51"]
    assert [get_profile(f"7.3.{n}").name for n in (0, 3, 4)] == ["7.3.0", "7.3.0", "7.3"]
    assert get_profile("7.2.13+deb14-amd64").name == "7.2"
    assert get_profile("5.10.13").name == "5.10.0"
    assert get_profile("5.10.265").name == "5.10"
    with pytest.raises(ValueError, match="unknown kernel profile '6.19.6'"):
        get_profile("6.19.6")     # between 6.18 and 7.2: resolve_profile's nearest older
    with pytest.raises(ValueError, match="unknown kernel profile '4.19'"):
        Kernel("4.19")
    with pytest.raises(ValueError, match="cgroup must be"):
        Kernel("6.1", cgroup="v3")
    with pytest.raises(ValueError, match="cpus must be"):
        Kernel("6.1", cpus=0)
    with pytest.raises(ValueError, match="cpu 2 out of range"):
        Kernel("6.1", cpus=2).charge(Kernel("6.1").root, 1, cpu=2)


@pytest.mark.parametrize("profile,options", [("5.15", [None, None]), ("6.1", [2, 0]),
                                             ("6.18", [2, 0])])
def test_reclaim_step_carries_the_4th_argument_per_version(profile, options):
    k, a = limited(profile, "v1", 10)
    fill(k, a, 10)
    first = k.charge(a, 1, GFP.KERNEL | GFP.NORETRY).of("reclaim")[0]
    # reclaim bits of the caller kept, the rest from GFP_HIGHUSER_MOVABLE
    assert first.sc_nr == 32 and first.sc_gfp == GFP.HIGHUSER_MOVABLE | GFP.NORETRY
    k.write(a, "memory.memsw.limit_in_bytes", pages(10))
    memsw = k.charge(a, 1, GFP.KERNEL | GFP.NORETRY).of("reclaim")[0]
    assert [first.options, memsw.options] == options
    assert (first.may_swap, memsw.may_swap) == (True, False)
