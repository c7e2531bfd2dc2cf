"""The cross-checker under bad input and under bugs of its own: a flood of
unique shapes does not evict the common ones from the shape cache; input
problems are ``malformed`` with the field named; an exception of the
model or the checker while replaying is ``replay_error``, counted, and
never escapes ``check()``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import memcgscope.collector.crosscheck.checker as checker_mod
from memcgscope.collector.crosscheck import REASONS, CrossChecker
from memcgscope.collector.crosscheck.cache import ShapeCache
from memcgscope.model import Kernel

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"
GFP_KERNEL = 0xCC0
CG = 35
MAX = 8192


def at(usage=MAX):
    return {"usage": usage, "max": MAX, "memsw_usage": usage, "memsw_max": 2251799813685247}


def cf(nr):
    return {"kind": "counter_fail", "cgroup_id": CG, "counter": "memory", "nr_pages": nr, "at": at()}


def rc(freed=3, nr=1):
    return {"kind": "reclaim", "cgroup_id": CG, "nr_pages": nr, "gfp": GFP_KERNEL, "options": 2,
            "freed": freed, "caller": "charge", "after": at(MAX - 1)}


def charge(steps, ret=0, nr=1, ts=1000):
    return {"type": "episode", "kind": "charge", "ts_ns": ts, "duration_ns": 10, "pid": 7,
            "tid": 7, "comm": "t", "cpu": 0, "cgroup_id": CG, "gfp": GFP_KERNEL, "nr_pages": nr,
            "entry": at(), "steps": steps, "ret": ret, "exit": at()}


def v1():
    return CrossChecker("6.1", "v1", True)


# -- the shape cache ------------------------------------------------------------------

def test_a_flood_of_unique_shapes_does_not_evict_the_common_ones(monkeypatch):
    monkeypatch.setattr(checker_mod, "SHAPE_CACHE_SIZE", 100)
    cc = v1()
    common = [charge([cf(64), cf(1), rc()]), charge([cf(64), cf(1)])]
    for ep in common * 2:                   # seen twice: they keep coming back
        assert cc.check(ep).ok
    assert cc.replays == 2
    # 1000 charges of sizes never seen again, ten times the cache
    for n in range(2, 1002):
        assert cc.check(charge([], nr=n)).ok
    assert cc.replays == 1002 and len(cc._cache) <= 100
    for ep in common:
        assert cc.check(ep).ok
    assert cc.replays == 1002              # still cached: no replay


def test_the_flood_interleaved_with_common_shapes_keeps_them_too(monkeypatch):
    monkeypatch.setattr(checker_mod, "SHAPE_CACHE_SIZE", 100)
    cc = v1()
    common = charge([cf(64), cf(1), rc()])
    for n in range(2, 2002):
        cc.check(charge([], nr=n))
        if n % 10 == 0:                     # back within the probation segment
            assert cc.check(common).ok
    assert cc.replays == 2000 + 1


def test_shape_cache_segments():
    c = ShapeCache(10)          # 8 protected, 2 on probation
    c.put("a", 1)
    assert c.get("a") == 1      # promoted
    for i in range(50):
        c.put(i, i)
    assert c.hot("a") == 1 and len(c) == 3 and 49 in c and 47 not in c
    for k in "bcdefghij":       # nine more promoted: the oldest goes back to probation
        c.put(k, k)
        c.get(k)
    assert c.hot("a") is None and "a" in c and c.get("a") == 1
    with pytest.raises(ValueError):
        c.put("x", None)


# -- malformed: input problems, the field named ---------------------------------------------

def _bad(ep, path, value):
    ep = copy.deepcopy(ep)
    *keys, last = path
    d = ep
    for k in keys:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return ep


@pytest.mark.parametrize("path,value,field", [
    (("gfp",), "0xcc0", "gfp"),
    (("nr_pages",), KeyError, "nr_pages"),
    (("nr_pages",), 0, "nr_pages"),
    (("cgroup_id",), "35", "cgroup_id"),
    (("ret",), None, "ret"),
    (("ts_ns",), None, "ts_ns"),
    (("tid",), [7], "tid"),
    (("steps",), "F", "steps"),
    (("steps", 1, "nr_pages"), None, "steps[1].nr_pages"),
    (("steps", 1, "counter"), "swap", "steps[1].counter"),
    (("steps", 0, "cgroup_id"), "36", "steps[0].cgroup_id"),
    (("steps", 2, "after"), {"usage": 1}, "steps[2].after.max"),
    (("steps", 2, "freed"), "3", "steps[2].freed"),
    (("steps", 2, "kind"), "teleport", "steps[2].kind"),
])
def test_malformed_charge_names_the_field(path, value, field):
    cc = v1()
    good = charge([cf(64), cf(1), rc()])
    assert cc.check(good).ok               # the good shape is cached first
    res = cc.check(_bad(good, path, value))
    assert res.checks == [("charge", "divergent")]
    (d,) = res.divergences
    assert d.reason == "malformed" and d.detail.startswith(field + ":"), d.detail
    assert cc.replay_errors == 0 and res.events == {} and res.failures == {}
    # the same verdict when nothing is cached
    assert v1().check(_bad(good, path, value)).divergences[0].detail == d.detail


@pytest.mark.parametrize("path,value,field", [
    (("exit",), "x", "exit"),
    (("exit", "usage"), KeyError, "exit.usage"),
    (("exit", "usage"), "8192", "exit.usage"),
])
def test_entry_and_exit_are_validated_where_over_max_reads_them(path, value, field):
    strict = CrossChecker("6.1", "v1", True, forced_charges_visible=True)
    good = charge([cf(64), cf(1), rc()])
    assert strict.check(good).ok
    (d,) = strict.check(_bad(good, path, value)).divergences
    assert d.reason == "malformed" and d.detail.startswith(field + ":"), d.detail
    # not read, not judged: a checker without the over_max check ignores them
    assert v1().check(_bad(good, path, value)).ok


def test_numbers_are_taken_by_value_cached_or_not():
    """A cached key matches by value (1.0 == 1): so does validation, so the
    verdict does not depend on what the cache holds."""
    as_float = _bad(charge([cf(64), cf(1), rc()]), ("steps", 1, "nr_pages"), 1.0)
    as_float["gfp"] = float(GFP_KERNEL)
    fresh = v1()
    assert fresh.check(as_float).ok and fresh.replays == 1
    warm = v1()
    assert warm.check(charge([cf(64), cf(1), rc()])).ok
    assert warm.check(as_float).ok and warm.replays == 1
    half = _bad(as_float, ("nr_pages",), 1.5)
    for cc in (fresh, warm):
        (d,) = cc.check(half).divergences
        assert d.reason == "malformed" and d.detail.startswith("nr_pages:")


@pytest.mark.parametrize("ep,check,field", [
    ({"kind": "limit_write", "cgroup_id": 9, "file": "memory.limit_in_bytes", "value": "4096",
      "entry": at(), "steps": [], "ret": 0}, "limit_write", "value"),
    ({"kind": "limit_write", "cgroup_id": 9, "file": "memory.limit_in_bytes", "value": 4096,
      "entry": {"max": "big", "usage": 0}, "steps": [], "ret": 0}, "limit_write", "entry.max"),
    ({"kind": "limit_write", "cgroup_id": 9, "file": 7, "steps": [], "ret": 0}, "limit_write", "file"),
    ({"kind": "page_charge_fail", "cgroup_id": 9, "nr_pages": 1, "gfp": None, "ret": -12},
     "page_charge", "gfp"),
    ({"kind": "page_charge_fail", "cgroup_id": 9, "nr_pages": 1, "gfp": GFP_KERNEL, "ret": -12,
      "tid": [1]}, "page_charge", "tid"),
    ({"kind": "oom_kill", "cgroup_id": 9}, "oom_kill", "victim_pid"),
    ({"kind": "reclaim", "cgroup_id": 9, "ret": "12"}, "reclaim", "ret"),
    ({"kind": "nope"}, "episode", "kind"),
    (["not", "a", "dict"], "episode", "kind"),
])
def test_malformed_other_kinds_name_the_field(ep, check, field):
    res = v1().check(ep)
    assert res.checks == [(check, "divergent")]
    (d,) = res.divergences
    assert d.reason == "malformed" and d.detail.startswith(field + ":"), d.detail


def _get(ep, keys):
    for k in keys:
        ep = ep[k]
    return ep


def _verdict(res):
    return res.checks, [(d.reason, d.detail) for d in res.divergences]


def test_corrupted_fields_of_real_episodes_are_malformed_or_harmless():
    """Every field of every recorded episode (and of its steps) replaced by
    a value of the wrong type (or null): ``malformed`` naming that field, or
    a verdict that does not use it (the same as before, or ``skipped`` for
    a null that means "unknown"); never ``replay_error``, never an
    exception; and the same whether the episode's key was cached or not."""
    corrupted = 0
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        header = lines[0]
        cg = "v1" if header["cgroup"]["v1_memory"] else "v2"

        def checker():
            return CrossChecker(header["kernel"], cg, bool(header["memsw"]))
        warm = checker()
        # the short episodes (most of what is recorded): the long OOM ones
        # would make the uncached replays of every corruption slow
        for ep in (x for x in lines if x.get("type") == "episode" and len(x.get("steps") or ()) <= 6):
            want = warm.check(ep)
            fields = [((k,), k) for k in ep if k not in ("type", "kind")]
            fields += [(("steps", i, k), f"steps[{i}].{k}")
                       for i, s in enumerate(ep.get("steps") or ()) for k in s]
            for keys, name in fields:
                for wrong in ("x", None, [1]):
                    bad = _bad(ep, keys, wrong)
                    corrupted += 1
                    res = warm.check(bad)
                    where = (path.name, name, wrong)
                    assert _verdict(res) == _verdict(checker().check(bad)), where
                    assert all(d.reason != "replay_error" for d in res.divergences), where
                    if res.divergences and res.divergences[0].reason == "malformed":
                        detail = res.divergences[0].detail    # the field or within it
                        assert detail.startswith(name) and detail[len(name)] in ":[.", \
                            (where, detail)
                    elif wrong is not None and not isinstance(wrong, type(_get(ep, keys))):
                        assert res.checks == want.checks, where
        assert warm.replay_errors == 0
    assert corrupted > 1000


