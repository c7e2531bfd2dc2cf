"""The per-cpu charge stock (``memcg_stock_pcp``): consume_stock,
refill_stock, drain_stock, drain_all_stock.

≤ 6.17: one cached memcg and a page count per CPU.  6.18, 7.x:
NR_MEMCG_STOCK = 7 slots per CPU behind a ``local_trylock``, which fails
only when a charge interrupts another on the same CPU; the
``stock_locked(cpu)`` oracle (default: never) lets a caller pick that
interleaving.  Which slot a refill evicts when all are taken (the
profile's ``stock_evict``): 6.18.0–6.18.35 one at random
(``Kernel(evict_slot=)``), 6.18.36+ and 7.x the per-cpu ``drain_idx``,
round robin; 7.3 empties a slot whose pages reach 0
(``stock_release_empty``).
"""

from __future__ import annotations

from .steps import DrainWork, StockDrain

__all__ = ["PerCpuStock", "consume_stock", "refill_stock", "drain_stock",
           "drain_local_stock", "drain_all_stock", "stocked_pages"]


class PerCpuStock:
    __slots__ = ("cpu", "memcgs", "nr_pages", "drain_idx")

    def __init__(self, cpu: int, slots: int):
        self.cpu = cpu
        self.memcgs = [None] * slots
        self.nr_pages = [0] * slots
        #: memcg_stock_pcp.drain_idx (6.18.36+, 7.x): the next slot a full refill evicts
        self.drain_idx = 0

    def slot_of(self, memcg) -> int:
        for i, m in enumerate(self.memcgs):
            if m is memcg:
                return i
        return -1

    def pages_of(self, memcg) -> int:
        i = self.slot_of(memcg)
        return self.nr_pages[i] if i >= 0 else 0


def stocked_pages(kernel, memcg) -> int:
    """Pages of ``memcg`` (itself only) held in all CPUs' stocks."""
    return sum(s.pages_of(memcg) for s in kernel.stocks)


def _trylock_fails(kernel, cpu: int, locked) -> bool:
    """6.18, 7.x: local_trylock(&memcg_stock.lock) failed (``locked``: the
    stock_locked oracle)."""
    return kernel.profile.stock_slots > 1 and locked is not None and bool(locked(cpu))


def consume_stock(kernel, memcg, nr_pages: int, cpu: int, locked=None) -> bool:
    """Take ``nr_pages`` from this CPU's stock if it caches ``memcg`` with
    enough pages.  ``nr_pages > BATCH`` never hits (no slot holds more).
    7.3: a slot left with 0 pages is emptied (css_put, cached[i] = NULL)."""
    if nr_pages > kernel.profile.charge_batch or _trylock_fails(kernel, cpu, locked):
        return False
    stock = kernel.stocks[cpu]
    i = stock.slot_of(memcg)
    if i < 0 or stock.nr_pages[i] < nr_pages:
        return False
    stock.nr_pages[i] -= nr_pages
    if not stock.nr_pages[i] and kernel.profile.stock_release_empty:
        stock.memcgs[i] = None
    return True


def drain_stock(kernel, stock: PerCpuStock, i: int, reason: str, steps) -> int:
    """Give slot ``i`` back: uncharge its pages from memory (and memsw)."""
    memcg, nr = stock.memcgs[i], stock.nr_pages[i]
    if memcg is not None and nr:
        memcg.memory.uncharge(nr)
        if memcg.memsw is not None:
            memcg.memsw.uncharge(nr)
        if steps is not None:
            steps.append(StockDrain(memcg.path, stock.cpu, nr, reason))
    stock.memcgs[i] = None
    stock.nr_pages[i] = 0
    return nr


def _uncharge_direct(kernel, memcg, nr, cpu, steps):
    memcg.memory.uncharge(nr)
    if memcg.memsw is not None:
        memcg.memsw.uncharge(nr)
    if steps is not None:
        steps.append(StockDrain(memcg.path, cpu, nr, "direct"))


