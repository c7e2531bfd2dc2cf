"""Control files (§8): what exists, what read() prints, resets, events."""

import errno

import pytest
from model_helpers import ALL, fill, limited, pages

from memcgscope.model import GFP, Kernel

pytestmark = pytest.mark.unit

UNLIMITED = "9223372036854771712\n"


@pytest.mark.parametrize("profile", ALL)
def test_v1_reads(profile):
    k = Kernel(profile, cgroup="v1")
    a = k.mkdir("a")
    for f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
              "memory.soft_limit_in_bytes"):
        assert k.read(a, f) == UNLIMITED
        assert k.read(k.root, f) == UNLIMITED
    assert k.read(a, "memory.failcnt") == "0\n"
    assert k.read(a, "memory.usage_in_bytes") == "0\n"
    assert k.read(a, "memory.oom_control") == "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"
    with pytest.raises(FileNotFoundError):
        k.read(a, "memory.max")


def test_v1_without_swap_accounting_has_no_memsw_files():
    k = Kernel("6.1", cgroup="v1", swap_account=False)
    a = k.mkdir("a")
    with pytest.raises(FileNotFoundError):
        k.read(a, "memory.memsw.failcnt")
    assert k.write(a, "memory.memsw.limit_in_bytes", "1M") == -errno.ENOENT