# -- replay_error: bugs of ours, counted, never raised ----------------------------------------

@pytest.mark.parametrize("exc", [ZeroDivisionError("boom"), KeyError("nr"), AssertionError("x")])
def test_a_model_that_raises_is_a_replay_error(monkeypatch, exc):
    def broken(memcg, ctx=None, where=""):
        raise exc
    # the margin check after every charge reclaim
    monkeypatch.setattr("memcgscope.model.charge.mem_cgroup_margin", broken)
    cc = v1()
    ep = charge([cf(64), cf(1), rc()])
    for n in (1, 2):                    # the second one from the cache
        res = cc.check(ep)
        assert res.checks == [("charge", "divergent")]
        (d,) = res.divergences
        assert d.reason == "replay_error" and type(exc).__name__ in d.detail
        assert cc.replay_errors == n
    # what does not reach the broken function still replays
    assert cc.check(charge([cf(64), cf(1)])).ok


def test_a_broken_limit_write_and_page_charge_replay_are_replay_errors(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("model bug")
    monkeypatch.setattr("memcgscope.model.limits.mem_cgroup_resize_max", broken)
    monkeypatch.setattr("memcgscope.model.cgroupfs.mem_cgroup_resize_max", broken)
    cc = v1()
    lw = {"kind": "limit_write", "cgroup_id": 9, "file": "memory.limit_in_bytes", "value": 4096,
          "entry": at(100), "steps": [], "ret": 0}
    (d,) = cc.check(lw).divergences
    assert (d.check, d.reason) == ("limit_write", "replay_error") and "model bug" in d.detail
    monkeypatch.setattr(Kernel, "charge", broken)
    pc = {"kind": "page_charge_fail", "cgroup_id": 9, "nr_pages": 1, "gfp": GFP_KERNEL, "ret": -12,
          "tid": 99, "ts_ns": 5}
    (d,) = cc.check(pc).divergences
    assert (d.check, d.reason) == ("page_charge", "replay_error") and "RuntimeError" in d.detail
    assert cc.replay_errors == 2


def test_a_checker_dependency_that_raises_is_a_replay_error():
    def ancestors(cid):
        raise OSError("cgroup tree unreadable")
    cc = CrossChecker("6.1", "v1", True, ancestors=ancestors)
    ep = charge([cf(64) | {"cgroup_id": 30}, cf(1) | {"cgroup_id": 30}])
    (d,) = cc.check(ep).divergences
    assert d.reason == "replay_error" and "OSError" in d.detail and cc.replay_errors == 1


def test_reasons_stay_in_the_set():
    assert {"malformed", "replay_error"} <= set(REASONS)
