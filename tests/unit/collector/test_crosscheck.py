"""The cross-checker: recorded episodes of real kernels replay without
divergence; hand-made episodes that break a kernel rule are flagged with
the right reason; aggregates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from memcgscope.collector.crosscheck import (REASONS, AggregateChecker, CheckResult, CrossChecker,
                                             Tolerance, compare_count)
from memcgscope.model.profiles import get_profile

pytestmark = pytest.mark.unit

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"
GFP_KERNEL = 0xCC0
GFP_USER_FAULT = 0x100CCA          # GFP_HIGHUSER_MOVABLE
GFP_NOWAIT = 0x800
GFP_TRANSHUGE = 0x1C24CA          # TRANSHUGE_LIGHT | __GFP_DIRECT_RECLAIM
GFP_TRANSHUGE_LIGHT = 0x1C20CA
NORETRY = 0x10000
CG = 35
MAX = 8192


def load(path):
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[0], [x for x in lines if x.get("type") == "episode"]


def checker_for(header, **kw):
    cg = "v1" if header["cgroup"]["v1_memory"] else "v2"
    return CrossChecker(header["kernel"], cg, bool(header["memsw"]), **kw)


# -- builders: steps as the probes write them ------------------------------------------

def at(usage=MAX, mx=MAX, v1=True):
    d = {"usage": usage, "max": mx}
    if v1:
        d.update(memsw_usage=usage, memsw_max=2251799813685247)
    return d


def cf(nr, cg=CG, counter="memory", v1=True):
    return {"kind": "counter_fail", "cgroup_id": cg, "counter": counter, "nr_pages": nr,
            "at": at(v1=v1)}


def rc(freed=0, nr=1, gfp=GFP_KERNEL, cg=CG, usage=None, options=2, caller="charge", v1=True):
    if usage is None:
        usage = MAX - 1 if freed else MAX       # margin: ok after progress, none otherwise
    return {"kind": "reclaim", "cgroup_id": cg, "nr_pages": nr, "gfp": gfp, "options": options,
            "freed": freed, "caller": caller, "after": at(usage, v1=v1)}


def dr(cg=None):
    return {"kind": "drain", "cgroup_id": cg}


def oom(result=True, order=0, gfp=GFP_KERNEL, cg=CG, v1=True):
    return {"kind": "oom", "cgroup_id": cg, "gfp": gfp, "order": order, "result": result,
            "after": at(v1=v1)}


def kill(pid=99, cg=CG):
    return {"kind": "oom_kill", "cgroup_id": cg, "victim_pid": pid}


def charge(steps, ret=0, gfp=GFP_KERNEL, nr=1, cg=CG, v1=True, exit_usage=MAX, ts=1000):
    return {"type": "episode", "kind": "charge", "ts_ns": ts, "duration_ns": 10, "pid": 7,
            "tid": 7, "comm": "t", "cpu": 0, "cgroup_id": cg, "gfp": gfp, "nr_pages": nr,
            "entry": at(v1=v1), "steps": steps, "ret": ret, "exit": at(exit_usage, v1=v1)}


def passes(n, freed=0, gfp=GFP_KERNEL, v1=True):
    out = []
    for _ in range(n):
        out += [cf(1, v1=v1), rc(freed, gfp=gfp, v1=v1)]
    return out


def full_oom_charge(v1=True, gfp=GFP_KERNEL):
    """What a 1-page charge with nothing to reclaim does on 6.1: 18 passes
    (drain after the first), an OOM that kills, 17 more passes, -ENOMEM
    (the task is the victim: passed_oom and dying)."""
    s = [cf(64, v1=v1), cf(1, v1=v1), rc(gfp=gfp, v1=v1), dr()] + passes(17, gfp=gfp, v1=v1)
    s += [kill(7), oom(True, gfp=gfp, v1=v1)] + passes(17, gfp=gfp, v1=v1)
    return charge(s, ret=-12, gfp=gfp, v1=v1)


def v1():
    return CrossChecker("6.1.0-56-amd64", "v1", True)


def v2(profile="6.1"):
    return CrossChecker(profile, "v2", False)


def reasons(res: CheckResult):
    return [d.reason for d in res.divergences]


# -- real recordings --------------------------------------------------------------------

RECORDING_FILES = sorted(RECORDINGS.glob("*.jsonl"))


def test_recordings_exist():
    assert RECORDING_FILES, f"no recordings in {RECORDINGS}; run make.py"


@pytest.mark.parametrize("path", RECORDING_FILES, ids=lambda p: p.stem)
def test_real_recording_has_no_divergence(path):
    header, eps = load(path)
    cc = checker_for(header)
    seen = set()
    for ep in eps:
        res = cc.check(ep)
        assert res.ok, (ep["kind"], res.divergences[0].reason, res.divergences[0].detail)
        seen.update(c for c, v in res.checks if v == "ok")
    assert "charge" in seen and "limit_write" in seen


@pytest.mark.parametrize("path", RECORDING_FILES, ids=lambda p: p.stem)
def test_real_oom_episode_breaks_when_edited(path):
    """The long OOM episode of each recording stops replaying when one pass
    is removed before its OOM (the budget is exact, not just tolerated)."""
    header, eps = load(path)
    cc = checker_for(header)
    long = [e for e in eps if e["kind"] == "charge" and any(s["kind"] == "oom" for s in e["steps"])]
    if not long:
        pytest.skip(f"{path.name} has no charge that OOMs")
    ep = copy.deepcopy(long[0])
    i = next(j for j, s in enumerate(ep["steps"]) if s["kind"] in ("oom", "oom_kill"))
    del ep["steps"][i - 2:i]          # one counter_fail + reclaim pass fewer
    assert reasons(cc.check(ep)) == ["oom_early"]


# -- charge rules -------------------------------------------------------------------------

def test_common_shapes_ok_and_cached():
    cc = v1()
    ep = charge([cf(64), cf(1), rc(3)])
    for _ in range(50):
        assert cc.check(ep).checks == [("charge", "ok")]
    assert cc.replays == 1


def test_full_oom_sequence_ok_v1_and_v2():
    assert v1().check(full_oom_charge()).ok
    assert v2().check(full_oom_charge(v1=False)).ok


def test_enomem_after_two_passes_without_oom():
    ep = charge([cf(64), cf(1), rc(), dr(), cf(1), rc()], ret=-12)
    assert reasons(v1().check(ep)) == ["enomem_early"]
    assert reasons(v2().check(charge([cf(64, v1=False), cf(1, v1=False), rc(v1=False), dr(),
                                      cf(1, v1=False), rc(v1=False)], ret=-12, v1=False))) \
        == ["enomem_early"]


def test_noretry_and_retry_mayfail_may_stop_early():
    assert v1().check(charge([cf(64), cf(1), rc(gfp=GFP_KERNEL | NORETRY), dr(), cf(1),
                              rc(gfp=GFP_KERNEL | NORETRY)], ret=-12, gfp=GFP_KERNEL | NORETRY)).ok
    mayfail = GFP_KERNEL | 0x4000
    ep = charge([cf(64), cf(1), rc(gfp=mayfail), dr()] + passes(17, gfp=mayfail), ret=-12, gfp=mayfail)
    assert v2().check(_as_v2(ep)).ok


def _as_v2(ep):
    ep = copy.deepcopy(ep)
    for s in [ep["entry"], ep["exit"]] + [s.get("at") or s.get("after") or {} for s in ep["steps"]]:
        s.pop("memsw_usage", None)
        s.pop("memsw_max", None)
    return ep


def test_reclaim_without_prior_failure():
    assert reasons(v1().check(charge([rc(3)]))) == ["reclaim_without_failure"]
    # v2 >= 6.1 would admit a memory.high reclaim after success, but not of 1 page
    assert reasons(v2().check(_as_v2(charge([rc(3)])))) == ["reclaim_without_failure"]


def test_sync_high_reclaim_after_success_v2():
    ep = _as_v2(charge([rc(40, nr=96, gfp=GFP_KERNEL)]))
    assert v2().check(ep).ok
    # 5.15 has no synchronous high reclaim inside try_charge
    assert reasons(v2("5.15").check(ep)) == ["reclaim_without_failure"]


def test_reclaim_without_direct_reclaim_gfp():
    ep = charge([cf(64), cf(1), rc(gfp=GFP_NOWAIT)], ret=-12, gfp=GFP_NOWAIT)
    assert reasons(v1().check(ep)) == ["reclaim_not_allowed"]


def test_nowait_fails_without_reclaim():
    assert v1().check(charge([cf(64), cf(1)], ret=-12, gfp=GFP_NOWAIT)).ok
    # the huge-page fault of 6.1/6.12: no reclaim bits, batch = nr, no shrink
    assert v2().check(_as_v2(charge([cf(512)], ret=-12, gfp=GFP_TRANSHUGE_LIGHT, nr=512))).ok


def test_oom_for_order_above_3():
    s = [cf(512), rc(nr=512, gfp=GFP_TRANSHUGE), dr()] + [cf(512), rc(nr=512, gfp=GFP_TRANSHUGE)] * 17
    ep = charge(s + [oom(False, order=9, gfp=GFP_TRANSHUGE)], ret=-12, gfp=GFP_TRANSHUGE, nr=512)
    assert reasons(v1().check(ep)) == ["oom_order"]
    # without the OOM call it is what the kernel does
    assert v1().check(charge(s, ret=-12, gfp=GFP_TRANSHUGE, nr=512)).ok


def test_too_many_passes_without_progress():
    good = full_oom_charge(v1=False)
    i = next(j for j, s in enumerate(good["steps"]) if s["kind"] == "oom_kill")
    bad = copy.deepcopy(good)
    bad["steps"][i:i] = passes(1, v1=False)
    assert reasons(v2().check(bad)) == ["retry_budget"]
    # after the OOM too: 17 passes then -ENOMEM, not 18
    bad2 = copy.deepcopy(good)
    bad2["steps"] += passes(1, v1=False)
    assert reasons(v2().check(bad2)) == ["retry_budget"]


def test_margin_race_after_the_last_reclaim():
    """6.18.15 guest (CI, node step): 17 passes after the OOM, the last
    reclaim's ``after`` full, then the charge returned 0 with no other step.
    The victim's uncharge landed between the reclaim's exit probe and
    mem_cgroup_margin(): the kernel saw room and retried, so the replay
    answers the margin read with room there and only there."""
    good = full_oom_charge(v1=False)
    won = copy.deepcopy(good)
    won["ret"] = 0
    for profile in ("6.1", "6.18"):
        assert v2(profile).check(won).ok
        assert v2(profile).check(good).ok
    # not where the charged memcg ended over its max: that charge was forced
    over = copy.deepcopy(won)
    over["exit"]["usage"] = MAX + 1
    assert reasons(v2("6.18").check(over)) == ["ret_mismatch"]
    # room is only where the kernel stopped: a further pass still breaks the
    # budget, and so does an OOM the model would not have reached yet
    more = copy.deepcopy(won)
    more["steps"] += passes(1, v1=False)
    assert reasons(v2("6.18").check(more)) == ["retry_budget"]
    # a full margin the kernel went on from is still no room: with one pass
    # fewer before the OOM the model wants another reclaim
    i = next(j for j, s in enumerate(good["steps"]) if s["kind"] == "oom_kill")
    short = copy.deepcopy(won)
    del short["steps"][i - 2:i]
    assert reasons(v2("6.18").check(short)) == ["oom_early"]


def test_v1_charge_move_wait_admits_extra_passes_until_6_18():
    """v1 memory.move_charge_at_immigrate: a charge move in progress makes
    the loop retry without using a retry (mem_cgroup_wait_acct_move, gone
    in 6.13+).  Unobservable, so extra passes are admitted on v1 <= 6.12."""
    good = full_oom_charge()
    i = next(j for j, s in enumerate(good["steps"]) if s["kind"] == "oom_kill")
    more = copy.deepcopy(good)
    more["steps"][i:i] = passes(3)
    assert v1().check(more).ok
    assert reasons(CrossChecker("6.18", "v1", True).check(more)) == ["retry_budget"]
    # an OOM still needs the budget spent first: a move only adds passes
    early = charge([cf(64), cf(1), rc(), dr(), cf(1), rc(), kill(), oom(True), cf(1), rc(3)])
    assert reasons(v1().check(early)) == ["oom_early"]



def test_progress_does_not_consume_retries():
    # 30 passes that each free a page but leave no margin: no retry consumed
    s = [cf(64), cf(1), rc(1, usage=MAX), dr()] + [cf(1), rc(1, usage=MAX)] * 30 + [cf(1), rc(3)]
    assert v1().check(charge(s)).ok


def test_missing_oom_on_v2_but_not_v1():
    s = [cf(64, v1=False), cf(1, v1=False), rc(v1=False), dr()] + passes(17, v1=False)
    # v2: no oom_kill_disable, so -ENOMEM there needs an OOM first
    assert reasons(v2().check(charge(s, ret=-12, v1=False))) == ["missing_oom"]
    # v1: memory.oom_control oom_kill_disable makes mem_cgroup_oom return false silently
    s1 = [cf(64), cf(1), rc(), dr()] + passes(17)
    assert v1().check(charge(s1, ret=-12)).ok


def test_oom_before_budget():
    ep = charge([cf(64), cf(1), rc(), dr(), cf(1), rc(), kill(), oom(True), cf(1), rc(3)])
    assert reasons(v1().check(ep)) == ["oom_early"]


def test_kill_outside_oom():
    s = [cf(64), cf(1), rc(), dr()] + passes(17) + [kill()] + passes(1)
    assert reasons(v1().check(charge(s, ret=-12))) == ["oom_kill_outside_oom"]


def test_forced_charge_is_admitted_and_over_max_is_not():
    def strict():
        return CrossChecker("6.1", "v1", True, forced_charges_visible=True)
    cc = strict()
    # PF_MEMALLOC (unobservable) forces right after the shrunk attempt fails
    assert cc.check(charge([cf(64), cf(1)], exit_usage=MAX + 1, ts=10)).ok
    bad = charge([cf(64), cf(1), rc(3)], exit_usage=MAX + 5, ts=5_000_000_000)
    assert reasons(strict().check(bad)) == ["over_max"]
    # ... unless a forced charge was seen shortly before
    assert cc.check(copy.deepcopy(bad) | {"ts_ns": 20}).ok
    # or forced charges may be unseen (the default: today's probes)
    assert v1().check(bad).ok
    # v2: memory.max writes set max below usage
    assert CrossChecker("6.1", "v2", False, forced_charges_visible=True).check(_as_v2(bad)).ok


def test_counter_attempt_sizes():
    # after a batch failure the retry is of nr pages, never the batch again
    assert reasons(v1().check(charge([cf(64), cf(64), rc(3)]))) == ["counter_mismatch"]
    # a drain right after the batch failure, before any reclaim
    assert reasons(v1().check(charge([cf(64), dr(), cf(1), rc(3)]))) == ["unexpected_drain"]


def test_reclaim_target_and_args():
    assert reasons(v1().check(charge([cf(64), cf(1), rc(3, nr=32)]))) == ["reclaim_args"]
    assert reasons(v1().check(charge([cf(64), cf(1), rc(3, cg=36)]))) == ["target_mismatch"]
    # a memsw failure reclaims without swap (options 0)
    ep = charge([cf(64, counter="memsw"), cf(1, counter="memsw"), rc(3, options=0)])
    assert v1().check(ep).ok
    ep["steps"][2]["options"] = 2
    assert reasons(v1().check(ep)) == ["reclaim_args"]


def test_ancestor_failure_and_ancestry():
    # the parent (id 30) is the counter owner: reclaim and OOM go there
    s = [cf(64, cg=30), cf(1, cg=30), rc(3, cg=30)]
    paths = {30: "/p", CG: "/p/c", 40: "/q"}
    assert CrossChecker("6.1", "v1", True, ancestors=paths).check(charge(s)).ok
    s2 = [cf(64, cg=40), cf(1, cg=40), rc(3, cg=40)]
    assert reasons(CrossChecker("6.1", "v1", True, ancestors=paths).check(charge(s2))) \
        == ["bad_ancestry"]
    # unknown tree: not flagged
    assert CrossChecker("6.1", "v1", True).check(charge(s2)).ok
    assert CrossChecker("6.1", "v1", True, ancestors=lambda cid: None).check(charge(s2)).ok


def test_missing_drain_only_when_drains_are_visible():
    ep = charge([cf(64), cf(1), rc(), cf(1), rc(3)])
    assert v1().check(ep).ok
    assert reasons(CrossChecker("6.1", "v1", True, drains_visible=True).check(ep)) == ["missing_drain"]


def test_5_10_nofail_forces_before_oom():
    nofail = GFP_KERNEL | 0x8000
    s = [cf(32), cf(1), rc(gfp=nofail), dr()] + passes(17, gfp=nofail)
    for st in s:
        if st["kind"] == "reclaim":
            st["options"] = 1           # 5.10: bool may_swap
    # forced into a full counter: usage ends one page over max
    assert CrossChecker("5.10.100", "v1", True).check(charge(s, gfp=nofail, exit_usage=MAX + 1)).ok
    # on 6.1 NOFAIL goes through the OOM first (on v2: no oom_kill_disable to skip it)
    s61 = [cf(64), cf(1), rc(gfp=nofail), dr()] + passes(17, gfp=nofail)
    assert reasons(v2().check(_as_v2(charge(s61, gfp=nofail, exit_usage=MAX + 1)))) == ["missing_oom"]
    assert v1().check(charge(s61, gfp=nofail, exit_usage=MAX + 1)).ok


def test_incomplete_and_malformed():
    ep = charge([cf(64), cf(1), rc(3)])
    ep["complete"] = False
    assert v1().check(ep).checks == [("charge", "skipped")]
    bad = charge([{"kind": "teleport"}])
    assert reasons(v1().check(bad)) == ["malformed"]
    assert reasons(v1().check({"kind": "charge"})) == ["malformed"]
    assert reasons(v1().check({"kind": "zap"})) == ["malformed"]
    assert v1().check({"kind": "page_charge_fail"}).checks == [("page_charge", "divergent")]
    lw = limit("memory.limit_in_bytes", [dr(), cf(1, cg=99)], -16, 4096)
    assert reasons(v1().check(lw)) == ["malformed"]
    assert reasons(v2().check(limit("memory.limit_in_bytes", [], 0, 4096))) == ["malformed"]


# -- limit writes ---------------------------------------------------------------------------

def limit(file, steps, ret, value, text=None, usage=14000, cg=99, v1=True):
    ep = {"type": "episode", "kind": "limit_write", "ts_ns": 1, "duration_ns": 1, "pid": 1,
          "tid": 1, "comm": "w", "cpu": 0, "cgroup_id": cg, "file": file, "value": value,
          "steps": steps, "ret": ret}
    if v1:
        ep["entry"] = at(usage, 16384)
    else:
        ep["text"] = text
    return ep


def test_v1_resize():
    cc = v1()
    ok = limit("memory.limit_in_bytes", [dr(), rc(4, cg=99, caller="v1_limit"),
                                         rc(0, cg=99, caller="v1_limit")], -16, 4096)
    assert cc.check(ok).ok
    assert cc.check(limit("memory.limit_in_bytes", [], 0, 4096, usage=100)).ok
    # a shrink that fits after reclaim
    assert cc.check(limit("memory.limit_in_bytes", [dr(), rc(4, cg=99)], 0, 4096)).ok
    bad = limit("memory.limit_in_bytes", [dr(), rc(4, cg=99), rc(2, cg=99)], -16, 4096)
    assert reasons(cc.check(bad)) == ["ebusy_after_progress"]
    # v1 resize never OOMs; reclaims 1 page at a time
    assert reasons(cc.check(limit("memory.limit_in_bytes", [dr(), rc(0, cg=99), oom(cg=99)],
                                  -16, 4096))) == ["unexpected_oom"]
    assert reasons(cc.check(limit("memory.limit_in_bytes", [dr(), rc(4, nr=10, cg=99)], -16,
                                  4096))) == ["reclaim_args"]
    # memory.limit above memsw.limit: -EINVAL, nothing else
    e = limit("memory.limit_in_bytes", [], -22, 4096)
    e["entry"]["memsw_max"] = 2048
    assert cc.check(e).ok
    e["ret"] = 0
    assert reasons(cc.check(e)) == ["ret_mismatch"]
    # a signal may stop the loop
    assert cc.check(limit("memory.limit_in_bytes", [dr(), rc(4, cg=99)], -4, 4096)).ok


def _v2max(steps, ret=3, text="16M"):
    return limit("memory.max", steps, ret, len(text), text=text, cg=93, v1=False)


def test_v2_max_write():
    cc = v2()
    r = lambda freed: rc(freed, nr=10000, cg=93, caller="v2_max", v1=False)  # noqa: E731
    good = [dr(), r(4), r(1)] + [r(0)] * 16 + [kill(cg=93), oom(True, cg=93, v1=False)] \
        + [oom(True, cg=93, v1=False)] * 5 + [oom(False, cg=93, v1=False)]
    res = cc.check(_v2max(good))
    assert res.ok
    assert res.events == {(93, "oom"): 7, (93, "oom_kill"): 1}
    early = [dr()] + [r(0)] * 10 + [kill(cg=93), oom(True, cg=93, v1=False)]
    assert reasons(cc.check(_v2max(early))) == ["oom_early"]
    late = [dr()] + [r(0)] * 17 + [oom(False, cg=93, v1=False)]
    assert reasons(cc.check(_v2max(late))) == ["retry_budget"]
    after_false = [dr()] + [r(0)] * 16 + [oom(False, cg=93, v1=False), oom(True, cg=93, v1=False)]
    assert reasons(cc.check(_v2max(after_false))) == ["retry_budget"]
    assert cc.check(_v2max([], ret=3)).ok
    assert cc.check(_v2max([], ret=-22, text="12Q")).ok
    assert reasons(cc.check(_v2max([], ret=2, text="16M"))) == ["ret_mismatch"]


def test_v2_high_write_never_ooms():
    cc = v2()
    r = lambda freed: rc(freed, nr=500, cg=93, caller="v2_high", v1=False)  # noqa: E731
    ep = limit("memory.high", [dr()] + [r(0)] * 17, 3, 3, text="16M", cg=93, v1=False)
    assert cc.check(ep).ok
    ep["steps"].append(oom(True, cg=93, v1=False))
    assert reasons(cc.check(ep)) == ["unexpected_oom"]


# -- page charges, kills, reclaims --------------------------------------------------------------

def test_page_charge():
    cc = v1()
    nested = charge([cf(512)], ret=-12, gfp=GFP_TRANSHUGE_LIGHT, nr=512, ts=100)
    assert cc.check(nested).ok
    pc = {"kind": "page_charge_fail", "ts_ns": 90, "duration_ns": 50, "tid": 7, "cgroup_id": CG,
          "nr_pages": 512, "gfp": GFP_TRANSHUGE_LIGHT, "steps": [], "ret": -12}
    assert cc.check(pc).checks == [("page_charge", "ok")]
    assert reasons(cc.check(pc | {"nr_pages": 1})) == ["page_charge_mismatch"]
    # no nested charge seen: a NOFAIL charge can never fail
    lone = pc | {"tid": 8, "gfp": GFP_KERNEL | 0x8000, "nr_pages": 1}
    assert reasons(cc.check(lone)) == ["page_charge_mismatch"]
    assert cc.check(lone | {"gfp": GFP_KERNEL}).ok
    assert reasons(cc.check(pc | {"ret": -5})) == ["page_charge_mismatch"]


def test_standalone_kill_and_reclaim():
    cc = v2()
    assert cc.check({"kind": "oom_kill", "cgroup_id": 1, "victim_pid": 5}).kills == 1
    assert reasons(cc.check({"kind": "oom_kill", "cgroup_id": 1})) == ["malformed"]
    rec = {"kind": "reclaim", "cgroup_id": 1, "caller": "other", "gfp": GFP_KERNEL, "ret": 12}
    assert cc.check(rec).checks == [("reclaim", "ok")]
    assert reasons(cc.check(rec | {"gfp": GFP_NOWAIT})) == ["reclaim_not_allowed"]
    assert reasons(cc.check(rec | {"ret": -1})) == ["malformed"]


def test_reason_set_is_documented():
    readme = (Path(__file__).resolve().parents[3] / "collector" / "README.md").read_text()
    for r in REASONS:
        assert f"`{r}`" in readme, r


# -- aggregates ---------------------------------------------------------------------------------

def test_aggregate_v1_failcnt():
    cc, agg = v1(), AggregateChecker("6.1", "v1", True)
    for ep in (full_oom_charge(), charge([cf(64), cf(1), rc(3)])):
        agg.observe(cc.check(ep))
    seen = agg.failures[(CG, "memory")]
    assert seen == 2 + 17 + 17 + 2
    assert agg.check_v1(CG, seen) == []
    assert agg.check_v1(CG, seen - 1) == []                      # read skew
    # batch failures of charges that then succeed are not episodes: more is fine
    assert agg.check_v1(CG, seen + 50) == []
    (d,) = agg.check_v1(CG, seen - 10)
    assert d.reason == "failcnt_mismatch"
    assert agg.check_v1(CG, seen - 10, lost=10) == []
    # exact in-kernel counts take precedence, both ways
    assert agg.check_v1(CG, 500, kernel_failures={"memory": 500}) == []
    (d,) = agg.check_v1(CG, 510, kernel_failures={"memory": 500})
    assert d.reason == "failcnt_mismatch"
    (d,) = agg.check_v1(CG, seen, memsw_failcnt_delta=9, kernel_failures={"memory": seen, "memsw": 0})
    assert d.reason == "memsw_failcnt_mismatch"


def test_aggregate_v2_events_from_replays():
    agg = AggregateChecker("6.1", "v2", False)
    agg.observe_episodes([full_oom_charge(v1=False), _as_v2(charge([cf(64), cf(1), rc(3)]))])
    # 18 passes before the OOM and 17 after, plus one; one OOM; one kill
    assert agg.events[(CG, "max")] == 36
    assert agg.events[(CG, "oom")] == 1
    assert agg.check_v2(CG, {"max": "36", "oom": "1", "oom_kill": "1"}) == []
    got = {d.reason for d in agg.check_v2(CG, {"max": 30, "oom": 4, "oom_kill": 5})}
    assert got == {"events_max_mismatch", "events_oom_mismatch", "events_oom_kill_mismatch"}
    # >= 6.1: more max events than seen may be unseen forced charges; 5.15 has none
    assert agg.check_v2(CG, {"max": 50}) == []
    agg515 = AggregateChecker("5.15", "v2", False)
    agg515.observe(v2("5.15").check(_as_v2(charge([cf(32), cf(1), rc(3)]))))
    assert agg515.check_v2(CG, {"max": 1}) == []
    assert [d.reason for d in agg515.check_v2(CG, {"max": 5})] == ["events_max_mismatch"]


def test_forced_charge_raises_max_on_6_1_only():
    ep = _as_v2(charge([cf(64), cf(1)]))      # forced (PF_MEMALLOC)
    r61 = v2("6.1").check(ep)
    r515 = v2("5.15").check(_as_v2(charge([cf(32), cf(1)])))
    assert r61.events == {(CG, "max"): 1}
    assert r515.events == {}


def test_compare_count_tolerance():
    assert compare_count("x", "failcnt_mismatch", 10, 10) is None
    assert compare_count("x", "failcnt_mismatch", 13, 10) is not None
    assert compare_count("x", "failcnt_mismatch", 13, 10, tol=Tolerance(slack=3)) is None
    assert compare_count("x", "failcnt_mismatch", 100, 10, one_sided=True) is None
    assert compare_count("x", "failcnt_mismatch", 1, 10, one_sided=True) is not None


def test_profiles_by_release():
    assert CrossChecker("6.12.117+deb12-amd64", "v2", False).profile is get_profile("6.12")
    with pytest.raises(ValueError):
        CrossChecker("6.1", "v3", False)


@pytest.mark.parametrize("path", RECORDING_FILES, ids=lambda p: p.stem)
def test_aggregates_match_real_cgroupfs_counters(path):
    """The workloads' cgroups were fresh, so their cgroupfs counters at the
    end are the window's deltas: they must agree with the episodes."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    header, trailer = lines[0], lines[-1]
    cc = checker_for(header)
    cg = "v1" if header["cgroup"]["v1_memory"] else "v2"
    agg = AggregateChecker(header["kernel"], cg, bool(header["memsw"]))
    for ep in lines[1:-1]:
        if ep.get("type") == "episode":
            agg.observe(cc.check(ep))
    checked = 0
    for name, w in trailer["workloads"].items():
        if w.get("failcnt_delta") is not None:
            cid, delta = w["cgroup_id"], w["failcnt_delta"]
            assert agg.check_v1(cid, delta, kernel_failures=w["counter_failures"]) == []
            assert agg.check_v1(cid, delta) == []
            assert [d.reason for d in agg.check_v1(cid, agg.failures[(cid, "memory")] - 5)] \
                == ["failcnt_mismatch"]
            checked += 1
        if w.get("events"):
            cid, ev = w["cgroup_id"], {k: int(v) for k, v in w["events"].items()}
            assert agg.check_v2(cid, ev) == [], name
            assert [d.reason for d in agg.check_v2(cid, ev | {"oom": ev["oom"] + 5})] \
                == ["events_oom_mismatch"]
            checked += 1
    assert checked


