"""Layer 2: an approximate world around the exact charge path.

Reclaimable pools per cgroup (page cache, always reclaimable; anon, only
reclaimable when there is swap and the reclaim may swap), tasks that charge
page by page as they touch memory, and an OOM killer that picks the biggest
task inside the cgroup that is over its limit.  It answers the model's
``reclaim`` and ``oom`` oracles, so a whole workload runs on its own:

    env = Environment(Kernel("6.1", cgroup="v2"), swap_pages=0)
    a = env.kernel.mkdir("a"); env.kernel.write(a, "memory.max", "30M")
    env.spawn("t", a); env.touch("t", anon=mib(100))     # → one OOM kill

What it does not try to be: LRU order, dirty/writeback pages, refaults,
reclaim overshoot, kswapd, slab.  Reclaim frees exactly what it is asked
for (max(nr, SWAP_CLUSTER_MAX) pages), page cache first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .context import OomOutcome, ReclaimResult, Task
from .gfp import GFP
from .page_counter import PAGE_SIZE
from .vmscan import SWAP_CLUSTER_MAX

#: pages in a PMD-mapped huge page (x86-64, 4 KiB pages)
HPAGE_PMD_NR = 512

__all__ = ["Environment", "SimTask", "TouchResult", "mib"]


_PLAIN_CHARGE = {"counter_charge", "restock", "stock_drain", "high_over"}


def mib(n: float) -> int:
    """Pages in ``n`` MiB."""
    return int(n * (1 << 20)) // PAGE_SIZE


@dataclass
class SimTask:
    name: str
    pid: int
    cgroup: object
    anon: int = 0
    swapped: int = 0
    alive: bool = True
    waiting_oom: bool = False
    task: Task = field(default_factory=Task)

    @property
    def badness(self) -> int:
        # oom_badness: rss + swap entries (page tables left out)
        return self.anon + self.swapped


@dataclass
class TouchResult:
    """What a touch did: pages charged, every slow-path charge result, the
    tasks killed, and how it ended: ``done``, ``killed`` (the toucher
    died), ``dying`` (a dying toucher's fault failed), ``stuck`` (its faults kept failing), ``oom_wait`` (v1
    oom_kill_disable: it sleeps in mem_cgroup_oom_synchronize)."""
    anon: int = 0
    file: int = 0
    charges: int = 0
    stock_hits: int = 0
    stock_misses: int = 0   # counters charged without trouble
    slow: list = field(default_factory=list)  # results of charges that hit a limit
    killed: list = field(default_factory=list)
    end: str = "done"

    @property
    def reclaims(self) -> int:
        return sum(len(r.of("reclaim")) for r in self.slow)


class Environment:
    def __init__(self, kernel, swap_pages: int = 0):
        self.kernel = kernel
        self.swap_free_pages = swap_pages
        self.tasks: dict[str, SimTask] = {}
        self.file: dict = {}    # cgroup -> page-cache pages charged to it
        self.other: dict = {}   # cgroup -> unreclaimable pages charged by raw charges
        self._next_pid = 100
        self.kills: list[str] = []

    # -- tasks ---------------------------------------------------------------------

    def spawn(self, name: str, cgroup) -> SimTask:
        if name in self.tasks and self.tasks[name].alive:
            raise ValueError(f"task {name!r} already exists")
        self._next_pid += 1
        t = SimTask(name, self._next_pid, cgroup)
        self.tasks[name] = t
        return t

    def task(self, name: str) -> SimTask:
        try:
            return self.tasks[name]
        except KeyError:
            raise KeyError(f"no task {name!r}; spawn it first") from None

    def exit(self, name: str) -> None:
        """The task exits: its anon pages and swap entries are freed; its
        page cache stays charged to the cgroup."""
        t = self.task(name)
        self._free_task(t)
        t.alive = False

    def _free_task(self, t: SimTask) -> int:
        freed = t.anon
        if t.anon:
            self.kernel.uncharge(t.cgroup, t.anon)
        if t.swapped:
            self.kernel.swap_free(t.cgroup, t.swapped)
            self.swap_free_pages += t.swapped
        t.anon = t.swapped = 0
        return freed

    # -- oracles -------------------------------------------------------------------

    def _swap_room(self, m) -> int:
        room = self.swap_free_pages
        if self.kernel.cgroup == "v2":
            for a in m.ancestors():
                if a.swap is not None:
                    room = min(room, max(0, a.swap.max - a.swap.usage))
        return room

    def reclaim(self, target, nr_pages: int, gfp: int, may_swap: bool = True) -> ReclaimResult:
        """try_to_free_mem_cgroup_pages: page cache first, then anon to swap."""
        want = max(nr_pages, SWAP_CLUSTER_MAX)
        by, swapped_by = {}, {}
        for m in target.subtree():
            take = min(want, self.file.get(m, 0))
            if take:
                self.file[m] -= take
                by[m] = by.get(m, 0) + take
                want -= take
        if want and may_swap:
            for t in self.tasks.values():
                if not want:
                    break
                if not t.alive or not t.cgroup.is_descendant(target):
                    continue
                take = min(want, t.anon, self._swap_room(t.cgroup))
                if take:
                    t.anon -= take
                    t.swapped += take
                    self.swap_free_pages -= take
                    by[t.cgroup] = by.get(t.cgroup, 0) + take
                    swapped_by[t.cgroup] = swapped_by.get(t.cgroup, 0) + take
                    want -= take
        freed = sum(by.values())
        return ReclaimResult(freed, sum(swapped_by.values()), by, swapped_by)

    def oom(self, target, order: int, gfp: int) -> OomOutcome:
        """out_of_memory() for a memcg OOM: kill the biggest task in ``target``."""
        victims = [t for t in self.tasks.values()
                   if t.alive and t.cgroup.is_descendant(target)]
        if not victims:
            return OomOutcome(False)
        victim = max(victims, key=lambda t: (t.badness, -t.pid))
        victim.alive = False
        victim.task.dying = True
        self.kills.append(victim.name)
        freed = victim.anon
        victim.anon = 0
        if victim.swapped:
            self.kernel.swap_free(victim.cgroup, victim.swapped)
            self.swap_free_pages += victim.swapped
            victim.swapped = 0
        return OomOutcome(True, victim=victim.cgroup, freed=freed)

    # -- workload ------------------------------------------------------------------

    def touch(self, name: str, anon: int = 0, file: int = 0, gfp: int | None = None,
              cpu: int = 0, max_fault_retries: int = 8, huge: int = 0) -> TouchResult:
        """The task touches ``anon`` new anon pages then ``file`` page-cache
        pages, one fault (one 1-page charge) each; memory.high debt is paid
        on each return to user space.  A failed charge makes
        the fault retry (pagefault_out_of_memory), up to
        ``max_fault_retries`` times in a row.

        ``huge``: then as many anon pages in 2 MiB-aligned ranges of a
        VMA with THP (enabled "always", defrag not "always"): the first
        fault of each range charges HPAGE_PMD_NR pages with
        GFP_TRANSHUGE_LIGHT (do_huge_pmd_anonymous_page ->
        mem_cgroup_charge), which has no reclaim bits; if that fails the
        range's faults fall back to small pages (do_anonymous_page)."""
        t = self.task(name)
        gfp = GFP.HIGHUSER_MOVABLE if gfp is None else gfp
        res = TouchResult()
        killed_before = len(self.kills)
        plan = [("anon", anon), ("file", file)]
        while huge > 0:
            plan.append(("huge", min(huge, HPAGE_PMD_NR)))
            huge -= HPAGE_PMD_NR
        for kind, count in plan:
            done = 0
            failures = 0
            if kind == "huge":
                if res.end != "done" or not t.alive:
                    res.end = "killed" if not t.alive else res.end
                    break
                light = GFP.for_profile(self.kernel.profile).TRANSHUGE_LIGHT
                r = self.kernel.charge(t.cgroup, HPAGE_PMD_NR, light, cpu, reclaim=self.reclaim, task=t.task,
                                       oom=self.oom)
                res.charges += 1
                if r.ret == 0:
                    res.stock_misses += 1
                    t.anon += HPAGE_PMD_NR
                    res.anon += HPAGE_PMD_NR
                    continue
                res.slow.append(r)
                kind = "anon"          # the fallback: small pages for what is touched
            while done < count:
                if not t.alive:
                    res.end = "killed"
                    break
                r = self.kernel.charge(t.cgroup, 1, gfp, cpu, reclaim=self.reclaim,
                                       task=t.task, oom=self.oom)
                res.charges += 1
                kinds = {s.kind for s in r.steps}
                if kinds == {"stock_hit"}:
                    res.stock_hits += 1
                elif r.ret == 0 and kinds <= _PLAIN_CHARGE:
                    res.stock_misses += 1
                else:
                    res.slow.append(r)
                if t.task.memcg_nr_pages_over_high:
                    # set_notify_resume: the high debt is paid on the way back
                    # to user space after this fault
                    res.slow.append(self.kernel.return_to_user(t.cgroup, self.reclaim,
                                                               task=t.task))
                if r.ret == 0:
                    failures = 0
                    if not t.alive:
                        # killed while charging: the page goes with the task
                        self.kernel.uncharge(t.cgroup, 1)
                        res.end = "killed"
                        break
                    if kind == "anon":
                        t.anon += 1
                        res.anon += 1
                    else:
                        self.file[t.cgroup] = self.file.get(t.cgroup, 0) + 1
                        res.file += 1
                    done += 1
                    continue
                if t.task.memcg_in_oom is not None:
                    t.waiting_oom = True
                    res.end = "oom_wait"
                    break
                if t.task.dying:
                    # the fault fails and the task dies on its way out
                    res.end = "dying"
                    break
                failures += 1
                if failures > max_fault_retries:
                    res.end = "stuck"
                    break
            if res.end != "done":
                break
        res.killed = self.kills[killed_before:]
        return res

    def charge(self, cgroup, nr_pages: int, gfp: int = GFP.KERNEL, cpu: int = 0, *,
               reclaim=None, oom=None, **kw):
        """A raw charge (kernel memory, say): unreclaimable in this world."""
        r = self.kernel.charge(cgroup, nr_pages, gfp, cpu, reclaim=reclaim or self.reclaim,
                               oom=oom or self.oom, **kw)
        if r.ret == 0:
            self.other[cgroup] = self.other.get(cgroup, 0) + nr_pages
        return r

    def take_exact(self, target, nr_pages: int) -> ReclaimResult:
        """A reclaim whose outcome the caller fixed (a scenario's list): take
        ``nr_pages`` from the target's pools – page cache, then raw charges,
        then anon (dropped, not swapped) – or as many as there are."""
        want, by = nr_pages, {}
        for m in target.subtree():
            for pool in (self.file, self.other):
                take = min(want, pool.get(m, 0))
                if take:
                    pool[m] -= take
                    by[m] = by.get(m, 0) + take
                    want -= take
        for t in self.tasks.values():
            if want and t.alive and t.cgroup.is_descendant(target):
                take = min(want, t.anon)
                if take:
                    t.anon -= take
                    by[t.cgroup] = by.get(t.cgroup, 0) + take
                    want -= take
        return ReclaimResult(nr_pages - want, 0, by)

    def uncharge(self, cgroup, nr_pages: int) -> None:
        have = self.other.get(cgroup, 0)
        if nr_pages > have:
            raise ValueError(f"{cgroup.path}: uncharge of {nr_pages} pages, "
                             f"only {have} raw-charged")
        self.kernel.uncharge(cgroup, nr_pages)
        self.other[cgroup] = have - nr_pages
