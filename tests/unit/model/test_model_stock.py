"""The per-cpu stock (§4): consume, refill, drain of a different memcg,
6.18's seven slots, drain_all_stock."""

import pytest
from model_helpers import ALL

from memcgscope.model import Kernel
from memcgscope.model.stock import drain_all_stock, refill_stock

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("profile", ALL)
def test_stock_hit_needs_the_same_memcg_and_enough_pages(profile):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    batch = k.profile.charge_batch
    k.charge(a, 1)
    assert k.charge(a, batch - 1).kinds() == ["stock_hit"]
    assert k.stocked(a) == 0
    assert k.charge(a, 1).kinds()[0] == "counter_charge"


@pytest.mark.parametrize("profile,drained", [(p, p not in ("6.18", "7.2", "7.3")) for p in ALL])
def test_refill_drains_a_different_cached_memcg_before_6_18(profile, drained):
    k = Kernel(profile, cgroup="v2")
    a, b = k.mkdir("a"), k.mkdir("b")
    batch = k.profile.charge_batch
    k.charge(a, 1)
    r = k.charge(b, 1)
    drains = r.of("stock_drain")
    if drained:
        assert [(s.cgroup, s.nr, s.reason) for s in drains] == [("/a", batch - 1, "refill")]
        assert a.memory.usage == 1 and k.stocked(a) == 0
    else:
        assert drains == [] and k.stocked(a) == batch - 1
    assert k.stocked(b) == batch - 1


def test_stocks_are_per_cpu():
    k = Kernel("6.1", cgroup="v2", cpus=2)
    a = k.mkdir("a")
    k.charge(a, 1, cpu=0)
    assert k.charge(a, 1, cpu=1).kinds()[0] == "counter_charge"
    assert k.stock_of(0) == [("/a", 63)] and k.stock_of(1) == [("/a", 63)]
    assert a.memory.usage == 128


def test_refill_above_batch_drains_the_whole_stock_before_6_18():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    k.charge(a, 1)                         # 63 stocked
    a.memory.charge(10)                    # pages a kmem uncharge would put back
    steps = []
    refill_stock(k, a, 10, 0, steps)
    assert [(s.nr, s.reason) for s in steps] == [(73, "overflow")]
    assert k.stocked(a) == 0 and a.memory.usage == 1


def test_6_18_seven_slots_then_eviction():
    k = Kernel("6.18", cgroup="v2", evict_slot=lambda cpu, n: 2)
    groups = [k.mkdir(f"g{i}") for i in range(8)]
    for g in groups[:7]:
        assert k.charge(g, 1).of("stock_drain") == []
    assert [p for p, _ in k.stock_of(0)] == [f"/g{i}" for i in range(7)]
    r = k.charge(groups[7], 1)
    assert [(s.cgroup, s.reason) for s in r.of("stock_drain")] == [("/g2", "evict")]
    assert groups[2].memory.usage == 1
    assert k.stock_of(0)[2] == ("/g7", 63)
    # every other slot still serves its memcg
    assert k.charge(groups[0], 5).kinds() == ["stock_hit"]


def test_6_18_refill_of_an_existing_slot_drains_it_alone_above_batch():
    k = Kernel("6.18", cgroup="v2")
    a, b = k.mkdir("a"), k.mkdir("b")
    k.charge(a, 1)
    k.charge(b, 1)
    a.memory.charge(5)
    steps = []
    refill_stock(k, a, 5, 0, steps)
    assert [(s.cgroup, s.nr, s.reason) for s in steps] == [("/a", 68, "overflow")]
    assert k.stocked(b) == 63


def test_6_18_refill_of_more_than_batch_uncharges_directly():
    k = Kernel("6.18", cgroup="v2")
    a = k.mkdir("a")
    a.memory.charge(100)
    steps = []
    refill_stock(k, a, 100, 0, steps)
    assert [(s.nr, s.reason) for s in steps] == [(100, "direct")] and a.memory.usage == 0


def test_drain_all_stock_only_drains_descendants():
    k = Kernel("6.1", cgroup="v2", cpus=3)
    p, c, other = k.mkdir("p"), k.mkdir("p/c"), k.mkdir("o")
    k.charge(c, 1, cpu=0)
    k.charge(other, 1, cpu=1)
    k.charge(p, 1, cpu=2)
    steps = []
    drained = drain_all_stock(k, p, 0, "all", steps)
    assert drained == 126
    assert k.stocked(c) == 0 and k.stocked(p) == 0 and k.stocked(other) == 63


def test_drain_all_stock_async_leaves_remote_cpus_pending():
    k = Kernel("6.1", cgroup="v2", cpus=2)
    a = k.mkdir("a")
    k.charge(a, 1, cpu=0)
    k.charge(a, 1, cpu=1)
    assert drain_all_stock(k, a, 0, "local", []) == 63
    assert k.pending_drains == {1} and k.stocked(a) == 63
    # a pending CPU (FLUSHING_CACHED_CHARGE) is not queued twice
    assert drain_all_stock(k, a, 0, "all", []) == 0


def test_usage_includes_stocked_pages():
    k = Kernel("6.6", cgroup="v1")
    a = k.mkdir("a")
    k.charge(a, 3)
    assert k.read(a, "memory.usage_in_bytes") == f"{64 * 4096}\n"
    assert k.read(k.root, "memory.usage_in_bytes") == f"{3 * 4096}\n"


def test_6_18_trylock_failure_misses_and_refills_directly():
    k = Kernel("6.18", cgroup="v2")
    a = k.mkdir("a")
    k.charge(a, 1)
    asked = []
    r = k.charge(a, 1, stock_locked=lambda cpu: asked.append(cpu) or True)
    assert asked == [0, 0]          # consume_stock, then refill_stock
    assert "stock_hit" not in r.kinds()
    assert [(s.nr, s.reason) for s in r.of("stock_drain")] == [(63, "direct")]
    assert k.stocked(a) == 63 and a.memory.usage == 65


def test_trylock_hook_is_ignored_before_6_18():
    k = Kernel("6.12", cgroup="v2")
    a = k.mkdir("a")
    k.charge(a, 1)
    assert k.charge(a, 1, stock_locked=lambda cpu: True).kinds() == ["stock_hit"]
