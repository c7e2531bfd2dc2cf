"""``struct mem_cgroup``: the counters and event counts of one cgroup,
``memcg_memory_event`` and ``mem_cgroup_margin``."""

from __future__ import annotations

from .page_counter import PAGE_COUNTER_MAX, PageCounter

__all__ = ["MemCgroup", "memcg_memory_event", "mem_cgroup_margin", "SWAP_EVENTS"]

#: memory.swap.events keys, and their names in memory_events[]
SWAP_EVENTS = {"swap_high": "high", "swap_max": "max", "swap_fail": "fail"}


class MemCgroup:
    """One memory cgroup; also the handle ``Kernel.mkdir`` returns.

    ``memory`` always; ``memsw`` on v1 with swap accounting; ``swap`` on v2.
    ``charged`` counts the pages charged to this cgroup itself and not yet
    uncharged (the stock is counted apart, per CPU), ``swapped`` the pages
    of this cgroup that sit in swap.
    """

    def __init__(self, kernel, name: str, parent: MemCgroup | None):
        p = kernel.profile
        self.kernel = kernel
        self.name = name
        self.parent = parent
        self.children: list[MemCgroup] = []
        self.path = "/" if parent is None else (
            f"/{name}" if parent.parent is None else f"{parent.path}/{name}")
        opts = dict(has_local_watermark=p.local_watermark, clamps=p.uncharge_clamps,
                    set_max_enlarge_ok=p.set_max_enlarge_ok)

        def counter(name, track):
            up = getattr(parent, name) if parent is not None else None
            return PageCounter(name, self, up, track_failcnt=track, **opts)

        v1 = kernel.cgroup == "v1"
        # mem_cgroup_css_alloc: ≤ 6.14 every counter counts failures; from
        # 6.15 only the v1 counters of the profile's failcnt_counters
        # (memory; memsw too from 6.18.50, 7.2.4, 7.3), none on v2
        tracked = p.failcnt_counters

        def tracks(name):
            return tracked is None or (v1 and name in tracked)
        self.memory = counter("memory", tracks("memory"))
        self.memsw = counter("memsw", tracks("memsw")) if (v1 and kernel.swap_account) else None
        self.swap = counter("swap", tracks("swap")) if not v1 else None
        self.soft_limit = PAGE_COUNTER_MAX
        self.oom_kill_disable = False
        self.under_oom = 0
        self.memory_events = {}
        self.memory_events_local = {}
        self.charged = 0
        self.swapped = 0
        self.peak_fd_reset = False
        self.swap_peak_fd_reset = False
        self.removed = False

    def __repr__(self):
        return f"<MemCgroup {self.path}>"

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def ancestors(self):
        """self, parent, …, root."""
        m = self
        while m is not None:
            yield m
            m = m.parent

    def subtree(self):
        """Pre-order: self, then each child's subtree."""
        yield self
        for c in self.children:
            yield from c.subtree()

    def is_descendant(self, root: MemCgroup) -> bool:
        """mem_cgroup_is_descendant(self, root)."""
        return any(m is root for m in self.ancestors())

    def event(self, name: str, local: bool = False) -> int:
        return (self.memory_events_local if local else self.memory_events).get(name, 0)


def memcg_memory_event(memcg: MemCgroup, event: str) -> None:
    """Local count on ``memcg``; hierarchical count on it and, on v2, every
    ancestor below the root unless mounted with memory_localevents.  v1
    never propagates upward."""
    k = memcg.kernel
    memcg.memory_events_local[event] = memcg.memory_events_local.get(event, 0) + 1
    m = memcg
    while True:
        m.memory_events[event] = m.memory_events.get(event, 0) + 1
        if k.cgroup == "v1" or k.memory_localevents:
            break
        m = m.parent
        if m is None or m.is_root:
            break


def mem_cgroup_margin(memcg: MemCgroup, ctx=None, where: str = "") -> int:
    """Pages chargeable before ``memcg``'s own limits (memsw too on v1 with
    swap accounting).  Only this level: ancestors are not looked at.  With
    ``ctx``, the usage reads are the ``usage`` oracle's at ``where``."""
    if ctx is None or ctx.usage is None:
        count = memcg.memory.usage
    else:
        count = ctx.read_usage(memcg, "memory", where)
    limit = memcg.memory.max
    margin = limit - count if count < limit else 0
    if memcg.memsw is not None:
        if ctx is None or ctx.usage is None:
            count = memcg.memsw.usage
        else:
            count = ctx.read_usage(memcg, "memsw", where)
        limit = memcg.memsw.max
        margin = min(margin, limit - count) if count < limit else 0
    return margin
