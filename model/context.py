"""What a call into the model carries: the task, the CPU, the oracles that
stand in for the world, and the steps recorded so far.

Every decision the world makes for the kernel is an oracle (all optional;
model/README.md lists them with the kernel function that asks each one):

* ``reclaim(target, nr_pages, gfp) -> freed`` – how many pages a
  ``try_to_free_mem_cgroup_pages`` call freed.  It may also accept a
  ``may_swap`` keyword, and may return a ``ReclaimResult`` saying which
  cgroups the pages came from and how many went to swap.  Default: 0.
* ``oom(target, order, gfp) -> bool | OomOutcome`` – what ``out_of_memory()``
  did.  Default: False (no killable task: layer 1 knows no tasks).
* ``drain(target, cpu) -> "all" | "local" | "skipped" | bool`` – which
  interleaving of ``drain_all_stock`` happened (True = all, False = local).
  Default: "all".
* ``moving(over) -> bool`` – a v1 charge move involves ``over``
  (mem_cgroup_wait_acct_move, ≤ 6.12).  Default: False.
* ``attempt(memcg, counter, nr_pages) -> None | True | handle`` – how a
  ``page_counter_try_charge`` went: other CPUs charge and uncharge between
  any two steps, so it may pass or fail at any level whatever the model's
  counts say.  None: the model's arithmetic decides (the default).
* ``usage(memcg, counter, where) -> None | pages`` – what a
  ``page_counter_read`` the kernel decides on returns (``USAGE_POINTS``).
  None: the model's own count (the default).
* ``set_max_race(memcg, counter) -> pages`` – pages other CPUs charged
  inside ``page_counter_set_max``, between the new max and the re-read.
  Default: 0.
* ``signal(memcg, where) -> bool`` – a signal is pending (or, at the
  dying points, fatal; at ``oom_skip``, the task is an OOM victim whose mm
  the OOM reaper marked MMF_OOM_SKIP) where the kernel tests for one
  (``SIGNAL_POINTS``).  Default: the task's ``signal_pending``, ``dying``
  or ``oom_reaped`` field.
* ``superseded(memcg, where) -> bool`` – another writer changed the limit
  a v2 limit loop is enforcing (``max != READ_ONCE(memcg->memory.max)``;
  ``SUPERSEDED_POINTS``).  Default: the model's own limit differs (never,
  within one call).
* ``memcg_dying(memcg, where) -> bool`` – ``memcg_is_dying(memcg)``: an
  rmdir of the cgroup is under way (``DYING_POINTS``).  Default: False.
* ``stock_locked(cpu) -> bool`` – 6.18 and later: ``local_trylock`` of the
  per-cpu stock failed (the charge interrupted another on that CPU).
  Default: False.

An exception an oracle raises propagates out of the call unchanged (the
kernel state is then whatever the call had done so far): a caller that
checks an observation can stop a call at the first disagreement.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

__all__ = ["Task", "ReclaimResult", "OomOutcome", "Ctx", "SIGNAL_POINTS", "USAGE_POINTS",
           "SUPERSEDED_POINTS", "DYING_POINTS"]

#: Where the kernel tests the current task for a signal, and the ``Task``
#: field that answers when no ``signal`` oracle is given.
SIGNAL_POINTS = {
    # 5.10.0–5.10.79 mm/memcontrol.c try_charge(): should_force_charge()
    # (OOM victim, fatal signal or exiting) → force, before any reclaim
    "force_dying": "dying",
    # ≥ 5.10.80 try_charge() / try_charge_memcg(): after an OOM,
    # passed_oom && task_is_dying() → nomem
    "passed_oom": "dying",
    # ≤ 6.14 mem_cgroup_out_of_memory(): task_is_dying() || out_of_memory()
    # (5.10.0–5.10.79: should_force_charge() || out_of_memory())
    "oom_dying": "dying",
    # v1 mem_cgroup_resize_max(): signal_pending() → -EINTR, each pass
    "resize": "signal_pending",
    # v2 memory_max_write() / memory_high_write(): signal_pending() → stop, each pass
    "max_write": "signal_pending",
    "high_write": "signal_pending",
    # v2 memory_reclaim(): signal_pending() → -EINTR, each pass
    "reclaim_write": "signal_pending",
    # 6.12.117+, 7.2, 7.3 try_charge_memcg(): tsk_is_oom_victim(current) &&
    # MMF_OOM_SKIP on current->signal->oom_mm (the OOM reaper is done with
    # it) → nomem, before the max event and reclaim
    "oom_skip": "oom_reaped",
    # ≥ 6.8 (6.12, 6.18, 7.x) mem_cgroup_handle_over_high(): task_is_dying()
    # → stop, at the top of each reclaim retry
    "over_high": "dying",
}

#: Where a v2 limit loop re-reads the limit it enforces and stops if
#: another writer changed it (6.1.188+, 6.12.109+, 7.2, 7.3)
SUPERSEDED_POINTS = (
    "max_write",       # memory_max_write(): max != READ_ONCE(memcg->memory.max)
    "high_write",      # memory_high_write(): high != READ_ONCE(memcg->memory.high)
)

#: Where a limit loop stops when the cgroup is being removed
#: (memcg_is_dying(); 7.3: cgroup_rmdir() waits with cgroup_mutex held)
DYING_POINTS = (
    "max_write",       # memory_max_write(), top of each pass → the loop stops
    "high_write",      # memory_high_write(), top of each pass → the loop stops
    "resize",          # v1 mem_cgroup_resize_max(), after a failed set_max → its -EBUSY
    "reclaim_write",   # memory.reclaim: user_proactive_reclaim(), each pass → -EAGAIN
)

#: The counter reads (page_counter_read) the kernel takes a decision on,
#: where other CPUs' charges and uncharges can make the value anything.
USAGE_POINTS = (
    "charge_margin",   # try_charge_memcg(): mem_cgroup_margin(mem_over_limit) after reclaim
    "oom_margin",      # mem_cgroup_out_of_memory(): mem_cgroup_margin() under oom_lock
    "max_write",       # v2 memory_max_write(): usage at the top of each pass
    "high_write",      # v2 memory_high_write(): usage at the top of each pass
    "set_max",         # page_counter_set_max(): usage before the new max is set
)


@dataclass
class Task:
    """The ``current`` task of a charge.

    ``dying``: an OOM victim, a fatal signal pending, or exiting.
    ``in_user_fault``: the charge comes from a user page fault (matters to
    v1 oom_kill_disable).  ``oom_reaped``: an OOM victim whose mm the OOM
    reaper has finished with (MMF_OOM_SKIP set).  ``memcg_in_oom`` and
    ``memcg_nr_pages_over_high`` are kernel state the model updates.
    """
    pid: int = 1
    pf_memalloc: bool = False
    dying: bool = False
    in_user_fault: bool = True
    signal_pending: bool = False
    oom_reaped: bool = False
    memcg_in_oom: object = None
    memcg_nr_pages_over_high: int = 0


@dataclass
class ReclaimResult:
    """A reclaim oracle's detailed answer.

    ``freed``: pages reclaimed (the return value).  ``swapped``: how many of
    them were anon pages written to swap (v1: memsw keeps them; v2: the
    swap counter takes them).  ``by_cgroup``: optional ``{handle: pages}``
    saying where they came from; otherwise the model takes them from the
    target's subtree, the target first, then its descendants in order.
    """
    freed: int
    swapped: int = 0
    by_cgroup: dict | None = None
    swapped_by_cgroup: dict | None = None


@dataclass
class OomOutcome:
    """What ``out_of_memory()`` did: its return value, and if a task was
    killed, its memcg (``oom_kill`` is raised there) and the pages its
    death gives back before the charge retries."""
    result: bool
    victim: object = None
    freed: int = 0
    group: bool = False
    exiting: bool = False


_KW_CACHE: dict = {}


def _accepts_may_swap(fn) -> bool:
    # cached per code object: scenario and test oracles are often closures
    key = getattr(fn, "__code__", None) or getattr(getattr(fn, "__func__", None), "__code__", None)
    if key is not None and key in _KW_CACHE:
        return _KW_CACHE[key]
    result = _inspect_may_swap(fn)
    if key is not None:
        _KW_CACHE[key] = result
    return result


def _inspect_may_swap(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_KEYWORD or p.name == "may_swap" for p in params)


def _no_reclaim(target, nr_pages, gfp):
    return 0


def _no_oom(target, order, gfp):
    return False


def _drain_all(target, cpu):
    return "all"


@dataclass
class Ctx:
    kernel: object
    task: Task
    cpu: int = 0
    reclaim: object = None
    oom: object = None
    drain: object = None
    moving: object = None
    attempt: object = None
    usage: object = None
    set_max_race: object = None
    signal: object = None
    stock_locked: object = None
    superseded: object = None
    memcg_dying: object = None
    steps: list = field(default_factory=list)

    def __post_init__(self):
        self.reclaim = self.reclaim or _no_reclaim
        self.oom = self.oom or _no_oom
        self.drain = self.drain or _drain_all

    def call_reclaim(self, target, nr, gfp, may_swap):
        if _accepts_may_swap(self.reclaim):
            return self.reclaim(target, nr, gfp, may_swap=may_swap)
        return self.reclaim(target, nr, gfp)

    def drain_outcome(self, target) -> str:
        out = self.drain(target, self.cpu)
        if out is True:
            return "all"
        if out is False:
            return "local"
        if out not in ("all", "local", "skipped"):
            raise ValueError(f"drain oracle returned {out!r}; use 'all', 'local', 'skipped' or a bool")
        return out

    def counter_attempt(self, memcg, counter: str, nr: int):
        """The ``attempt`` oracle's answer: None (arithmetic), True (passes
        at every level) or the level where it fails (memcg or an ancestor)."""
        if self.attempt is None:
            return None
        answer = self.attempt(memcg, counter, nr)
        if answer is None or answer is True:
            return answer
        if getattr(answer, "kernel", None) is not memcg.kernel or not memcg.is_descendant(answer):
            raise ValueError(f"attempt oracle returned {answer!r} for {memcg.path}:{counter}; "
                             f"use None, True or {memcg.path} or one of its ancestors")
        return answer

    def read_usage(self, memcg, counter: str, where: str) -> int:
        """page_counter_read(&memcg->counter) at ``where``: the ``usage``
        oracle's answer, else the model's count.  The answer serves this
        decision only: the model does not track other CPUs' pages."""
        if self.usage is not None:
            answer = self.usage(memcg, counter, where)
            if answer is not None:
                if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
                    raise ValueError(f"usage oracle returned {answer!r} for {memcg.path}:"
                                     f"{counter} at {where}; expected pages (int ≥ 0) or None")
                return answer
        return getattr(memcg, counter).usage

    def signalled(self, memcg, where: str) -> bool:
        """Is a signal pending (fatal, at the dying points) at ``where``?"""
        if self.signal is None:
            return getattr(self.task, SIGNAL_POINTS[where])
        answer = self.signal(memcg, where)
        if not isinstance(answer, bool):
            raise ValueError(f"signal oracle returned {answer!r} at {where}; expected a bool")
        return answer

    def limit_superseded(self, memcg, where: str, written: int) -> bool:
        """Does the limit a v2 loop enforces (``written``) still hold?  The
        ``superseded`` oracle's answer, else the model's own limit."""
        if self.superseded is None:
            return (memcg.memory.max if where == "max_write" else memcg.memory.high) != written
        answer = self.superseded(memcg, where)
        if not isinstance(answer, bool):
            raise ValueError(f"superseded oracle returned {answer!r} at {where}; expected a bool")
        return answer

    def is_dying(self, memcg, where: str) -> bool:
        """memcg_is_dying(memcg) at ``where`` (the ``memcg_dying`` oracle)."""
        if self.memcg_dying is None:
            return False
        answer = self.memcg_dying(memcg, where)
        if not isinstance(answer, bool):
            raise ValueError(f"memcg_dying oracle returned {answer!r} at {where}; expected a bool")
        return answer

    def race_pages(self, memcg, counter: str) -> int:
        """Pages charged inside page_counter_set_max (the ``set_max_race`` oracle)."""
        if self.set_max_race is None:
            return 0
        grown = self.set_max_race(memcg, counter)
        if isinstance(grown, bool) or not isinstance(grown, int):
            raise ValueError(f"set_max_race oracle returned {grown!r}; expected pages (int)")
        return grown
