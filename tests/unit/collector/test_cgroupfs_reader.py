"""The cgroupfs reader over files written as the kernels print them: v2
(6.1 and 5.10 memory.stat forms), v1, pressure, swap, thresholds."""

from __future__ import annotations

import pytest

from memcgscope.collector.cgroupfs import CgroupfsReader, CgroupSnapshot, merge, parse_pressure, stat_items

pytestmark = pytest.mark.unit

STAT_61 = """anon 1048576
file 2097152
kernel 65536
kernel_stack 16384
pagetables 8192
sock 0
shmem 4096
file_mapped 8192
file_dirty 0
file_writeback 0
active_anon 0
inactive_anon 1048576
active_file 1024
inactive_file 2096128
workingset_refault_anon 3
workingset_refault_file 7
pgscan 100
pgsteal 90
"""
STAT_510 = """anon 1048576
file 0
kernel_stack 16384
percpu 0
sock 0
shmem 0
slab 4096
workingset_refault_anon 0
workingset_refault_file 2
pgscan 5
pgsteal 5
"""
PRESSURE = "some avg10=0.00 avg60=0.10 avg300=0.02 total=1500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=250000\n"


def write(d, files):
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_v2(tmp_path):
    write(tmp_path / "a", {"memory.current": "3145728\n", "memory.max": "max\n", "memory.high": "2097152\n",
                           "memory.low": "0\n", "memory.min": "0\n", "memory.events.local":
                           "low 0\nhigh 4\nmax 2\noom 0\noom_kill 0\noom_group_kill 0\n",
                           "memory.stat": STAT_61, "memory.pressure": PRESSURE, "memory.swap.current": "4096\n",
                           "memory.swap.events": "high 0\nmax 1\nfail 0\n"})
    s = CgroupfsReader(str(tmp_path), 2).read("/a")
    assert (s.usage, s.limit, s.events["high"], s.swap_usage) == (3145728, float("inf"), 4, 4096)
    assert s.pressure == {"some": 1.5, "full": 0.25}
    assert s.stat["anon"] == 1048576 and s.stat["kernel"] == 65536 and s.stat["pgsteal"] == 90
    assert s.protection == {"high": 2097152, "low": 0, "min": 0}
    assert s.swap_events == {"high": 0, "max": 1, "fail": 0}
    assert CgroupfsReader(str(tmp_path), 2).read("/gone") is None


def test_510_has_no_kernel_line():
    items = stat_items(STAT_510, 2)
    assert items["kernel"] == 16384 + 4096   # kernel_stack + slab (5.18 added "kernel")
    assert items["workingset_refault_file"] == 2


def test_v1_names_map_to_v2(tmp_path):
    write(tmp_path / "a", {"memory.usage_in_bytes": "8192\n", "memory.limit_in_bytes": "9223372036854771712\n",
                           "memory.failcnt": "3\n", "memory.memsw.usage_in_bytes": "12288\n",
                           "memory.stat": "cache 4096\nrss 4096\nmapped_file 0\ndirty 0\nwriteback 0\n"
                                          "total_cache 4096\n"})
    s = CgroupfsReader(str(tmp_path), 1).read("/a")
    assert s.limit == float("inf") and s.failcnt == {"memory": 3} and s.swap_usage == 4096
    assert s.stat == {"anon": 4096, "file": 4096, "file_mapped": 0, "file_dirty": 0, "file_writeback": 0}
    assert s.pressure == {}


def test_parse_pressure_and_merge():
    assert parse_pressure("garbage\nsome total=x\n") == {}
    a = CgroupSnapshot(1, 10, stat={"anon": 1}, pressure={"some": 1.0}, protection={"high": 5})
    merge(a, CgroupSnapshot(2, 20, stat={"anon": 2, "file": 3}, pressure={"some": 0.5}, swap_usage=4))
    assert (a.usage, a.limit, a.stat, a.pressure, a.swap_usage, a.protection) == \
        (3, None, {"anon": 3, "file": 3}, {"some": 1.5}, 4, {})
