"""cgroup id -> path over a temporary tree (ids = st_ino of the directories),
the memory hierarchy from captured sysroots, the --cgroup filter and the
bounded label."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcgscope.collector import cgroups
from memcgscope.collector.cgroups import (OTHER, CgroupError, CgroupLimiter, CgroupResolver, MemoryHierarchy,
                                          find_memory_hierarchy, matches, resolver_for)
from memcgscope.probes.sysroot import SysRoot

pytestmark = pytest.mark.unit

SYSROOTS = Path(__file__).resolve().parents[1] / "data" / "sysroots"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def ino(p) -> int:
    return os.stat(p).st_ino


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "memory"
    for d in ("a/b", "a/c", "d"):
        (root / d).mkdir(parents=True)
    # cgroupfs directories hold control files; they are not cgroups
    (root / "memory.limit_in_bytes").write_text("max\n")
    (root / "a/memory.usage_in_bytes").write_text("0\n")
    return root


def test_resolves_every_directory_and_only_directories(tree):
    r = CgroupResolver(str(tree), clock=Clock())
    assert r.path(ino(tree)) == "/"
    assert r.path(ino(tree / "a/b")) == "/a/b"
    assert r.path(ino(tree / "d")) == "/d"
    assert r.known() == {ino(tree): "/", ino(tree / "a"): "/a", ino(tree / "a/b"): "/a/b",
                         ino(tree / "a/c"): "/a/c", ino(tree / "d"): "/d"}
    assert r.path(ino(tree / "a/memory.usage_in_bytes")) is None
    assert r.scans == 1  # hits after the first walk come from the cache


def test_symlinks_are_not_followed(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tree / "link").symlink_to(outside)
    r = CgroupResolver(str(tree), clock=Clock())
    assert r.path(ino(outside)) is None
    assert "/link" not in r.known().values()


def test_a_miss_rescans_at_most_once_per_interval(tree):
    clock = Clock()
    r = CgroupResolver(str(tree), rescan_interval=5.0, clock=clock)
    assert r.path(ino(tree / "a")) == "/a" and r.scans == 1
    (tree / "new").mkdir()
    new = ino(tree / "new")
    clock.now += 4.9
    assert r.path(new) is None and r.scans == 1  # within the interval: no walk
    clock.now += 0.1
    assert r.path(new) == "/new" and r.scans == 2


def test_negative_cache_remembers_misses_until_the_ttl(tree):
    clock = Clock()
    r = CgroupResolver(str(tree), rescan_interval=1.0, negative_ttl=30.0, clock=clock)
    gone = 987654321
    assert r.path(gone) is None and r.scans == 1 and r.negative_size() == 1
    clock.now += 10  # rescan budget back, but the id is a known miss
    assert r.path(gone) is None and r.scans == 1
    clock.now += 20  # ttl over: look again
    assert r.path(gone) is None and r.scans == 2


def test_an_id_found_later_leaves_the_negative_cache(tree, monkeypatch):
    # A cgroup the first walk did not see (created just after it): hide it
    # from the first walk, then let the second see it.
    (tree / "late").mkdir()
    late = ino(tree / "late")
    real_scandir, hide = os.scandir, [True]

    def scandir(path):
        if hide[0] and str(path) == str(tree):
            (tree / "late").rename(tree.parent / "late-aside")
            try:
                return _Listed(real_scandir(path))
            finally:
                (tree.parent / "late-aside").rename(tree / "late")
        return real_scandir(path)

    monkeypatch.setattr(cgroups.os, "scandir", scandir)
    clock = Clock()
    r = CgroupResolver(str(tree), rescan_interval=1.0, negative_ttl=60.0, clock=clock)
    assert r.path(late) is None and r.negative_size() == 1
    hide[0] = False
    clock.now += 2
    r.rescan()
    assert r.path(late) == "/late" and r.negative_size() == 0


class _Listed:
    """A scandir result read eagerly, so the tree can change right after."""

    def __init__(self, it):
        with it:
            self._entries = list(it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __iter__(self):
        return iter(self._entries)


def test_negative_cache_is_capped_lru(tree):
    clock = Clock()
    r = CgroupResolver(str(tree), rescan_interval=0.0, negative_max=3, clock=clock)
    missing = [10_000_001 + i for i in range(5)]
    for m in missing:
        assert r.path(m) is None
    assert r.negative_size() == 3 and r.scans == 5
    assert r.path(missing[-1]) is None and r.scans == 5  # still remembered
    assert r.path(missing[0]) is None and r.scans == 6   # evicted, so walked again


def test_churn_keeps_memory_bounded(tree):
    clock = Clock()
    r = CgroupResolver(str(tree), rescan_interval=1.0, negative_max=100, clock=clock)
    removed: set[int] = set()
    for round_ in range(5):
        made = []
        for i in range(300):
            d = tree / f"job-{round_}-{i}"
            d.mkdir()
            made.append(ino(d))
        clock.now += 1
        # kernfs never reuses a cgroup id; this tmp filesystem reuses inode
        # numbers, and a reused one may still sit in the negative cache
        assert all(r.path(i) is not None for i in made if i not in removed)
        for i in range(300):
            (tree / f"job-{round_}-{i}").rmdir()
        clock.now += 1
        r.rescan()
        assert len(r.known()) == 5  # the five directories of the fixture
        for i in made[:150]:  # late events for removed cgroups
            clock.now += 1
            assert r.path(i) is None
            removed.add(i)
        assert r.negative_size() <= 100


def test_directories_vanishing_mid_walk_are_skipped(tree, monkeypatch):
    real_scandir = os.scandir
    doomed = {str(tree / "a/b"): "rmdir", str(tree / "a/c"): "replace-with-file"}

    def scandir(path):
        action = doomed.pop(str(path), None)
        if action == "rmdir":
            os.rmdir(path)          # ENOENT when scanned
        elif action == "replace-with-file":
            os.rmdir(path)
            Path(path).write_text("")  # ENOTDIR when scanned
        return real_scandir(path)

    monkeypatch.setattr(cgroups.os, "scandir", scandir)
    r = CgroupResolver(str(tree), clock=Clock())
    r.rescan()
    assert not doomed  # both were hit during the walk
    # /a/b and /a/c were listed by their parent before they vanished
    assert set(r.known().values()) == {"/", "/a", "/a/b", "/a/c", "/d"}
    assert r.path(ino(tree / "d")) == "/d"


def test_a_directory_vanishing_between_readdir_and_stat_is_skipped(tree, monkeypatch):
    real_scandir = os.scandir

    class Gone:
        def __init__(self, entry):
            self._e = entry
            self.name, self.path = entry.name, entry.path

        def is_dir(self, follow_symlinks=True):
            return True

        def stat(self, follow_symlinks=True):
            raise FileNotFoundError(2, "No such file or directory", self.path)

    class Wrap:
        def __init__(self, path):
            self._it = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

        def __iter__(self):
            for e in self._it:
                yield Gone(e) if e.name == "a" else e

    monkeypatch.setattr(cgroups.os, "scandir", Wrap)
    r = CgroupResolver(str(tree), clock=Clock())
    r.rescan()
    assert set(r.known().values()) == {"/", "/d"}


def test_an_unreadable_mount_keeps_the_old_index(tmp_path):
    root = tmp_path / "m"
    (root / "x").mkdir(parents=True)
    clock = Clock()
    r = CgroupResolver(str(root), rescan_interval=1.0, clock=clock)
    x = ino(root / "x")
    assert r.path(x) == "/x"
    (root / "x").rmdir()
    root.rmdir()
    r.rescan()
    assert r.path(x) == "/x"


def test_a_missing_mount_is_a_one_line_error(tmp_path):
    with pytest.raises(CgroupError) as e:
        CgroupResolver(str(tmp_path / "nope"))
    assert str(e.value) == (f"{tmp_path}/nope: not a directory; give the mount point of the memory cgroup "
                            "hierarchy (see 'memcgscope doctor')")


# --- the memory hierarchy from captured sysroots ---------------------------------

@pytest.mark.parametrize("name,expected", [
    ("host-6.18-v1", MemoryHierarchy(1, "/sys/fs/cgroup/memory", "/process_api/b83b296c7774b9aa95ec1255c6156687")),
    ("debian-6.1-v1", MemoryHierarchy(1, "/run/memcg-v1", "/")),
    ("debian-6.1-v2", MemoryHierarchy(2, "/sys/fs/cgroup", "/")),
    ("debian-6.12-v2", MemoryHierarchy(2, "/sys/fs/cgroup", "/")),
])
def test_memory_hierarchy_of_captured_systems(name, expected):
    assert find_memory_hierarchy(SysRoot(str(SYSROOTS / name))) == expected


def fake_sysroot(tmp_path, mounts: str, self_cgroup: str, controllers: str | None = None) -> SysRoot:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/mounts").write_text(mounts)
    (tmp_path / "proc/self/cgroup").write_text(self_cgroup)
    if controllers is not None:
        (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
        (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text(controllers)
    return SysRoot(str(tmp_path))


def test_v2_without_the_memory_controller_is_an_error(tmp_path):
    s = fake_sysroot(tmp_path, "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "0::/x\n", controllers="cpu io pids\n")
    with pytest.raises(CgroupError) as e:
        find_memory_hierarchy(s)
    assert str(e.value) == ("no memory cgroup hierarchy in /proc/mounts (neither a v1 cgroup mount with 'memory' "
                            "nor cgroup2 with the memory controller); mount one, e.g. "
                            "mount -t cgroup2 none /sys/fs/cgroup — see 'memcgscope doctor'")


def test_v2_own_cgroup(tmp_path):
    s = fake_sysroot(tmp_path, "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "0::/system.slice/x.service\n",
                     controllers="cpu memory\n")
    assert find_memory_hierarchy(s) == MemoryHierarchy(2, "/sys/fs/cgroup", "/system.slice/x.service")


def test_v1_mount_without_our_memory_line_is_an_error(tmp_path):
    s = fake_sysroot(tmp_path, "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n", "1:cpu:/\n")
    with pytest.raises(CgroupError) as e:
        find_memory_hierarchy(s)
    assert str(e.value) == ("/proc/self/cgroup has no 'memory' line although /sys/fs/cgroup/memory is mounted; "
                            "run in a process that belongs to the memory hierarchy")


# --- --cgroup ----------------------------------------------------------------

@pytest.mark.parametrize("path,globs,expected", [
    ("/a/b", [], True),
    ("/a/b", ["/a/*"], True),
    ("/a/b/c", ["/a/*"], True),          # * crosses "/"
    ("/a", ["/a/*"], False),
    ("/a", ["/a", "/b"], True),
    ("/system.slice/x.service", ["system.slice/*.service"], True),  # anchored at the root without "/"
    ("/x/system.slice/y", ["system.slice/*"], False),
    ("/A", ["/a"], False),               # case-sensitive, like cgroupfs
    ("/web-1", ["/web-[0-9]"], True),
])
def test_matches(path, globs, expected):
    assert matches(path, globs) is expected


# --- the bounded label ----------------------------------------------------------------

def test_limiter_labels_the_first_n_and_other_beyond():
    lim = CgroupLimiter(2, clock=Clock())
    assert [lim.label(p) for p in ("/a", "/b", "/c", "/a", "/b", "/c")] == ["/a", "/b", OTHER, "/a", "/b", OTHER]
    assert lim.tracked() == {"/a", "/b"}


def test_limiter_frees_a_slot_after_the_grace_period():
    clock = Clock()
    lim = CgroupLimiter(2, grace=30.0, clock=clock)
    lim.label("/a"), lim.label("/b")
    lim.removed("/a")
    lim.removed("/not-tracked")  # ignored
    clock.now += 29.9
    assert lim.label("/a") == "/a"     # late events of the removed cgroup keep its label
    assert lim.label("/c") == OTHER
    assert lim.released() == []
    clock.now += 0.1
    assert lim.label("/c") == "/c"
    assert lim.released() == ["/a"] and lim.released() == []
    assert lim.label("/a") == OTHER    # its slot went to /c
    assert lim.tracked() == {"/b", "/c"}


def test_limiter_removed_twice_counts_from_the_last_time():
    clock = Clock()
    lim = CgroupLimiter(1, grace=10.0, clock=clock)
    lim.label("/a")
    lim.removed("/a")
    clock.now += 5
    lim.removed("/a")
    clock.now += 6
    assert lim.tracked() == {"/a"}
    clock.now += 4
    assert lim.tracked() == set() and lim.released() == ["/a"]


def test_limiter_without_limit_and_with_zero():
    assert CgroupLimiter(None).label("/x") == "/x"
    assert CgroupLimiter(0).label("/x") == OTHER
    with pytest.raises(ValueError, match="max_cgroups -1: must be 0 or more"):
        CgroupLimiter(-1)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4), st.lists(st.tuples(st.sampled_from(["label", "removed", "tick"]),
                                             st.sampled_from(["/a", "/b", "/c", "/d", "/e", "/f"])), max_size=60))
def test_limiter_never_exceeds_its_bound_and_labels_are_stable(n, ops):
    clock = Clock()
    lim = CgroupLimiter(n, grace=3.0, clock=clock)
    holding: set[str] = set()
    for op, path in ops:
        if op == "tick":
            clock.now += 1
        elif op == "removed":
            lim.removed(path)
        else:
            holding -= set(lim.released())
            got = lim.label(path)
            assert got in (path, OTHER)
            assert len(lim.tracked()) <= n
            if path in holding:
                assert got == path  # a path keeps its label until its slot is released
            if got == path:
                holding.add(path)


def test_resolver_for_a_captured_sysroot():
    s = SysRoot(str(SYSROOTS / "host-6.18-v1"))
    h, r = resolver_for(s)
    assert h.mountpoint == "/sys/fs/cgroup/memory"
    assert r.mountpoint == s.path("/sys/fs/cgroup/memory")
    assert r.path(ino(r.mountpoint)) == "/"


def test_ancestors_parent_first(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    ino = {name: (tmp_path / name).stat().st_ino for name in ("a", "a/b", "a/b/c")}
    r = CgroupResolver(str(tmp_path), rescan_interval=0)
    assert r.ancestors(ino["a/b/c"]) == [ino["a/b"], ino["a"], tmp_path.stat().st_ino]
    assert r.ancestors(tmp_path.stat().st_ino) == []
    assert r.ancestors(123456789) is None
