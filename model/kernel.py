"""``Kernel``: the model's user-visible interface.

    k = Kernel("6.1", cgroup="v1", cpus=2)
    a = k.mkdir("a")
    k.write(a, "memory.limit_in_bytes", "30M")       # 0 or -errno
    k.read(a, "memory.failcnt")                      # "0\\n"
    r = k.charge(a, nr_pages=1, gfp=GFP.KERNEL, cpu=0, reclaim=oracle)
    r.ret, r.steps

Every call runs to completion on one CPU; the other CPUs only show up
through their stocks.  Where the kernel allows several interleavings, or
the world decides (reclaim, OOM, signals, other CPUs' charges), the caller
picks one with the oracles (context.py, model/README.md).
"""

from __future__ import annotations

import errno
import random

from . import cgroupfs
from .charge import mem_cgroup_handle_over_high, try_charge_memcg
from .context import Ctx, Task
from .gfp import GFP
from .memcg import MemCgroup
from .profiles import Profile, get_profile
from .steps import ChargeResult, LimitResult, WriteResult
from .stock import PerCpuStock, run_pending_drains, stocked_pages
from .vmscan import uncharge_pages

__all__ = ["Kernel"]


class Kernel:
    """One machine: a profile, a cgroup hierarchy and ``cpus`` per-cpu stocks.

    ``swap_account`` (v1): memsw counters and files exist (the usual
    default).  ``memory_localevents`` (v2 mount option): events do not
    propagate upward.  ``hz``: CONFIG_HZ, for memory.high throttling.
    ``evict_slot(cpu, nslots) -> index``: which 6.18 stock slot a refill
    evicts when all are taken (the kernel picks at random; default: a
    seeded RNG); refused where the profile evicts round robin (6.18.36+,
    7.x: ``drain_idx``, no choice to make) or has one slot.
    """

    def __init__(self, profile: str | Profile, cgroup: str = "v2", cpus: int = 1, *,
                 swap_account: bool = True, memory_localevents: bool = False,
                 hz: int = 250, seed: int = 0, evict_slot=None):
        self.profile = get_profile(profile)
        if cgroup not in ("v1", "v2"):
            raise ValueError(f"cgroup must be 'v1' or 'v2', not {cgroup!r}")
        if not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"cpus must be a positive integer, not {cpus!r}")
        self.cgroup = cgroup
        self.cpus = cpus
        self.swap_account = swap_account
        self.memory_localevents = memory_localevents
        self.hz = hz
        self._rng = random.Random(seed)
        if evict_slot is not None and self.profile.stock_evict != "random":
            raise ValueError(f"evict_slot: profile {self.profile.name} does not evict a stock slot "
                             f"at random ({self.profile.stock_evict or 'one slot'})")
        self.evict_slot = evict_slot or (lambda cpu, n: self._rng.randrange(n))
        self.stocks = [PerCpuStock(c, self.profile.stock_slots) for c in range(cpus)]
        self.pending_drains: set[int] = set()
        self.oom_waiters: list[Task] = []
        self.oom_wakeups = 0
        self.task = Task()
        self.root = MemCgroup(self, "", None)
        self._cgroups = {"/": self.root}

    # -- hierarchy -----------------------------------------------------------------

    def mkdir(self, path: str) -> MemCgroup:
        """Create cgroup ``path`` ("a", "a/b", "/a/b"); its parent must exist."""
        norm = "/" + "/".join(x for x in path.split("/") if x)
        if norm == "/" or norm in self._cgroups:
            raise FileExistsError(errno.EEXIST, f"cgroup {norm} exists")
        parent_path, _, name = norm.rpartition("/")
        parent = self._cgroups.get(parent_path or "/")
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, f"parent of {norm} does not exist")
        m = MemCgroup(self, name, parent)
        parent.children.append(m)
        self._cgroups[norm] = m
        return m

    def cgroup_at(self, path: str) -> MemCgroup:
        norm = "/" + "/".join(x for x in path.split("/") if x)
        try:
            return self._cgroups[norm]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, f"no cgroup {norm}") from None

    @property
    def cgroups(self) -> list[MemCgroup]:
        return list(self.root.subtree())

    # -- tasks ---------------------------------------------------------------------

    def set_task_flags(self, *, pf_memalloc=None, dying=None, in_user_fault=None,
                       signal_pending=None, oom_reaped=None) -> Task:
        """Set flags of the default task (the one charges use without ``task=``)."""
        for name, value in (("pf_memalloc", pf_memalloc), ("dying", dying),
                            ("in_user_fault", in_user_fault),
                            ("signal_pending", signal_pending), ("oom_reaped", oom_reaped)):
            if value is not None:
                setattr(self.task, name, bool(value))
        return self.task

    def end_fault(self, task: Task | None = None) -> None:
        """mem_cgroup_oom_synchronize(false): the fault ends, a recorded
        memcg_in_oom (v1 oom_kill_disable) is dropped."""
        task = task or self.task
        if task.memcg_in_oom is not None:
            task.memcg_in_oom = None
            self.oom_waiters = [t for t in self.oom_waiters if t is not task]

    def under_oom(self, memcg) -> bool:
        """memcg->under_oom: a task waits on an OOM of it or of an ancestor
        (mem_cgroup_mark_under_oom marks the whole subtree)."""
        return any(t.memcg_in_oom is not None and memcg.is_descendant(t.memcg_in_oom)
                   for t in self.oom_waiters)

    def memcg_oom_recover(self, memcg) -> None:
        """Wake the tasks waiting on an OOM of ``memcg`` if it is under OOM
        (they retry their fault; the model leaves that to the caller)."""
        if self.under_oom(memcg):
            self.oom_wakeups += 1

    # -- the charge path -----------------------------------------------------------

    def _ctx(self, cpu, task, reclaim, oom, drain, moving=None, **oracles):
        if not 0 <= cpu < self.cpus:
            raise ValueError(f"cpu {cpu} out of range 0..{self.cpus - 1}")
        return Ctx(self, task or self.task, cpu, reclaim, oom, drain, moving, **oracles)

    def charge(self, handle: MemCgroup, nr_pages: int, gfp: int = GFP.KERNEL, cpu: int = 0,
               reclaim=None, *, task: Task | None = None, oom=None, drain=None,
               moving=None, attempt=None, usage=None, signal=None,
               stock_locked=None) -> ChargeResult:
        """try_charge_memcg(handle, gfp, nr_pages) on ``cpu``.  The keyword
        oracles are described in model/README.md."""
        if nr_pages < 1:
            raise ValueError(f"nr_pages must be ≥ 1, not {nr_pages}")
        ctx = self._ctx(cpu, task, reclaim, oom, drain, moving, attempt=attempt, usage=usage,
                        signal=signal, stock_locked=stock_locked)
        ret = try_charge_memcg(ctx, handle, gfp, nr_pages)
        run_pending_drains(self, ctx.steps)
        return ChargeResult(ret, ctx.steps)

    def uncharge(self, handle: MemCgroup, nr_pages: int, cpu: int = 0) -> None:
        """Pages charged to ``handle`` are freed (mem_cgroup_uncharge): the
        counters drop at once, the stock is not involved.  Raises
        ValueError if no earlier charge matches."""
        uncharge_pages(handle, nr_pages)

    def swap_out(self, handle: MemCgroup, nr_pages: int) -> None:
        """Charged pages move to swap (v1: memsw keeps them; v2: swap counter)."""
        uncharge_pages(handle, nr_pages, swapped=nr_pages)

    def swap_free(self, handle: MemCgroup, nr_pages: int) -> None:
        """Swap entries of ``handle`` are freed."""
        if nr_pages > handle.swapped:
            raise ValueError(f"{handle.path} has only {handle.swapped} pages in swap")
        handle.swapped -= nr_pages
        if handle.is_root:
            return
        if handle.memsw is not None:
            handle.memsw.uncharge(nr_pages)
        if handle.swap is not None:
            handle.swap.uncharge(nr_pages)

    def return_to_user(self, handle: MemCgroup, reclaim=None, *, task: Task | None = None,
                       drain=None, signal=None) -> ChargeResult:
        """The task returns to user space: mem_cgroup_handle_over_high(GFP_KERNEL)."""
        ctx = self._ctx(0, task, reclaim, None, drain, signal=signal)
        mem_cgroup_handle_over_high(ctx, handle, GFP.KERNEL)
        return ChargeResult(0, ctx.steps)

    # -- cgroupfs ------------------------------------------------------------------

    def files(self, handle: MemCgroup) -> list[str]:
        return cgroupfs.files_of(self, handle)

    def read(self, handle: MemCgroup, filename: str) -> str:
        """The text the kernel prints; FileNotFoundError for a file this
        cgroup does not have, PermissionError for a write-only file."""
        return cgroupfs.read_file(self, handle, filename)

    def write(self, handle: MemCgroup, filename: str, text: str, *, reclaim=None,
              signal_pending: bool = False, nonblock: bool = False, oom=None, drain=None,
              cpu: int = 0, task: Task | None = None, usage=None, set_max_race=None,
              signal=None, superseded=None, memcg_dying=None) -> int:
        """write(2) to a control file → 0 or -errno.  ``reclaim`` is the
        oracle for the reclaim a limit write does (default: frees nothing);
        ``signal_pending`` a signal pending in every pass of the write's
        loop (the ``signal`` oracle picks the pass instead);
        ``nonblock`` O_NONBLOCK (6.18 memory.max/high).  The other keyword
        oracles are described in model/README.md."""
        return self.write_ex(handle, filename, text, reclaim=reclaim,
                             signal_pending=signal_pending, nonblock=nonblock, oom=oom,
                             drain=drain, cpu=cpu, task=task, usage=usage,
                             set_max_race=set_max_race, signal=signal, superseded=superseded,
                             memcg_dying=memcg_dying).ret

    def write_ex(self, handle, filename, text, *, reclaim=None, signal_pending=False,
                 nonblock=False, oom=None, drain=None, cpu=0, task=None, usage=None,
                 set_max_race=None, signal=None, superseded=None,
                 memcg_dying=None) -> WriteResult:
        """Like ``write`` but returns the steps too."""
        writer = Task(signal_pending=signal_pending, in_user_fault=False) if task is None else task
        ctx = self._ctx(cpu, writer, reclaim, oom, drain, usage=usage,
                        set_max_race=set_max_race, signal=signal, superseded=superseded,
                        memcg_dying=memcg_dying)
        ret = cgroupfs.write_file(ctx, handle, filename, text, nonblock)
        run_pending_drains(self, ctx.steps)
        ctx.steps.append(LimitResult(handle.path, filename, ret))
        return WriteResult(ret, ctx.steps)

    def snapshot(self) -> dict[str, dict[str, str]]:
        """Every readable file of every cgroup: {path: {file: text}}."""
        out = {}
        for m in self.root.subtree():
            files = {}
            for name in self.files(m):
                try:
                    files[name] = self.read(m, name)
                except PermissionError:
                    continue
            out[m.path] = files
        return out

    # -- introspection (for tests and the cross-checker) ---------------------------

    def stocked(self, handle: MemCgroup) -> int:
        """Pages of ``handle`` held in all CPUs' stocks."""
        return stocked_pages(self, handle)

    def stock_of(self, cpu: int) -> list[tuple[str, int]]:
        s = self.stocks[cpu]
        return [(m.path, n) for m, n in zip(s.memcgs, s.nr_pages) if m is not None]
