"""``mem_cgroup_oom`` and ``mem_cgroup_out_of_memory``.

The model never picks a victim: ``out_of_memory()`` is the ``oom`` oracle
(the environment in a simulation, the observation in a cross-check).
"""

from __future__ import annotations

from .context import OomOutcome
from .memcg import mem_cgroup_margin, memcg_memory_event
from .steps import Oom, OomKill
from .vmscan import uncharge_pages

__all__ = ["PAGE_ALLOC_COSTLY_ORDER", "mem_cgroup_oom", "mem_cgroup_out_of_memory"]

PAGE_ALLOC_COSTLY_ORDER = 3


def _out_of_memory(ctx, memcg, gfp, order):
    """The oracle's answer, applied: oom_kill (and oom_group_kill) events,
    the victim's pages uncharged."""
    answer = ctx.oom(memcg, order, gfp)
    if isinstance(answer, bool):
        answer = OomOutcome(result=answer)
    elif not isinstance(answer, OomOutcome):
        raise ValueError(f"oom oracle returned {answer!r}; expected a bool or an OomOutcome")
    if answer.victim is not None:
        victim = answer.victim
        if not victim.is_descendant(memcg):
            raise ValueError(f"OOM in {memcg.path} killed a task of {victim.path}, outside it")
        memcg_memory_event(victim, "oom_kill")
        if answer.group:
            memcg_memory_event(victim, "oom_group_kill")
        if answer.freed:
            uncharge_pages(victim, answer.freed)
        ctx.steps.append(OomKill(victim.path, answer.freed, answer.group))
        return answer.result, "killed"
    if answer.result:
        return True, "victim_exiting"
    return False, "no_victim"


def mem_cgroup_out_of_memory(ctx, memcg, gfp: int, order: int):
    """→ (bool, how).  Takes oom_lock (a dying task may be interrupted: the
    ≤ 6.14 dying shortcut gives the same answer, so it is folded in), then
    margin ≥ 2^order → True without a kill; then ≤ 6.14
    ``task_is_dying() || out_of_memory()``, 6.18 ``out_of_memory()`` only
    (on 6.18 a dying task is left to the oracle: out_of_memory() itself
    lets a dying current task go)."""
    if mem_cgroup_margin(memcg, ctx, "oom_margin") >= (1 << order):
        return True, "margin"
    if ctx.kernel.profile.oom_dying_shortcut and ctx.signalled(memcg, "oom_dying"):
        return True, "dying"
    return _out_of_memory(ctx, memcg, gfp, order)


def mem_cgroup_oom(ctx, memcg, gfp: int, order: int) -> str:
    """→ "success", "failed", "async" (v1 oom_kill_disable, memcg_in_oom
    recorded) or "skipped" (the 5.10/5.15 enum oom_status; ≥ 6.1 returns
    bool, i.e. success or not).  Orders above PAGE_ALLOC_COSTLY_ORDER are
    refused before any event; otherwise an ``oom`` event on ``memcg``."""
    if order > PAGE_ALLOC_COSTLY_ORDER:
        ctx.steps.append(Oom(memcg.path, order, "skipped_order", False))
        return "skipped"
    memcg_memory_event(memcg, "oom")
    if memcg.oom_kill_disable:
        if ctx.task.in_user_fault:
            ctx.task.memcg_in_oom = memcg
            ctx.kernel.oom_waiters.append(ctx.task)
            ctx.steps.append(Oom(memcg.path, order, "async", False))
            return "async"
        ctx.steps.append(Oom(memcg.path, order, "skipped", False))
        return "skipped"
    ok, how = mem_cgroup_out_of_memory(ctx, memcg, gfp, order)
    ctx.steps.append(Oom(memcg.path, order, how, ok))
    return "success" if ok else "failed"
