"""The checks of episodes that are not replayed step by step: a failed
page charge (``__mem_cgroup_charge``), an OOM kill and a memcg reclaim seen
outside any other episode, and ``over_max`` after a charge."""

from __future__ import annotations

import errno

from memcgscope.model import GFP, Kernel

from .episode import counters_problem
from .reasons import BadInput, Divergence

__all__ = ["check_page_charge", "check_oom_kill", "check_reclaim", "check_over_max", "check_over_high"]

HZ = 250              # CONFIG_HZ of Debian's builds (5.10 through 7.3)
SWAP_CLUSTER_MAX = 32

_DIRECT = GFP.DIRECT_RECLAIM


def _can_fail(cc, gfp, nr) -> bool:
    """Can a charge of this gfp fail at all?  Replayed on a cgroup whose
    every attempt fails and whose reclaims and OOMs do nothing."""
    k = Kernel(cc.profile, cgroup=cc.cgroup, cpus=1, swap_account=cc.memsw)
    m = k.mkdir("m")
    if k.write(m, "memory.limit_in_bytes" if cc.cgroup == "v1" else "memory.max", "0"):
        raise RuntimeError("scratch kernel: cannot set a zero limit")
    return k.charge(m, nr, gfp, 0).ret == -errno.ENOMEM


def check_page_charge(cc, ep, res):
    ret, nr, gfp = ep["ret"], ep["nr_pages"], ep["gfp"]
    ts = ep.get("ts_ns", 0)
    end = ts + (ep.get("duration_ns") or 0)
    nested = cc._charges_by_tid.get(ep.get("tid"))
    if ret not in (-errno.ENOMEM, -errno.EINTR):
        cc.flag(res, "page_charge", "page_charge_mismatch",
                f"__mem_cgroup_charge returned {ret}; its charge returns 0 or -ENOMEM", ep)
        return
    if nested is not None and ts <= nested[0] and nested[1] <= end:
        if nested[3] != ret or nested[2] != nr:
            cc.flag(res, "page_charge", "page_charge_mismatch",
                    f"returned {ret} for {nr} pages; its charge returned {nested[3]} "
                    f"for {nested[2]}", ep)
        else:
            res.checks.append(("page_charge", "ok"))
        return
    # no nested charge seen: can this gfp fail at all?
    key = ("page", gfp, nr)
    can_fail = cc._cache.get(key)
    if can_fail is None:
        try:
            can_fail = _can_fail(cc, gfp, nr)
        except Exception as e:   # a bug of ours, kept like any outcome
            can_fail = ("replay_error", f"{type(e).__name__}: {e}")
        cc._cache.put(key, can_fail)
    if type(can_fail) is tuple:
        cc.flag(res, "page_charge", can_fail[0], can_fail[1], ep)
    elif can_fail or ret == -errno.EINTR:
        res.checks.append(("page_charge", "ok"))
    else:
        cc.flag(res, "page_charge", "page_charge_mismatch",
                f"-ENOMEM for gfp {gfp:#x}, which the model always forces", ep)


def check_oom_kill(cc, ep, res):
    if type(ep.get("victim_pid")) is not int:
        cc.flag(res, "oom_kill", "malformed", "victim_pid: an oom_kill without a victim_pid", ep)
        return
    res.kills += 1
    v = ep.get("victim_cgroup_id")
    if type(v) is int and v:
        res.victims[v] = res.victims.get(v, 0) + 1
    res.checks.append(("oom_kill", "ok"))


def check_reclaim(cc, ep, res):
    freed, gfp = ep.get("ret"), ep.get("gfp")
    if type(freed) is not int or freed < 0:
        cc.flag(res, "reclaim", "malformed", f"ret: reclaim freed {freed!r}", ep)
    elif isinstance(gfp, int) and not gfp & _DIRECT:
        cc.flag(res, "reclaim", "reclaim_not_allowed",
                f"memcg reclaim with gfp {gfp:#x} (no __GFP_DIRECT_RECLAIM)", ep)
    else:
        res.checks.append(("reclaim", "ok"))


