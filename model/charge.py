"""``try_charge_memcg`` (``try_charge`` on 5.10) and the memory.high
handling it triggers (``mem_cgroup_handle_over_high``, ``reclaim_high``).

Follows mm/memcontrol.c line by line; every branch that only some versions
take reads a profile field and says which versions.
"""

from __future__ import annotations

import errno

from .gfp import _BITS, GFP, order_of
from .memcg import mem_cgroup_margin, memcg_memory_event
from .oom import PAGE_ALLOC_COSTLY_ORDER, mem_cgroup_oom
from .steps import (BatchShrink, CounterCharge, CounterFail, Drain, Event, Force, HighBail,
                    HighOver, HighThrottle, Nomem, Restock, Retry, RootBypass, StockHit)
from .stock import consume_stock, drain_all_stock, refill_stock
from .vmscan import SWAP_CLUSTER_MAX, try_to_free_mem_cgroup_pages

__all__ = ["MAX_RECLAIM_RETRIES", "try_charge_memcg", "mem_cgroup_handle_over_high",
           "reclaim_high", "calculate_high_delay", "high_penalty_jiffies"]

MAX_RECLAIM_RETRIES = 16
#: The kernel can loop for as long as reclaim reports progress or the OOM
#: killer reports success; the model stops a call after this many passes so
#: that an oracle which never frees anything cannot hang it.
MAX_MODEL_PASSES = 100_000
MEMCG_DELAY_PRECISION_SHIFT = 20
MEMCG_DELAY_SCALING_SHIFT = 14

_ATOMIC = _BITS["ATOMIC"]
_HIGH = _BITS["HIGH"]
_DIRECT = _BITS["DIRECT_RECLAIM"]
_RECLAIM = _BITS["DIRECT_RECLAIM"] | _BITS["KSWAPD_RECLAIM"]
_NORETRY = _BITS["NORETRY"]
_NOFAIL = _BITS["NOFAIL"]
_RETRY_MAYFAIL = _BITS["RETRY_MAYFAIL"]
_SMALL_CHARGE = 1 << PAGE_ALLOC_COSTLY_ORDER


class _Goto(Exception):
    """Leaves the retry loop for the nomem or force label."""

    def __init__(self, label, reason):
        self.label, self.reason = label, reason


def _try_charge(ctx, memcg, name: str, nr: int):
    """page_counter_try_charge(&memcg->name, nr, &counter); the ``attempt``
    oracle, when given, says how it went."""
    counter = getattr(memcg, name)
    if ctx.attempt is None:
        return counter.try_charge(nr)
    level = ctx.counter_attempt(memcg, name, nr)
    return counter.try_charge(nr, level if level is None or level is True else getattr(level, name))


