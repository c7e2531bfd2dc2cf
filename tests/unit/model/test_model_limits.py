"""Limit writes (§6): v1 mem_cgroup_resize_max, v2 memory.max / memory.high /
memory.swap.max / memory.reclaim."""

import errno

import pytest
from model_helpers import ALL, fill, freeing, limited, pages

from memcgscope.model import GFP, Kernel, OomOutcome

pytestmark = pytest.mark.unit


# -- v1 ------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ALL)
def test_v1_root_limit_is_einval(profile):
    k = Kernel(profile, cgroup="v1")
    assert k.write(k.root, "memory.limit_in_bytes", "1G") == -errno.EINVAL
    assert k.write(k.root, "memory.memsw.limit_in_bytes", "1G") == -errno.EINVAL
    assert k.write(k.root, "memory.soft_limit_in_bytes", "1G") == 0


def test_v1_memsw_invariant():
    k, a = limited("6.1", "v1", 100)
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(99)) == -errno.EINVAL
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(100)) == 0
    assert k.write(a, "memory.limit_in_bytes", pages(101)) == -errno.EINVAL
    assert k.write(a, "memory.limit_in_bytes", pages(50)) == 0


@pytest.mark.parametrize("profile", ALL)
def test_v1_resize_below_usage_is_ebusy_after_drain_and_reclaims(profile):
    k, a = limited(profile, "v1", 1000)
    fill(k, a, 600)
    k.charge(a, 1)  # leave a stock for the drain to take back
    oracle = freeing(1, 1, 1, 1, 0)
    r = k.write_ex(a, "memory.limit_in_bytes", pages(200), reclaim=oracle)
    assert r.ret == -errno.EBUSY
    assert r.kinds()[:3] == ["set_max", "stock_drain", "drain"]
    assert oracle.calls == [("/a", 1, GFP.KERNEL)] * 5
    assert all(s.may_swap for s in r.of("reclaim"))
    assert r.of("oom") == [] and a.memory.max == 1000
    assert k.read(a, "memory.limit_in_bytes") == pages(1000) + "\n"


def test_v1_resize_succeeds_once_reclaim_got_usage_under():
    k, a = limited("6.1", "v1", 1000)
    fill(k, a, 103)
    r = k.write_ex(a, "memory.limit_in_bytes", pages(100), reclaim=freeing(1, 1, 1))
    assert r.ret == 0 and len(r.of("reclaim")) == 3 and a.memory.max == 100


def test_v1_memsw_shrink_reclaims_without_swap():
    k, a = limited("6.1", "v1", 300)
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(300)) == 0
    fill(k, a, 300)
    k.swap_out(a, 50)  # memory 250, memsw still 300: swapped pages keep memsw
    assert (a.memory.usage, a.memsw.usage) == (250, 300)
    assert k.write(a, "memory.limit_in_bytes", pages(250)) == 0
    r = k.write_ex(a, "memory.memsw.limit_in_bytes", pages(250), reclaim=freeing(0))
    assert r.ret == -errno.EBUSY
    assert [s.may_swap for s in r.of("reclaim")] == [False]
    r = k.write_ex(a, "memory.limit_in_bytes", pages(200), reclaim=freeing(0))
    assert r.ret == -errno.EBUSY
    assert [s.may_swap for s in r.of("reclaim")] == [True]


def test_v1_resize_signal_is_eintr():
    k, a = limited("6.1", "v1", 1000)
    fill(k, a, 600)
    r = k.write_ex(a, "memory.limit_in_bytes", pages(200), signal_pending=True)
    assert r.ret == -errno.EINTR and r.of("set_max") == [] and a.memory.max == 1000


def test_v1_enlarge_wakes_oom_waiters():
    k, a = limited("6.1", "v1", 10)
    k.write(a, "memory.oom_control", "1")
    fill(k, a, 10)
    assert k.charge(a, 1).ret == -errno.ENOMEM
    assert k.write(a, "memory.limit_in_bytes", pages(20)) == 0
    assert k.oom_wakeups == 1


@pytest.mark.parametrize("profile,rounds", [("5.15", 2), ("6.1", 1)])
def test_v1_set_max_race_retries_before_6_1(profile, rounds):
    k, a = limited(profile, "v1", 100)
    fill(k, a, 50)
    grown = iter([1, 0])
    calls = []

    def race(memcg, counter):
        calls.append((memcg.path, counter))
        return next(grown, 0)
    # a charge lands between the swap and the re-check: before 6.1 the old
    # max is restored and the loop goes round again; 6.1+ keeps an enlarging max
    assert k.write(a, "memory.limit_in_bytes", pages(200), set_max_race=race) == 0
    assert calls == [("/a", "memory")] * rounds
    assert a.memory.max == 200 and a.memory.usage == 51


# -- v2 memory.max ---------------------------------------------------------------

@pytest.mark.parametrize("profile", ALL)
def test_v2_max_shrink_ooms_until_it_fits(profile):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 600)
    kills = iter([300, 200])

    def oom(target, order, gfp):
        return OomOutcome(True, victim=a, freed=next(kills))
    r = k.write_ex(a, "memory.max", pages(200), oom=oom)
    assert r.ret == 0 and a.memory.max == 200
    assert len(r.of("reclaim")) == 16
    assert [s.name for s in r.of("event")] == ["oom", "oom"]
    assert [s.result for s in r.of("oom")] == ["killed", "killed"]
    assert a.memory.usage == 100
    assert "oom_kill 2" in k.read(a, "memory.events")


def test_v2_max_shrink_without_victim_leaves_usage_above_max():
    k, a = limited("6.1", "v2", 1000)
    fill(k, a, 600)
    r = k.write_ex(a, "memory.max", pages(200))
    assert r.ret == 0 and a.memory.usage == 600 and a.memory.max == 200
    assert len(r.of("reclaim")) == 16 and r.of("oom")[0].result == "no_victim"