@pytest.mark.parametrize("profile,keys", [
    ("5.10", ["low", "high", "max", "oom", "oom_kill"]),
    ("5.15", ["low", "high", "max", "oom", "oom_kill"]),
    ("6.1", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"]),
    ("6.6", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"]),
    ("6.12", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"]),
    # 6.18.15 has no MEMCG_SOCK_THROTTLED (its BTF enum and strings); 7.2, 7.3 print it
    ("6.18", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill"]),
    ("7.2", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill", "sock_throttled"]),
    ("7.3", ["low", "high", "max", "oom", "oom_kill", "oom_group_kill", "sock_throttled"]),
])
def test_v2_reads_and_event_keys(profile, keys):
    k = Kernel(profile, cgroup="v2")
    a = k.mkdir("a")
    assert k.read(a, "memory.max") == "max\n"
    assert k.read(a, "memory.high") == "max\n"
    assert k.read(a, "memory.swap.max") == "max\n"
    assert k.read(a, "memory.current") == "0\n"
    for f in ("memory.events", "memory.events.local"):
        assert k.read(a, f) == "".join(f"{key} 0\n" for key in keys)
    assert k.read(a, "memory.swap.events") == "high 0\nmax 0\nfail 0\n"
    assert ("memory.peak" in k.files(a)) == (profile not in ("5.10", "5.15"))
    assert ("memory.swap.peak" in k.files(a)) == (profile not in ("5.10", "5.15", "6.1"))


@pytest.mark.parametrize("f", ["memory.current", "memory.max", "memory.events", "memory.peak"])
def test_v2_root_lacks_the_per_cgroup_files(f):
    k = Kernel("6.1", cgroup="v2")
    with pytest.raises(FileNotFoundError):
        k.read(k.root, f)


def test_v2_events_propagate_up_to_below_root_v1_never():
    for cg, parent_max in (("v2", "max 18"), ("v1", None)):
        k = Kernel("6.1", cgroup=cg)
        p = k.mkdir("p")
        c = k.mkdir("p/c")
        limit = "memory.max" if cg == "v2" else "memory.limit_in_bytes"
        assert k.write(c, limit, pages(10)) == 0
        fill(k, c, 10)
        assert k.charge(c, 1).ret == -errno.ENOMEM
        assert c.event("max") == 18 and c.event("max", local=True) == 18
        if cg == "v2":
            assert k.read(p, "memory.events").splitlines()[2] == parent_max
            assert k.read(p, "memory.events.local").splitlines()[2] == "max 0"
        else:
            assert p.event("max") == 0
        assert k.root.event("max") == 0


def test_v2_memory_localevents_stops_propagation():
    k = Kernel("6.1", cgroup="v2", memory_localevents=True)
    p = k.mkdir("p")
    c = k.mkdir("p/c")
    k.write(c, "memory.max", pages(10))
    fill(k, c, 10)
    k.charge(c, 1)
    assert p.event("max") == 0 and c.event("max") == 18


def test_v1_failcnt_and_max_usage_resets():
    k, a = limited("6.1", "v1", 10)
    fill(k, a, 10)
    k.charge(a, 1)
    assert k.read(a, "memory.failcnt") == "20\n"  # 1 for the first batch + 19
    assert k.write(a, "memory.failcnt", "whatever") == 0
    assert k.read(a, "memory.failcnt") == "0\n"
    k.uncharge(a, 4)
    assert k.read(a, "memory.max_usage_in_bytes") == pages(10) + "\n"
    # memsw took the whole batch before memory refused it: its watermark shows it
    assert k.read(a, "memory.memsw.max_usage_in_bytes") == pages(10 + 64) + "\n"
    assert k.write(a, "memory.max_usage_in_bytes", "0") == 0
    assert k.read(a, "memory.max_usage_in_bytes") == pages(6) + "\n"


def test_v1_oom_control_writes():
    k = Kernel("6.1", cgroup="v1")
    a = k.mkdir("a")
    assert k.write(a, "memory.oom_control", "1\n") == 0
    assert k.read(a, "memory.oom_control").startswith("oom_kill_disable 1\n")
    assert k.write(a, "memory.oom_control", "2") == -errno.EINVAL
    assert k.write(a, "memory.oom_control", "yes") == -errno.EINVAL
    assert k.write(a, "memory.oom_control", "0x0") == 0
    assert k.write(k.root, "memory.oom_control", "1") == -errno.EINVAL
    assert k.read(a, "memory.oom_control").startswith("oom_kill_disable 0\n")


def test_v1_soft_limit_is_stored_only():
    k = Kernel("6.1", cgroup="v1")
    a = k.mkdir("a")
    assert k.write(a, "memory.soft_limit_in_bytes", "10M") == 0
    assert k.read(a, "memory.soft_limit_in_bytes") == f"{10 << 20}\n"
    r = k.charge(a, 5000)
    assert r.ret == 0 and r.of("reclaim") == []


def test_v2_peak_and_6_12_per_fd_reset():
    k = Kernel("6.12", cgroup="v2")
    a = k.mkdir("a")
    fill(k, a, 100)
    k.uncharge(a, 90)
    assert k.read(a, "memory.peak") == pages(100) + "\n"
    assert k.write(a, "memory.peak", "reset") == 0
    assert k.read(a, "memory.peak") == pages(10) + "\n"
    k.charge(a, 100)
    assert k.read(a, "memory.peak") == pages(110) + "\n"


def test_reads_of_write_only_files_are_refused():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    with pytest.raises(PermissionError):
        k.read(a, "memory.reclaim")


def test_snapshot_lists_every_readable_file():
    k = Kernel("6.1", cgroup="v2")
    a = k.mkdir("a")
    snap = k.snapshot()
    assert set(snap) == {"/", "/a"}
    assert snap["/"] == {} and "memory.reclaim" not in snap["/a"]
    assert snap["/a"]["memory.max"] == "max\n"


def test_gfp_constants_and_profiles():
    assert GFP.KERNEL == 0xcc0 and GFP.HIGHUSER_MOVABLE == 0x100cca
    assert GFP.TRANSHUGE_LIGHT == 0x1c20ca and GFP.TRANSHUGE == 0x1c24ca
    assert GFP.__GFP_HIGH == 0x20 and GFP.NOWAIT == 0x800
    assert GFP.for_profile("5.15").ATOMIC == 0xa20
    assert GFP.for_profile("6.1").ATOMIC == 0xa20
    assert GFP.for_profile("6.6").ATOMIC == 0x820
    assert not hasattr(GFP.for_profile("6.6"), "__GFP_ATOMIC")
    assert GFP.for_profile("6.18").NOWAIT == 0x2800