def try_charge_memcg(ctx, memcg, gfp: int, nr_pages: int) -> int:
    """Charge ``nr_pages`` to ``memcg`` → 0 or -ENOMEM; steps go to ctx.steps."""
    k, p, task, steps = ctx.kernel, ctx.kernel.profile, ctx.task, ctx.steps
    if memcg.is_root:
        memcg.charged += nr_pages
        steps.append(RootBypass(memcg.path, nr_pages))
        return 0
    if not p.has_gfp_atomic:
        gfp &= ~_ATOMIC  # the bit means nothing from 6.6 on
    batch = max(p.charge_batch, nr_pages)
    retries = MAX_RECLAIM_RETRIES
    may_swap, drained, passed_oom, raised_max = True, False, False, False
    over = None

    def retry(reason):
        steps.append(Retry(memcg.path, reason, retries))

    passes = 0
    try:
        while True:  # retry:
            passes += 1
            if passes > MAX_MODEL_PASSES:
                raise RuntimeError(
                    f"try_charge of {nr_pages} pages to {memcg.path} still retrying after "
                    f"{MAX_MODEL_PASSES} passes: the reclaim or oom oracle keeps reporting "
                    f"progress that frees nothing")
            if consume_stock(k, memcg, nr_pages, ctx.cpu, ctx.stock_locked):
                memcg.charged += nr_pages
                steps.append(StockHit(memcg.path, ctx.cpu, nr_pages))
                return 0
            if p.batch_is_nr_without_reclaim and not gfp & _RECLAIM:
                # 6.18: a charge that cannot reclaim takes no surplus
                batch = nr_pages
            over = None
            if memcg.memsw is not None:
                ok, fail = _try_charge(ctx, memcg, "memsw", batch)
                if not ok:
                    over = fail.owner
                    may_swap = False  # swapping does not lower memsw
                    steps.append(CounterFail(memcg.path, "memsw", batch, over.path,
                                             memcg.memsw.track_failcnt))
            if over is None:
                ok, fail = _try_charge(ctx, memcg, "memory", batch)
                if ok:
                    steps.append(CounterCharge(memcg.path, "memory", batch))
                    return _done_restock(ctx, memcg, gfp, nr_pages, batch)
                if memcg.memsw is not None:
                    memcg.memsw.uncharge(batch)
                over = fail.owner
                steps.append(CounterFail(memcg.path, "memory", batch, over.path,
                                         memcg.memory.track_failcnt))

            if batch > nr_pages:
                steps.append(BatchShrink(memcg.path, batch, nr_pages))
                batch = nr_pages
                retry("batch")
                continue
            if p.force_on_gfp_atomic and gfp & _ATOMIC:
                raise _Goto("force", "atomic")            # ≤ 6.0
            if p.early_dying_force and ctx.signalled(memcg, "force_dying"):
                raise _Goto("force", "dying")             # 5.10.0–5.10.79
            if task.pf_memalloc:
                raise _Goto("force", "pf_memalloc")
            if task.memcg_in_oom is not None:
                raise _Goto("nomem", "memcg_in_oom")      # v1 oom_kill_disable
            if not gfp & _DIRECT:
                raise _Goto("nomem", "no_direct_reclaim")
            # 6.12.117+, 6.18.51+, 7.2.5+, 7.3: an OOM victim the OOM reaper
            # is done with (MMF_OOM_SKIP on current->signal->oom_mm) fails at
            # once ("memcg: bypass the reclaim and oom killer for dying tasks
            # once oom_reaper is done")
            if p.oom_skip_bails and ctx.signalled(memcg, "oom_skip"):
                raise _Goto("nomem", "oom_skip")

            memcg_memory_event(over, "max")
            steps.append(Event(over.path, "max"))
            raised_max = True
            reclaimed = try_to_free_mem_cgroup_pages(ctx, over, nr_pages, gfp, may_swap)

            if mem_cgroup_margin(over, ctx, "charge_margin") >= nr_pages:
                retry("margin")
                continue
            if not drained:
                outcome = ctx.drain_outcome(over)
                pages = drain_all_stock(k, over, ctx.cpu, outcome, steps)
                steps.append(Drain(over.path, ctx.cpu, outcome, pages))
                drained = True
                retry("drain")
                continue
            if gfp & _NORETRY:
                raise _Goto("nomem", "noretry")
            if reclaimed and nr_pages <= _SMALL_CHARGE:
                retry("progress")  # progress: no retry consumed
                continue
            if p.charge_move_wait and ctx.moving is not None and ctx.moving(over):
                retry("move_wait")  # ≤ 6.12: mem_cgroup_wait_acct_move
                continue
            if retries:
                retries -= 1
                retry("retries")
                continue
            if gfp & _RETRY_MAYFAIL:
                raise _Goto("nomem", "retry_mayfail")
            if p.nofail_forces_before_oom and gfp & _NOFAIL:
                raise _Goto("force", "nofail")            # 5.10: OOM skipped
            if not p.early_dying_force and passed_oom and ctx.signalled(memcg, "passed_oom"):
                raise _Goto("nomem", "passed_oom_dying")  # 5.10.80+ and later
            status = mem_cgroup_oom(ctx, over, gfp, order_of(nr_pages))
            if status == "success":
                # 5.10.0–5.10.79 retried without remembering the OOM
                passed_oom = not p.early_dying_force
                retries = MAX_RECLAIM_RETRIES
                retry("oom")
                continue
            if p.early_dying_force and status == "failed":
                raise _Goto("force", "oom_failed")        # 5.10.0–5.10.79: OOM_FAILED
            raise _Goto("nomem", "oom")
    except _Goto as g:
        label, reason = g.label, g.reason

    if label == "nomem":
        # ≥ 6.1: __GFP_HIGH forces here (it replaced __GFP_ATOMIC); ≤ 6.0 only NOFAIL
        forcing = _NOFAIL | (_HIGH if p.nomem_forces_on_high else 0)
        if not gfp & forcing:
            # 7.3.4+: nomem and force meet at `out:`, which raises the max
            # event a rejected charge that never reclaimed has not raised
            # ("mm: memcontrol: raise MEMCG_MAX for charges that fail
            # without reclaiming")
            if p.rejected_charge_raises_max and not raised_max:
                memcg_memory_event(over, "max")
                steps.append(Event(over.path, "max"))
            steps.append(Nomem(over.path, reason))
            return -errno.ENOMEM
        reason = "nofail" if gfp & _NOFAIL else "high"

    # force: ≥ 6.1 raises max before the forced charge; 7.3.4+ after it, at `out:`
    late_max = p.rejected_charge_raises_max
    if p.forced_charge_raises_max and not raised_max and not late_max:
        memcg_memory_event(over, "max")
        steps.append(Event(over.path, "max"))
    memcg.memory.charge(nr_pages)
    if memcg.memsw is not None:
        memcg.memsw.charge(nr_pages)
    memcg.charged += nr_pages
    steps.append(Force(memcg.path, nr_pages, reason))
    steps.append(CounterCharge(memcg.path, "memory", nr_pages, forced=True))
    if late_max and not raised_max:
        memcg_memory_event(over, "max")
        steps.append(Event(over.path, "max"))
    return 0


