"""Layer 2: the simulated environment (pools, tasks, OOM victims)."""

import pytest

from memcgscope.model import Kernel
from memcgscope.model.environment import Environment, mib

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("profile", ["5.10", "5.15", "6.1", "6.6", "6.12", "6.18"])
@pytest.mark.parametrize("cgroup", ["v1", "v2"])
def test_100m_anon_in_30m_without_swap_is_one_oom_kill(profile, cgroup):
    env = Environment(Kernel(profile, cgroup=cgroup, cpus=2), swap_pages=0)
    k = env.kernel
    a = k.mkdir("a")
    assert k.write(a, "memory.max" if cgroup == "v2" else "memory.limit_in_bytes", "30M") == 0
    env.spawn("t", a)
    r = env.touch("t", anon=mib(100))
    assert r.end == "killed" and r.killed == ["t"] and env.kills == ["t"]
    assert r.anon == mib(30)               # it got exactly the limit before dying
    assert r.reclaims == 18                # one pass per retry, then the OOM
    assert a.event("oom_kill") == 1 and a.event("oom") == 1
    assert a.charged == 0


def test_page_cache_is_reclaimed_before_anything_is_killed():
    env = Environment(Kernel("6.1", cgroup="v2"))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.max", "30M")
    env.spawn("t", a)
    assert env.touch("t", file=mib(20)).end == "done"
    r = env.touch("t", anon=mib(25))
    assert r.end == "done" and r.killed == [] and r.reclaims > 0
    assert env.file[a] < mib(10)
    assert a.event("oom") == 0


def test_anon_goes_to_swap_when_there_is_swap():
    env = Environment(Kernel("6.1", cgroup="v2"), swap_pages=mib(200))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.max", "30M")
    env.spawn("t", a)
    r = env.touch("t", anon=mib(100))
    assert r.end == "done" and r.killed == []
    assert env.tasks["t"].swapped >= mib(70)
    assert k.read(a, "memory.swap.current") == f"{a.swap.usage * 4096}\n"
    assert a.swap.usage == env.tasks["t"].swapped


def test_v2_swap_max_caps_swapping():
    env = Environment(Kernel("6.1", cgroup="v2"), swap_pages=mib(200))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.max", "30M")
    k.write(a, "memory.swap.max", "10M")
    env.spawn("t", a)
    r = env.touch("t", anon=mib(100))
    assert r.killed == ["t"] and a.swap.usage == 0  # the victim's swap was freed


def test_v1_memsw_limit_stops_swap_from_helping():
    env = Environment(Kernel("5.15", cgroup="v1"), swap_pages=mib(200))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.limit_in_bytes", "30M")
    k.write(a, "memory.memsw.limit_in_bytes", "40M")
    env.spawn("t", a)
    r = env.touch("t", anon=mib(100))
    assert r.killed == ["t"]
    assert env.tasks["t"].swapped == 0 and a.memsw.usage == 0


def test_victim_is_the_biggest_task_in_the_cgroup_over_its_limit():
    env = Environment(Kernel("6.1", cgroup="v2"))
    k = env.kernel
    p = k.mkdir("p")
    c1, c2 = k.mkdir("p/c1"), k.mkdir("p/c2")
    other = k.mkdir("o")
    k.write(p, "memory.max", "40M")
    env.spawn("big", c1)
    env.spawn("small", c2)
    env.spawn("outside", other)
    env.touch("outside", anon=mib(50))
    env.touch("big", anon=mib(25))
    r = env.touch("small", anon=mib(30))
    assert r.killed == ["big"] and r.end == "done"
    assert c1.event("oom_kill") == 1 and p.event("oom_kill") == 1
    assert p.event("oom", local=True) == 1 and c2.event("oom") == 0
    assert env.tasks["outside"].alive


def test_v1_oom_kill_disable_makes_the_task_wait():
    env = Environment(Kernel("6.1", cgroup="v1"))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.limit_in_bytes", "10M")
    k.write(a, "memory.oom_control", "1")
    env.spawn("t", a)
    r = env.touch("t", anon=mib(20))
    assert r.end == "oom_wait" and r.killed == []
    assert "under_oom 1" in k.read(a, "memory.oom_control")


def test_exit_frees_anon_and_keeps_page_cache():
    env = Environment(Kernel("6.1", cgroup="v2"))
    k = env.kernel
    a = k.mkdir("a")
    env.spawn("t", a)
    env.touch("t", anon=100, file=50)
    env.exit("t")
    assert a.charged == 50 and env.file[a] == 50


@pytest.mark.parametrize("profile", ["5.15", "6.1"])
def test_memory_high_is_paid_on_return_to_user(profile):
    env = Environment(Kernel(profile, cgroup="v2"))
    k = env.kernel
    a = k.mkdir("a")
    k.write(a, "memory.high", "10M")
    env.spawn("t", a)
    env.touch("t", file=mib(20))
    r = env.touch("t", anon=mib(5))
    assert r.end == "done" and r.killed == []
    assert a.event("high") > 0 and a.event("max") == 0
    # page cache was reclaimed down towards high; usage stays near it
    assert a.memory.usage <= mib(10) + 2 * k.profile.charge_batch
    assert env.tasks["t"].task.memcg_nr_pages_over_high == 0


@pytest.mark.parametrize("profile, max_events", [("6.12", 0), ("7.2", 0), ("7.3.0", 0), ("7.3", 1)])
def test_huge_touch_rejected_then_small_pages(profile, max_events):
    """A huge-page fault that no longer fits: one 512-page
    GFP_TRANSHUGE_LIGHT charge fails without reclaim, small pages fit; only
    7.3.4+ raises a max event for the rejection."""
    env = Environment(Kernel(profile, cgroup="v2", cpus=2), swap_pages=0)
    a = env.kernel.mkdir("a")
    env.kernel.write(a, "memory.max", "8M")
    env.spawn("t", a)
    env.touch("t", anon=1664)
    r = env.touch("t", huge=64)
    assert r.end == "done" and r.anon == 64 and r.reclaims == 0
    assert len(r.slow) == 1 and r.slow[0].ret == -12
    assert a.event("max") == max_events
    # where it fits, the range is one huge page: 512 pages charged for 64 touched
    r = Environment(Kernel(profile, cgroup="v2"), swap_pages=0)
    b = r.kernel.mkdir("b")
    r.kernel.write(b, "memory.max", "8M")
    r.spawn("u", b)
    res = r.touch("u", huge=64)
    assert res.anon == 512 and res.slow == [] and b.event("max") == 0