def test_daemon_interface_deltas_and_baseline():
    from types import SimpleNamespace as NS
    agg = AggregateChecker("6.1", "v2", False)
    cc_eps = [full_oom_charge(v1=False)]
    snap = lambda mx, oom, kill: NS(failcnt={}, events={"max": mx, "oom": oom, "oom_kill": kill})  # noqa: E731
    first = agg.check({"/c": snap(10, 0, 0)}, {CG: "/c"}, [], None)
    assert first.checks == [] and first.divergences == []              # baseline
    ok = agg.check({"/c": snap(10 + 36, 1, 1)}, {CG: "/c"}, cc_eps, None)
    assert ok.ok and ("events_max", "ok") in ok.checks
    # the kernel counted no max for a window whose episode implies 36, and 5 kills unseen
    bad = agg.check({"/c": snap(46, 2, 6)}, {CG: "/c"}, cc_eps, None)
    assert {d.reason for d in bad.divergences} == {"events_max_mismatch", "events_oom_kill_mismatch"}
    assert bad.divergences[0].episode["cgroup"] == "/c"
    v1agg = AggregateChecker("6.1", "v1", True)
    ka = lambda n: NS(cgroups={CG: NS(counter_failures={"memory": n})}, lost_per_cpu=[0])  # noqa: E731
    s1 = lambda n: NS(failcnt={"memory": n}, events={})  # noqa: E731
    v1agg.check({"/c": s1(5)}, {CG: "/c"}, [], ka(5))
    assert v1agg.check({"/c": s1(25)}, {CG: "/c"}, [], ka(25)).ok
    r = v1agg.check({"/c": s1(60)}, {CG: "/c"}, [], ka(40))
    assert [d.reason for d in r.divergences] == ["failcnt_mismatch"]
    assert v1agg.check({"/c": s1(0)}, {CG: "/c"}, [], ka(40)).checks == [("failcnt", "ok")]  # reset