def _done_restock(ctx, memcg, gfp, nr_pages, batch) -> int:
    k, p, task, steps = ctx.kernel, ctx.kernel.profile, ctx.task, ctx.steps
    memcg.charged += nr_pages
    if batch > nr_pages:
        steps.append(Restock(memcg.path, ctx.cpu, batch - nr_pages))
        refill_stock(k, memcg, batch - nr_pages, ctx.cpu, steps, ctx.stock_locked)
    # memory.high is only looked at when the counters were charged.  The
    # model always runs in task context (an interrupt would queue high_work).
    m = memcg
    while m is not None:
        mem_high = m.memory.usage > m.memory.high
        swap_high = m.swap is not None and m.swap.usage > m.swap.high
        if mem_high or swap_high:
            task.memcg_nr_pages_over_high += batch
            steps.append(HighOver(m.path, task.memcg_nr_pages_over_high))
            break
        m = m.parent
    # ≥ 6.1: a task far over high reclaims now instead of on return to user;
    # with the charge's gfp from 6.1.56 (before: reclaim_high's GFP_KERNEL)
    if (p.sync_high_reclaim and task.memcg_nr_pages_over_high > p.charge_batch
            and not task.pf_memalloc and gfp & _DIRECT):
        mem_cgroup_handle_over_high(ctx, memcg, gfp if p.sync_high_charge_gfp else GFP.KERNEL)
    return 0


def reclaim_high(ctx, memcg, nr_pages: int, gfp: int) -> int:
    """Reclaim from ``memcg`` and each ancestor below the root that is over
    memory.high, one ``high`` event each."""
    total = 0
    m = memcg
    while m is not None and not m.is_root:
        if m.memory.usage > m.memory.high:
            memcg_memory_event(m, "high")
            ctx.steps.append(Event(m.path, "high"))
            total += try_to_free_mem_cgroup_pages(ctx, m, nr_pages, gfp, True, reason="high")
        m = m.parent
    return total


