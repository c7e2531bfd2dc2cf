"""What a call into the model carries: the task, the CPU, the oracles that
stand in for the world, and the steps recorded so far.

Oracles (all optional):

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
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

__all__ = ["Task", "ReclaimResult", "OomOutcome", "Ctx"]


@dataclass
class Task:
    """The ``current`` task of a charge.

    ``dying``: an OOM victim, a fatal signal pending, or exiting.
    ``in_user_fault``: the charge comes from a user page fault (matters to
    v1 oom_kill_disable).  ``memcg_in_oom`` and
    ``memcg_nr_pages_over_high`` are kernel state the model updates.
    """
    pid: int = 1
    pf_memalloc: bool = False
    dying: bool = False
    in_user_fault: bool = True
    signal_pending: bool = False
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