def test_mutated_real_episodes_never_crash():
    """Steps dropped, duplicated or swapped in real episodes: the checker
    always answers with a verdict and a reason from the documented set."""
    import random
    rng = random.Random(7)
    for path in RECORDING_FILES:
        header, eps = load(path)
        cc = checker_for(header, ancestors=lambda cid: None)
        for ep in eps:
            for _ in range(4):
                m = copy.deepcopy(ep)
                steps = m.get("steps") or []
                if steps:
                    i = rng.randrange(len(steps))
                    op = rng.choice(("drop", "dup", "swap", "ret"))
                    if op == "drop":
                        del steps[i]
                    elif op == "dup":
                        steps.insert(i, copy.deepcopy(steps[i]))
                    elif op == "swap" and i + 1 < len(steps):
                        steps[i], steps[i + 1] = steps[i + 1], steps[i]
                    else:
                        m["ret"] = rng.choice((0, -12, -16, -4, 3))
                res = cc.check(m)
                assert res.checks and all(v in ("ok", "divergent", "skipped") for _, v in res.checks)
                assert all(d.reason in REASONS for d in res.divergences)


# -- memory.high throttling (mem_cgroup_handle_over_high) ---------------------------------------

def over_high(nr=200, steps=None, penalty=0, usage=8500, high=8192, cg=CG):
    """The handler for a task owing ``nr`` pages: by default one reclaim of
    the debt that leaves ``usage`` against ``high``, then a sleep of
    ``penalty`` jiffies (0: none)."""
    if steps is None:
        steps = [rc(freed=10, nr=nr, cg=cg, usage=usage, v1=False) | {"caller": "high"}]
    return {"type": "episode", "kind": "over_high", "ts_ns": 5, "duration_ns": 10, "pid": 7, "tid": 7,
            "comm": "t", "cpu": 0, "cgroup_id": cg, "nr_pages": nr, "steps": steps, "ret": 0,
            "sleep_ns": penalty * 4_000_000, "penalty_jiffies": penalty,
            "entry": {"usage": usage, "max": MAX * 4, "high": high},
            "exit": {"usage": usage, "max": MAX * 4, "high": high}}