def refill_stock(kernel, memcg, nr_pages: int, cpu: int, steps, locked=None) -> None:
    """Put ``nr_pages`` (already charged to the counters) in this CPU's stock.

    ≤ 6.17 (one slot): a different cached memcg is drained first; above
    BATCH the whole stock is drained.
    6.18, 7.x (seven slots): above BATCH or when the trylock fails
    (``locked``: the stock_locked oracle), uncharge directly; a slot already
    holding ``memcg`` grows and is drained alone above BATCH; otherwise the
    first empty slot is used, or a full stock drains and reuses one:
    6.18.0–6.18.35 at random (``kernel.evict_slot``), 6.18.36+ and 7.x
    ``drain_idx``, which then moves on to the next slot (round robin).
    """
    batch = kernel.profile.charge_batch
    stock = kernel.stocks[cpu]
    if kernel.profile.stock_slots == 1:
        if stock.memcgs[0] is not memcg:
            drain_stock(kernel, stock, 0, "refill", steps)
            stock.memcgs[0] = memcg
        stock.nr_pages[0] += nr_pages
        if stock.nr_pages[0] > batch:
            drain_stock(kernel, stock, 0, "overflow", steps)
        return
    if nr_pages > batch or _trylock_fails(kernel, cpu, locked):
        _uncharge_direct(kernel, memcg, nr_pages, cpu, steps)
        return
    i = stock.slot_of(memcg)
    if i >= 0:
        stock.nr_pages[i] += nr_pages
        if stock.nr_pages[i] > batch:
            drain_stock(kernel, stock, i, "overflow", steps)
        return
    empty = [j for j, m in enumerate(stock.memcgs) if m is None]
    if empty:
        i = empty[0]
    else:
        if kernel.profile.stock_evict == "round_robin":     # 6.18.36+, 7.x
            i = stock.drain_idx
            stock.drain_idx = (i + 1) % len(stock.memcgs)
        else:                                               # 6.18.0–6.18.35
            i = kernel.evict_slot(cpu, len(stock.memcgs))
        drain_stock(kernel, stock, i, "evict", steps)
    stock.memcgs[i] = memcg
    stock.nr_pages[i] = nr_pages


def drain_local_stock(kernel, cpu: int, reason: str, steps) -> int:
    stock = kernel.stocks[cpu]
    return sum(drain_stock(kernel, stock, i, reason, steps) for i in range(len(stock.memcgs)))


def _needs_drain(stock: PerCpuStock, root) -> bool:
    return any(m is not None and n and m.is_descendant(root)
               for m, n in zip(stock.memcgs, stock.nr_pages))


def drain_all_stock(kernel, root, cpu: int, outcome: str, steps) -> int:
    """drain_all_stock(root) run on ``cpu``.

    CPUs whose stock caches a descendant of ``root`` are drained: this CPU
    at once, the others by a work item.  ``outcome`` is the interleaving:
    ``all`` (the work ran before the caller's next check), ``local`` (it
    runs after the current operation: ``kernel.pending_drains``) or
    ``skipped`` (percpu_charge_mutex was held by another drain: nothing).
    A CPU whose work is still pending (FLUSHING_CACHED_CHARGE) is skipped.
    Returns the pages given back now.
    """
    if outcome == "skipped":
        return 0
    pages = 0
    for stock in kernel.stocks:
        if stock.cpu in kernel.pending_drains or not _needs_drain(stock, root):
            continue
        if stock.cpu == cpu or outcome == "all":
            pages += drain_local_stock(kernel, stock.cpu, "drain_all", steps)
        else:
            kernel.pending_drains.add(stock.cpu)
    return pages


def run_pending_drains(kernel, steps) -> None:
    """The scheduled drain works run (after the operation that queued them)."""
    if not kernel.pending_drains:
        return
    for cpu in sorted(kernel.pending_drains):
        n = drain_local_stock(kernel, cpu, "drain_all", None)
        if steps is not None:
            steps.append(DrainWork(cpu, n))
    kernel.pending_drains.clear()