def _calculate_overage(usage: int, high: int) -> int:
    if usage <= high:
        return 0
    high = max(high, 1)
    return ((usage - high) << MEMCG_DELAY_PRECISION_SHIFT) // high


def _max_overage(ctx, memcg, counter_name: str) -> int:
    worst = 0
    m = memcg
    while m is not None and not m.is_root:
        c = getattr(m, counter_name)
        if c is not None:
            overage = _calculate_overage(c.usage, c.high)
            if overage and counter_name == "swap":
                memcg_memory_event(m, "swap_high")
            worst = max(worst, overage)
        m = m.parent
    return worst


def calculate_high_delay(nr_pages: int, max_overage: int, hz: int, batch: int) -> int:
    """Jiffies of throttling for ``nr_pages`` over high (before the 2 s cap)."""
    if not max_overage:
        return 0
    penalty = max_overage * max_overage * hz
    penalty >>= MEMCG_DELAY_PRECISION_SHIFT
    penalty >>= MEMCG_DELAY_SCALING_SHIFT
    return penalty * nr_pages // batch


def high_penalty_jiffies(profile, nr_pages: int, usage: int, high: int, hz: int = 250) -> int:
    """The penalty mem_cgroup_handle_over_high computes for a task owing
    ``nr_pages`` when one level is ``usage`` pages over ``high`` (the
    kernel takes the worst level of the memcg and its ancestors, so this is
    a lower bound of its penalty), capped at 2 s; Debian builds have HZ 250."""
    from .profiles import get_profile
    p = get_profile(profile)
    return min(calculate_high_delay(nr_pages, _calculate_overage(usage, high), hz, p.charge_batch), 2 * hz)


def mem_cgroup_handle_over_high(ctx, memcg, gfp: int) -> None:
    """Reclaim what the task owes over memory.high, then throttle.

    The kernel uses the task's own memcg; the model uses the one charged.
    Gives up (no sleep) if the delay is ≤ HZ/100 (10 ms); otherwise retries
    while reclaim makes progress or retries remain, then sleeps the delay
    (capped at 2 s).  ≥ 6.8: a dying task (the ``over_high`` signal point)
    stops at the top of every retry.
    """
    k, task = ctx.kernel, ctx.task
    nr_pages = task.memcg_nr_pages_over_high
    if not nr_pages:
        return
    task.memcg_nr_pages_over_high = 0
    retries = MAX_RECLAIM_RETRIES
    in_retry = False
    while True:
        # ≥ 6.8 (6.12, 6.18, 7.x): a dying task is not throttled ("mm:
        # memcontrol: don't throttle dying tasks on memory.high")
        if k.profile.over_high_dying_bail and ctx.signalled(memcg, "over_high"):
            ctx.steps.append(HighBail(memcg.path, "dying"))
            return
        reclaimed = reclaim_high(ctx, memcg, SWAP_CLUSTER_MAX if in_retry else nr_pages, gfp)
        penalty = calculate_high_delay(nr_pages, _max_overage(ctx, memcg, "memory"), k.hz,
                                       k.profile.charge_batch)
        penalty += calculate_high_delay(nr_pages, _max_overage(ctx, memcg, "swap"), k.hz,
                                        k.profile.charge_batch)
        penalty = min(penalty, 2 * k.hz)
        if penalty <= k.hz // 100:
            ctx.steps.append(HighThrottle(memcg.path, penalty, False))
            return
        if reclaimed:
            in_retry = True
            continue
        if retries:
            retries -= 1
            in_retry = True
            continue
        ctx.steps.append(HighThrottle(memcg.path, penalty, True))
        return