def test_over_high_penalty_within_the_model():
    from memcgscope.model.charge import high_penalty_jiffies
    cc = v2("6.12")
    low = high_penalty_jiffies("6.12", 200, 8500, 8192)
    assert 2 < low < 500                     # the case sleeps, below the cap
    assert cc.check(over_high(penalty=low)).checks == [("over_high", "ok")]
    assert cc.check(over_high(penalty=500)).ok          # another level may be worse: up to the cap
    assert cc.check(over_high(penalty=0)).ok            # no sleep seen: nothing to bound
    # a sleep shorter than this memcg's own overage allows, one past the 2 s cap, one at HZ/100
    assert reasons(cc.check(over_high(penalty=low - 2))) == ["high_penalty"]
    assert reasons(cc.check(over_high(penalty=501))) == ["high_penalty"]
    assert reasons(cc.check(over_high(penalty=2, usage=8300, nr=64))) == ["high_penalty"]


def test_over_high_steps_and_reclaim_sizes():
    cc = v2("6.12")
    retry = [rc(freed=0, nr=200, usage=8500, v1=False), rc(freed=0, nr=32, usage=8500, v1=False)]
    assert cc.check(over_high(steps=retry)).ok
    # reclaim_high asks the debt, then SWAP_CLUSTER_MAX: never another size
    bad = [rc(freed=0, nr=200, usage=8500, v1=False), rc(freed=0, nr=64, usage=8500, v1=False)]
    assert reasons(cc.check(over_high(steps=bad))) == ["reclaim_args"]
    # memory.high handling never OOMs
    assert reasons(cc.check(over_high(steps=retry + [oom(v1=False)]))) == ["unexpected_oom"]
    assert reasons(cc.check(over_high(nr=0))) == ["malformed"]
    assert reasons(cc.check({k: v for k, v in over_high().items() if k != "steps"})) == ["malformed"]
