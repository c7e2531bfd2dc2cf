"""Limit writes: v1 ``mem_cgroup_resize_max`` (memory.limit_in_bytes,
memory.memsw.limit_in_bytes), v2 ``memory_max_write``,
``memory_high_write``, ``memory_reclaim`` (mm/memcontrol.c; v1 in
mm/memcontrol-v1.c from 6.12).
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


def _set_max(ctx, memcg, counter, max_pages: int) -> int:
    """page_counter_set_max(counter, max_pages): its usage read is the
    ``usage`` oracle's, a charge racing with it the ``set_max_race`` one's."""
    name = counter.name
    race = None if ctx.set_max_race is None else (lambda: ctx.race_pages(memcg, name))
    read = None if ctx.usage is None else (lambda: ctx.read_usage(memcg, name, "set_max"))
    return counter.set_max(max_pages, race, read)


def _drain(ctx, memcg):
    outcome = ctx.drain_outcome(memcg)
    pages = drain_all_stock(ctx.kernel, memcg, ctx.cpu, outcome, ctx.steps)
    ctx.steps.append(Drain(memcg.path, ctx.cpu, outcome, pages))


def mem_cgroup_resize_max(ctx, memcg, max_pages: int, memsw: bool) -> int:
    """v1: set memory.max or memsw.max → 0, -EINVAL, -EBUSY or -EINTR.

    Never OOMs.  Loops while 1-page reclaims make progress; the first
    failure of set_max drains the stocks instead of reclaiming.  The
    ``set_max_race`` oracle models a charge landing inside set_max.  7.3:
    after a failed set_max, a dying memcg (the ``memcg_dying`` oracle)
    returns its -EBUSY at once.
    """
    counter = memcg.memsw if memsw else memcg.memory
    enlarge = False
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        if ctx.signalled(memcg, "resize"):
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
        ret = _set_max(ctx, memcg, counter, max_pages)
        ctx.steps.append(SetMax(memcg.path, counter.name, max_pages, ret))
        if ret == 0:
            break
        # 7.3: an rmdir under way waits for us; its -EBUSY stands
        if ctx.kernel.profile.limit_dying_break and ctx.is_dying(memcg, "resize"):
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


def _loop_stops(ctx, memcg, where: str, limit: int) -> tuple[bool, int]:
    """The top of a v2 limit loop: (stop?, the usage read).

    Kernel order (7.3.4 mm/memcontrol.c): the limit superseded (6.1.188+,
    6.12.109+, 6.18.50+, 7.2.4+, 7.3: "mm: memcg: stop reclaim when a limit
    update is superseded"), usage within the limit, a signal, the memcg
    dying (7.3)."""
    p = ctx.kernel.profile
    usage = ctx.read_usage(memcg, "memory", where)
    if p.limit_superseded_break and ctx.limit_superseded(memcg, where, limit):
        return True, usage
    if usage <= limit or ctx.signalled(memcg, where):
        return True, usage
    if p.limit_dying_break and ctx.is_dying(memcg, where):
        return True, usage
    return False, usage


def memory_max_write(ctx, memcg, max_pages: int, nonblock: bool = False) -> None:
    """v2 memory.max: set at once (never -EBUSY), then while usage > max:
    stop on a signal; drain once; reclaim ``usage - max`` (may swap) with a
    budget of 16 zero-progress passes; then an ``oom`` event and
    mem_cgroup_out_of_memory(memcg, GFP_KERNEL, 0), stopping if it returns
    false.  6.18+ with O_NONBLOCK stops after setting max.  Where the
    profile has them, each pass also stops when another writer changed
    memory.max (the ``superseded`` oracle) or the memcg is dying (7.3, the
    ``memcg_dying`` oracle)."""
    memcg.memory.max = max_pages
    ctx.steps.append(SetMax(memcg.path, "memory", max_pages, 0))
    if nonblock and ctx.kernel.profile.nonblock_limit_writes:
        return
    nr_reclaims = MAX_RECLAIM_RETRIES
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        stop, usage = _loop_stops(ctx, memcg, "max_write", max_pages)
        if stop:
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
    Never OOMs.  6.18+ with O_NONBLOCK stops after setting high.  The
    superseded and dying breaks as in ``memory_max_write``."""
    memcg.memory.high = high_pages
    if nonblock and ctx.kernel.profile.nonblock_limit_writes:
        return
    retries = MAX_RECLAIM_RETRIES
    drained = False
    for _ in range(MAX_MODEL_PASSES):
        stop, usage = _loop_stops(ctx, memcg, "high_write", high_pages)
        if stop:
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
    finds no retry left or (7.3, user_proactive_reclaim) the memcg is dying
    (the ``memcg_dying`` oracle).  Each call asks for what is still missing
    (later kernels cap the batch; not modelled)."""
    retries = MAX_RECLAIM_RETRIES
    done = 0
    for _ in range(MAX_MODEL_PASSES):
        if done >= nr_to_reclaim:
            break
        if ctx.signalled(memcg, "reclaim_write"):
            return -errno.EINTR
        if ctx.kernel.profile.limit_dying_break and ctx.is_dying(memcg, "reclaim_write"):
            return -errno.EAGAIN
        reclaimed = try_to_free_mem_cgroup_pages(ctx, memcg, nr_to_reclaim - done, GFP.KERNEL,
                                                 True, reason="proactive")
        if not reclaimed:
            if not retries:
                return -errno.EAGAIN
            retries -= 1
        done += reclaimed
    return 0 if done >= nr_to_reclaim else -errno.EAGAIN

