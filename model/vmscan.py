"""``try_to_free_mem_cgroup_pages``: where the model meets the reclaim oracle.

The model does not reclaim; it asks the oracle how many pages a call freed
and uncharges them.  A freed page leaves ``memory`` (and, on v1, ``memsw``
unless it went to swap: a swapped page keeps its memsw charge); on v2 a
swapped page moves to the ``swap`` counter.
"""

from __future__ import annotations

from .context import ReclaimResult
from .gfp import reclaim_gfp
from .steps import Reclaim

__all__ = ["SWAP_CLUSTER_MAX", "try_to_free_mem_cgroup_pages", "uncharge_pages"]

SWAP_CLUSTER_MAX = 32
MEMCG_RECLAIM_MAY_SWAP = 1 << 1
MEMCG_RECLAIM_PROACTIVE = 1 << 2


def uncharge_pages(memcg, nr: int, swapped: int = 0) -> None:
    """Pages of ``memcg`` leave memory; ``swapped`` of them go to swap."""
    if nr > memcg.charged:
        raise ValueError(f"uncharge of {nr} pages from {memcg.path}, which holds only "
                         f"{memcg.charged}: no earlier charge matches")
    memcg.charged -= nr
    if memcg.is_root:
        # the root bypasses the counters (try_charge returns early)
        memcg.swapped += swapped
        return
    memcg.memory.uncharge(nr)
    if memcg.memsw is not None and nr - swapped:
        memcg.memsw.uncharge(nr - swapped)
    if memcg.swap is not None and swapped:
        memcg.swap.charge(swapped)
    memcg.swapped += swapped


def _distribute(target, freed: int) -> dict:
    left, out = freed, {}
    for m in target.subtree():
        if left <= 0:
            break
        take = min(left, m.charged)
        if take:
            out[m] = take
            left -= take
    return out


def try_to_free_mem_cgroup_pages(ctx, memcg, nr_pages: int, gfp: int, may_swap: bool,
                                 reason: str = "charge") -> int:
    """Ask the oracle, uncharge what it freed, record a ``reclaim`` step and
    return the number of pages freed (the kernel's return value)."""
    answer = ctx.call_reclaim(memcg, nr_pages, gfp, may_swap)
    if isinstance(answer, ReclaimResult):
        res = answer
    else:
        if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
            raise ValueError(f"reclaim oracle returned {answer!r}; expected pages freed (int ≥ 0)")
        res = ReclaimResult(freed=answer)
    if res.swapped and not may_swap:
        raise ValueError("reclaim oracle swapped pages in a reclaim that may not swap")
    if res.by_cgroup is not None:
        plan = {m: n for m, n in res.by_cgroup.items() if n}
        for m in plan:
            if not m.is_descendant(memcg):
                raise ValueError(f"reclaim from {memcg.path} freed pages of {m.path}, outside it")
    else:
        plan = _distribute(memcg, res.freed)
    if res.swapped_by_cgroup is not None:
        swap_plan = dict(res.swapped_by_cgroup)
    else:
        swap_plan, left = {}, res.swapped
        for m, n in plan.items():
            s = min(left, n)
            if s:
                swap_plan[m] = s
                left -= s
    uncharged = 0
    for m, n in plan.items():
        uncharge_pages(m, n, swap_plan.get(m, 0))
        uncharged += n
    options = None
    if ctx.kernel.profile.reclaim_signature != "may_swap":   # ≥ 6.1
        options = ((MEMCG_RECLAIM_MAY_SWAP if may_swap else 0)
                   | (MEMCG_RECLAIM_PROACTIVE if reason == "proactive" else 0))
    ctx.steps.append(Reclaim(memcg.path, nr_pages, gfp, may_swap, res.freed,
                             max(nr_pages, SWAP_CLUSTER_MAX), reclaim_gfp(gfp), reason,
                             uncharged, options))
    return res.freed