def check_over_max(cc, ep, res, ts):
    """v1 limits are never set below usage and a successful try_charge keeps
    usage <= max, so only forced charges push usage above max.  Forced
    charges seen recently (any cgroup: the tree may be unknown) excuse it."""
    ent, ex = ep.get("entry"), ep.get("exit")
    try:
        if not ex or not ent or ent.get("max") != ex.get("max"):
            return
        if cc._last_forced_ns is not None and ts - cc._last_forced_ns <= cc.forced_window_ns:
            return
        over = ex["usage"] > ex["max"] + cc.over_max_slack
    except (AttributeError, KeyError, TypeError):
        # judged where read, so that a verdict does not depend on the cache
        raise BadInput(counters_problem(ep, "entry", cc.memsw)
                       or counters_problem(ep, "exit", cc.memsw) or "") from None
    if over:
        res.checks[-1] = ("charge", "divergent")
        res.divergences.append(Divergence(
            "charge", "over_max",
            f"usage {ex['usage']} > max {ex['max']} after a charge that was not forced", ep))


def check_over_high(cc, ep, res):
    """mem_cgroup_handle_over_high (__mem_cgroup_handle_over_high on 6.18+)
    on the way back to user space: reclaim_high on the task's memcg and each
    ancestor over memory.high, the debt (``nr_pages``) on the first pass and
    SWAP_CLUSTER_MAX after; then, if the penalty is above HZ/100, a sleep of
    it (schedule_timeout_killable). The penalty the kernel computed
    (``penalty_jiffies``, read at that call) must lie between what the
    model's formula gives for this memcg's own overage (the kernel takes
    the worst level, so at least that) and the 2 s cap."""
    from memcgscope.model.charge import high_penalty_jiffies
    nr, steps = ep.get("nr_pages"), ep.get("steps")
    if type(nr) is not int or nr < 1 or not isinstance(steps, list):
        cc.flag(res, "over_high", "malformed", "nr_pages/steps: an over_high episode needs both", ep)
        return
    reclaims = [s for s in steps if isinstance(s, dict) and s.get("kind") == "reclaim"]
    if any(s.get("kind") not in ("reclaim", "drain") for s in steps if isinstance(s, dict)):
        cc.flag(res, "over_high", "unexpected_oom" if any(s.get("kind") == "oom" for s in steps) else "malformed",
                "steps: memory.high handling reclaims only", ep)
        return
    for i, s in enumerate(reclaims):
        if s.get("nr_pages") not in (nr, SWAP_CLUSTER_MAX):
            cc.flag(res, "over_high", "reclaim_args",
                    f"reclaim {i} asked {s.get('nr_pages')} pages; memory.high reclaim asks the debt ({nr}) "
                    f"or {SWAP_CLUSTER_MAX} on a retry", ep)
            return
    penalty = ep.get("penalty_jiffies")
    ex = ep.get("exit") or {}
    usage = reclaims[-1].get("after", {}).get("usage") if reclaims and reclaims[-1].get("cgroup_id") == \
        ep.get("cgroup_id") else ex.get("usage")
    high = ex.get("high")
    if type(penalty) is int and penalty and type(usage) is int and type(high) is int:
        low = high_penalty_jiffies(cc.profile, nr, usage, high, HZ)
        # the kernel sleeps only above HZ/100 (the "penalty_jiffies <= HZ / 100" exit)
        if penalty > 2 * HZ or penalty <= HZ // 100 or penalty + 1 < low:
            cc.flag(res, "over_high", "high_penalty",
                    f"slept {penalty} jiffies; the model's penalty for {usage - high} pages over high "
                    f"{high} with a debt of {nr} is at least {max(low, HZ // 100 + 1)} and at most {2 * HZ}", ep)
            return
    res.checks.append(("over_high", "ok"))
