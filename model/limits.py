"""Limit writes: v1 ``mem_cgroup_resize_max`` (memory.limit_in_bytes,
memory.memsw.limit_in_bytes), v2 ``memory_max_write``,
``memory_high_write``, ``memory_reclaim``.  §6 of the reference.
"""

from __future__ import annotations

import errno

from .charge import MAX_MODEL_PASSES, MAX_RECLAIM_RETRIES
from .gfp import GFP
from .memcg import memcg_memory_event
from .oom import mem_cgroup_out_of_memory
from .steps import Drain, Event, Oom, SetMax
from .stock import drain_all_stock
from .vmscan import try_to_free_mem_cgroup_pages

__all__ = ["mem_cgroup_resize_max", "memory_max_write", "memory_high_write", "memory_reclaim"]


def _drain(ctx, memcg):
    outcome = ctx.drain_outcome(memcg)
    pages = drain_all_stock(ctx.kernel, memcg, ctx.cpu, outcome, ctx.steps)
    ctx.steps.append(Drain(memcg.path, ctx.cpu, outcome, pages))


def mem_cgroup_resize_max(ctx, memcg, max_pages: int, memsw: bool) -> int:
    """v1: set memory.max or memsw.max → 0, -EINVAL, -EBUSY or -EINTR.

    Never OOMs.  Loops while 1-page reclaims make progress; the first
    failure of set_max drains the stocks instead of reclaiming.  ``usage_grows``
    of the kernel (a test hook) models a charge landing inside set_max.
    """
    counter = memcg.memsw if memsw else memcg.memory
    enlarge = False
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        if ctx.task.signal_pending:
            ret = -errno.EINTR
            break
        # under memcg_max_mutex: memsw.max ≥ memory.max must keep holding
        if memsw:
            invariant = max_pages >= memcg.memory.max
        else:
            invariant = memcg.memsw is None or max_pages <= memcg.memsw.max
        if not invariant:
            ret = -errno.EINVAL
            break
        if max_pages > counter.max:
            enlarge = True
        ret = counter.set_max(max_pages, ctx.kernel.set_max_race)
        ctx.steps.append(SetMax(memcg.path, counter.name, max_pages, ret))
        if ret == 0:
            break
        if not drained:
            _drain(ctx, memcg)
            drained = True
            continue
        if not try_to_free_mem_cgroup_pages(ctx, memcg, 1, GFP.KERNEL, not memsw,
                                            reason="limit"):
            ret = -errno.EBUSY
            break
    else:
        raise RuntimeError(f"resize of {memcg.path} still looping after {MAX_MODEL_PASSES} "
                           f"passes: the reclaim oracle reports progress that frees nothing")
    if ret == 0 and enlarge:
        ctx.kernel.memcg_oom_recover(memcg)
    return ret


def memory_max_write(ctx, memcg, max_pages: int, nonblock: bool = False) -> None:
    """v2 memory.max: set at once (never -EBUSY), then while usage > max:
    stop on a signal; drain once; reclaim ``usage - max`` (may swap) with a
    budget of 16 zero-progress passes; then an ``oom`` event and
    mem_cgroup_out_of_memory(memcg, GFP_KERNEL, 0), stopping if it returns
    false.  6.18 with O_NONBLOCK stops after setting max."""
    memcg.memory.max = max_pages
    ctx.steps.append(SetMax(memcg.path, "memory", max_pages, 0))
    if nonblock and ctx.kernel.profile.nonblock_limit_writes:
        return
    nr_reclaims = MAX_RECLAIM_RETRIES
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        usage = memcg.memory.usage
        if usage <= max_pages:
            break
        if ctx.task.signal_pending:
            break
        if not drained:
            _drain(ctx, memcg)
            drained = True
            continue
        if nr_reclaims:
            if not try_to_free_mem_cgroup_pages(ctx, memcg, usage - max_pages, GFP.KERNEL,
                                                True, reason="limit"):
                nr_reclaims -= 1
            continue
        memcg_memory_event(memcg, "oom")
        ctx.steps.append(Event(memcg.path, "oom"))
        ok, how = mem_cgroup_out_of_memory(ctx, memcg, GFP.KERNEL, 0)
        ctx.steps.append(Oom(memcg.path, 0, how, ok))
        if not ok:
            break
    else:
        raise RuntimeError(f"memory.max write to {memcg.path} still looping after "
                           f"{MAX_MODEL_PASSES} passes: the oom oracle keeps succeeding "
                           f"without freeing anything")


def memory_high_write(ctx, memcg, high_pages: int, nonblock: bool = False) -> None:
    """v2 memory.high: set high, drain once, reclaim ``usage - high`` until it
    fits, a signal, or a zero-progress pass when no retry is left
    (``if (!reclaimed && !nr_retries--) break``: 17 zero-progress calls).
    Never OOMs.  6.18 with O_NONBLOCK stops after setting high."""
    memcg.memory.high = high_pages
    if nonblock and ctx.kernel.profile.nonblock_limit_writes:
        return
    retries = MAX_RECLAIM_RETRIES
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        usage = memcg.memory.usage
        if usage <= high_pages:
            break
        if ctx.task.signal_pending:
            break
        if not drained:
            _drain(ctx, memcg)
            drained = True
            continue
        reclaimed = try_to_free_mem_cgroup_pages(ctx, memcg, usage - high_pages, GFP.KERNEL,
                                                 True, reason="limit")
        if not reclaimed:
            if not retries:
                break
            retries -= 1


def memory_reclaim(ctx, memcg, nr_to_reclaim: int) -> int:
    """v2 memory.reclaim (6.1 form): reclaim until ``nr_to_reclaim`` pages
    are freed → 0, -EINTR on a signal, -EAGAIN when a zero-progress pass
    finds no retry left.  Each call asks for what is still missing
    (later kernels cap the batch; not modelled)."""
    retries = MAX_RECLAIM_RETRIES
    done = 0
    for _ in range(MAX_MODEL_PASSES):
        if done >= nr_to_reclaim:
            break
        if ctx.task.signal_pending:
            return -errno.EINTR
        reclaimed = try_to_free_mem_cgroup_pages(ctx, memcg, nr_to_reclaim - done, GFP.KERNEL,
                                                 True, reason="proactive")
        if not reclaimed:
            if not retries:
                return -errno.EAGAIN
            retries -= 1
        done += reclaimed
    return 0 if done >= nr_to_reclaim else -errno.EAGAIN

