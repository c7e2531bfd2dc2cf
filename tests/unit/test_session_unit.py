"""Session without a kernel: reads from another thread (a scrape) and
close() exclude each other, so no read runs on closed maps; pruning walks
each map once and deletes exactly the entries of the cgroups it is given."""

from __future__ import annotations

import threading
import time
from collections import namedtuple

import pytest

from memcgscope.probes.session import Session, SessionError

pytestmark = pytest.mark.unit


class SlowMap:
    """A stand-in BpfMap whose reads take time and notice close()."""

    def __init__(self, shared):
        self.shared = shared

    def items(self):
        s = self.shared
        s["reading"] += 1
        s["entered"].set()
        time.sleep(0.2)
        if s["closed"]:
            s["read_after_close"] = True
        s["reading"] -= 1
        return []

    def lookup(self, key):
        return [0, 0]

    def array_sum(self, index=0):
        return 0

    def close(self):
        s = self.shared
        if s["reading"]:
            s["read_after_close"] = True    # closed while a reader was inside
        s["closed"] = True


MAP_NAMES = ("charge_stats", "page_charge_stats", "charge_lat", "reclaim_stats", "reclaim_lat", "limit_stats",
             "oom_stats", "high_stats", "high_lat", "counter_fails", "memcg_events", "memcg_state", "lost",
             "ctx_lost", "map_full", "ctx_reset", "tasks")


def test_close_waits_for_a_scrape_in_flight_and_later_reads_fail_cleanly():
    """Review bug: an in-flight scrape could read the BPF session while
    close() freed it."""
    s = Session()
    shared = {"reading": 0, "closed": False, "read_after_close": False, "entered": threading.Event()}
    s._maps = {name: SlowMap(shared) for name in MAP_NAMES}
    errors = []

    def scrape():
        try:
            s.aggregates()
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=scrape)
    t.start()
    assert shared["entered"].wait(5)
    s.close()
    t.join()
    assert shared["closed"] and not shared["read_after_close"] and errors == []
    with pytest.raises(SessionError, match="closed"):
        s.aggregates()
    assert s.lost() == [] and s.contexts_lost() == 0 and s.map_full() == {} and s.program_stats() == {}
    assert not s.is_open
    with pytest.raises(SessionError, match="session is closed"):
        s.poll(0)


Stat = namedtuple("Stat", "cgid calls")
LatKey = namedtuple("LatKey", "memcg slot pad")
CgKey = namedtuple("CgKey", "cgid caller pad")


class FakeMap:
    """entries() and delete_raw() over a dict raw -> (key, value)."""

    def __init__(self, entries):
        self.data = {f"{id(self)}:{i}".encode(): kv for i, kv in enumerate(entries)}
        self.walks = 0

    def entries(self):
        self.walks += 1
        return [(raw, k, v) for raw, (k, v) in self.data.items()]

    def raw_keys(self):
        return list(self.data)

    def delete_raw(self, raws):
        return sum(self.data.pop(r, None) is not None for r in raws)

    def keys_left(self):
        return [k for k, _ in self.data.values()]


def test_forget_deletes_every_entry_of_the_cgroups_and_nothing_else():
    maps = {
        # per-CPU, keyed by the memcg's address; cgid in the values
        "charge_stats": FakeMap([(0xA, [Stat(5, 1), Stat(0, 2)]), (0xB, [Stat(6, 1), Stat(6, 1)])]),
        "page_charge_stats": FakeMap([(0xC, [Stat(0, 0), Stat(7, 3)])]),
        "charge_lat": FakeMap([(LatKey(0xA, 3, 0), [1, 1]), (LatKey(0xB, 3, 0), [1, 0]), (LatKey(0xC, 9, 0), [0, 1])]),
        "oom_stats": FakeMap([(5, None), (6, None)]),
        "high_stats": FakeMap([(7, None)]),
    }
    for name in ("reclaim_stats", "reclaim_lat", "limit_stats", "counter_fails", "memcg_events", "memcg_state",
                 "high_lat"):
        maps[name] = FakeMap([(CgKey(5, 1, 0), 1), (CgKey(6, 1, 0), 1), (CgKey(7, 2, 0), 1)])
    removed = Session._forget(maps, {5, 7})
    assert maps["charge_stats"].keys_left() == [0xB]
    assert maps["page_charge_stats"].keys_left() == []
    assert maps["charge_lat"].keys_left() == [LatKey(0xB, 3, 0)]     # by the forgotten memcgs' addresses
    assert maps["oom_stats"].keys_left() == [6] and maps["high_stats"].keys_left() == []
    for name in ("reclaim_stats", "memcg_events", "high_lat"):
        assert maps[name].keys_left() == [CgKey(6, 1, 0)]
    assert removed == 2 + 2 + 1 + 1 + 7 * 2
    assert all(m.walks == 1 for m in maps.values()), "each map is walked once"


def test_forget_tasks_drops_dead_threads_only():
    class Tasks(FakeMap):
        class key:
            @staticmethod
            def unpack(raw):
                return int(raw.split(b":")[1])

    s = Session()
    tasks = Tasks([(None, None)] * 6)
    s._maps = {"tasks": tasks}
    assert s.forget_tasks(lambda tid: tid % 2 == 0) == 3
    assert sorted(Tasks.key.unpack(r) for r in tasks.data) == [0, 2, 4]


def test_a_perf_buffer_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    with pytest.raises(SessionError, match=r"^use_perf_buffer: there is no perf buffer path; every kernel "
                                           r"memcgscope supports \(Linux 5.10\+\) has BPF ring buffers \(5.8\+\)$"):
        Session("tracepoint", use_perf_buffer=True).open()