def test_v2_max_reclaim_asks_for_the_excess_and_progress_is_free():
    k, a = limited("6.1", "v2", 1000)
    fill(k, a, 600)
    oracle = freeing(100, 0, 100)
    r = k.write_ex(a, "memory.max", pages(200), reclaim=oracle)
    assert [c[1] for c in oracle.calls[:3]] == [400, 300, 300]
    assert len(oracle.calls) == 2 + 16  # progress passes do not use the budget
    assert r.ret == 0  # a v2 memory.max write succeeds even when reclaim and OOM fall short


@pytest.mark.parametrize("profile,reclaims", [("6.12", 16), ("6.18", 0)])
def test_v2_max_nonblock_on_6_18(profile, reclaims):
    k, a = limited(profile, "v2", 1000)
    fill(k, a, 600)
    r = k.write_ex(a, "memory.max", pages(200), nonblock=True)
    assert r.ret == 0 and len(r.of("reclaim")) == reclaims and a.memory.max == 200


def test_v2_max_signal_stops_the_loop():
    k, a = limited("6.1", "v2", 1000)
    fill(k, a, 600)
    r = k.write_ex(a, "memory.max", pages(200), signal_pending=True)
    assert r.ret == 0 and r.of("reclaim") == [] and a.memory.max == 200


# -- v2 memory.high, swap.max, reclaim --------------------------------------------

@pytest.mark.parametrize("profile", ALL)
def test_v2_high_write_gives_up_after_17_zero_progress_calls(profile):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 600)
    r = k.write_ex(a, "memory.high", pages(200))
    assert r.ret == 0 and a.memory.high == 200
    assert len(r.of("reclaim")) == 17 and r.of("oom") == []
    assert k.read(a, "memory.high") == pages(200) + "\n"


@pytest.mark.parametrize("profile,reclaims", [("6.12", 17), ("6.18", 0)])
def test_v2_high_nonblock_on_6_18(profile, reclaims):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 600)
    assert len(k.write_ex(a, "memory.high", pages(200), nonblock=True).of("reclaim")) == reclaims


def test_v2_swap_max_is_set_at_once():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 100)
    k.swap_out(a, 50)
    r = k.write_ex(a, "memory.swap.max", pages(10))
    assert r.ret == 0 and r.of("reclaim") == []
    assert k.read(a, "memory.swap.max") == pages(10) + "\n"
    assert k.read(a, "memory.swap.current") == pages(50) + "\n"


def test_v2_memory_reclaim_eagain_and_success():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 100)
    assert k.write(a, "memory.reclaim", pages(10)) == -errno.EAGAIN
    r = k.write_ex(a, "memory.reclaim", pages(10), reclaim=freeing(4, 6))
    assert r.ret == 0 and [s.nr for s in r.of("reclaim")] == [10, 6]
    assert k.write(a, "memory.reclaim", pages(10), signal_pending=True) == -errno.EINTR
    assert Kernel("5.15", cgroup="v2").write(a, "memory.reclaim", "1M") == -errno.ENOENT


def test_write_to_a_read_only_or_missing_file():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    assert k.write(a, "memory.current", "0") == -errno.EACCES
    assert k.write(a, "memory.limit_in_bytes", "1M") == -errno.ENOENT
    assert k.write(a, "memory.peak", "reset") == -errno.EACCES  # 6.1: read-only


@pytest.mark.parametrize("profile", ["6.1", "6.12"])
def test_same_shrink_v1_ebusy_v2_oom_kill(profile):
    """The same shrink over unreclaimable pages: v1 refuses, v2 kills."""
    outcomes = {}
    for cgroup, limit in (("v1", "memory.limit_in_bytes"), ("v2", "memory.max")):
        k, a = limited(profile, cgroup, 1000)
        fill(k, a, 600)
        killed = []

        def oom(target, order, gfp, a=a):
            killed.append(target.path)
            return OomOutcome(True, victim=a, freed=a.charged)
        r = k.write_ex(a, limit, pages(200), oom=oom)
        outcomes[cgroup] = (r.ret, len(r.of("reclaim")), killed, a.memory.max)
    assert outcomes["v1"] == (-errno.EBUSY, 1, [], 1000)
    assert outcomes["v2"] == (0, 16, ["/a"], 200)


def test_an_oracle_that_never_frees_cannot_hang_the_model(monkeypatch):
    from memcgscope.model import charge, limits
    monkeypatch.setattr(charge, "MAX_MODEL_PASSES", 200)
    monkeypatch.setattr(limits, "MAX_MODEL_PASSES", 200)
    k, a = limited("6.1", "v1", 10)
    k2, b = limited("6.1", "v2", 10)
    for kk, m in ((k, a), (k2, b)):
        fill(kk, m, 10)
        with pytest.raises(RuntimeError, match="still retrying"):
            kk.charge(m, 1, oom=lambda t, o, g: True)   # "success" that frees nothing
    # only another CPU's stock (its drain still pending) holds the usage:
    # reclaim "frees" a page each call yet usage never drops
    k3, c = limited("6.1", "v1", 1000, cpus=2)
    k3.charge(c, 1, cpu=1)
    k3.uncharge(c, 1)
    with pytest.raises(RuntimeError, match="still looping"):
        k3.write(c, "memory.limit_in_bytes", pages(5), reclaim=lambda t, n, g: 1,
                 drain=lambda t, cpu: "local")
    with pytest.raises(RuntimeError, match="still looping"):
        k2.write(b, "memory.max", pages(5), oom=lambda t, o, g: True)
