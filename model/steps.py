"""What the model did, step by step, as data a cross-checker can compare
with kernel observations.

Every step is a frozen dataclass with a ``kind`` string and plain fields
(cgroups are named by path; ``"/"`` is the root).  ``as_dict()`` gives the
JSON form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = [
    "Step", "RootBypass", "StockHit", "CounterCharge", "CounterFail", "BatchShrink", "Event",
    "Force", "Nomem", "Reclaim", "Drain", "DrainWork", "Retry", "Oom", "OomKill",
    "Restock", "StockDrain", "HighOver", "HighThrottle", "HighBail", "SetMax", "LimitResult",
    "ChargeResult", "WriteResult",
]


class Step:
    kind: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind
        return d


def _step(kind):
    def wrap(cls):
        cls = dataclass(frozen=True)(cls)
        cls.kind = kind
        return cls
    return wrap


@_step("stock_hit")
class StockHit(Step):
    """consume_stock succeeded: no counter touched, no high check."""
    cgroup: str
    cpu: int
    nr: int


@_step("root_bypass")
class RootBypass(Step):
    """The root cgroup: try_charge returns 0 at once, no counter touched."""
    cgroup: str
    nr: int


@_step("counter_charge")
class CounterCharge(Step):
    """page_counter_try_charge(counter, nr) succeeded (or a forced charge)."""
    cgroup: str
    counter: str
    nr: int
    forced: bool = False


@_step("counter_fail")
class CounterFail(Step):
    """page_counter_try_charge failed at ``owner`` (maybe an ancestor);
    ``failcnt`` tells whether that level's failcnt was incremented."""
    cgroup: str
    counter: str
    nr: int
    owner: str
    failcnt: bool


@_step("batch_shrink")
class BatchShrink(Step):
    cgroup: str
    old: int
    new: int


@_step("event")
class Event(Step):
    """memcg_memory_event(cgroup, name), as raised (propagation not listed)."""
    cgroup: str
    name: str


@_step("force")
class Force(Step):
    """The charge is forced past the limit; ``reason`` names the branch:
    atomic, dying, pf_memalloc, nofail, high, oom_failed."""
    cgroup: str
    nr: int
    reason: str


@_step("nomem")
class Nomem(Step):
    """-ENOMEM; ``reason``: memcg_in_oom, no_direct_reclaim, oom_skip (an
    OOM victim the reaper is done with), noretry, retry_mayfail,
    passed_oom_dying, oom."""
    cgroup: str
    reason: str


@_step("reclaim")
class Reclaim(Step):
    """try_to_free_mem_cgroup_pages(target, nr, gfp, may_swap) → freed.

    ``sc_nr`` is max(nr, SWAP_CLUSTER_MAX), ``sc_gfp`` the gfp the vmscan
    tracepoint shows; ``uncharged`` is what the model actually took off the
    counters (less than ``freed`` only if the oracle claimed more pages
    than the subtree holds); ``options`` is the 4th argument as ≥ 6.1
    passes it (MEMCG_RECLAIM_MAY_SWAP 2 | MEMCG_RECLAIM_PROACTIVE 4), None
    where it is ``bool may_swap`` (≤ 5.15)."""
    target: str
    nr: int
    gfp: int
    may_swap: bool
    freed: int
    sc_nr: int
    sc_gfp: int
    reason: str = "charge"
    uncharged: int = 0
    options: int | None = None


@_step("drain")
class Drain(Step):
    """drain_all_stock(target) called on ``cpu``: ``outcome`` is all (remote
    stocks drained before the next check), local (remote work still
    pending) or skipped (another drain held the mutex)."""
    target: str
    cpu: int
    outcome: str
    pages: int = 0


@_step("drain_work")
class DrainWork(Step):
    """A remote CPU's drain work ran after the call it was scheduled in."""
    cpu: int
    pages: int


@_step("retry")
class Retry(Step):
    """goto retry; ``reason``: batch, margin, drain, progress, move_wait,
    retries, oom; ``retries_left`` after the decision."""
    cgroup: str
    reason: str
    retries_left: int


@_step("oom")
class Oom(Step):
    """mem_cgroup_oom / mem_cgroup_out_of_memory.  ``result``: skipped_order,
    async (v1 oom_kill_disable, memcg_in_oom recorded), skipped (oom
    disabled outside a user fault), lock_interrupted, margin, dying,
    killed, victim_exiting, no_victim.  ``ret`` is what the caller saw."""
    target: str
    order: int
    result: str
    ret: bool


@_step("oom_kill")
class OomKill(Step):
    victim: str
    freed: int
    group: bool = False


@_step("restock")
class Restock(Step):
    """refill_stock(cgroup, nr) on ``cpu`` after a batch charge."""
    cgroup: str
    cpu: int
    nr: int


@_step("stock_drain")
class StockDrain(Step):
    """A stock slot given back to the counters: ``reason`` refill (a
    different memcg was cached), overflow (above BATCH), evict (6.18),
    direct (6.18 refill above BATCH), drain_all."""
    cgroup: str
    cpu: int
    nr: int
    reason: str


@_step("high_over")
class HighOver(Step):
    """The memory.high walk found ``cgroup`` over high: the task owes
    ``over_high`` pages of high reclaim."""
    cgroup: str
    over_high: int


@_step("high_throttle")
class HighThrottle(Step):
    """mem_cgroup_handle_over_high's verdict: ``jiffies`` of sleep (0 when
    the penalty was ≤ 10 ms and it gave up)."""
    cgroup: str
    jiffies: int
    slept: bool


@_step("high_bail")
class HighBail(Step):
    """mem_cgroup_handle_over_high stopped before its reclaim: ``reason``
    dying (≥ 6.8: task_is_dying(), no reclaim, no throttling)."""
    cgroup: str
    reason: str


@_step("set_max")
class SetMax(Step):
    cgroup: str
    counter: str
    nr: int
    ret: int


@_step("limit_result")
class LimitResult(Step):
    cgroup: str
    file: str
    ret: int


@dataclass
class ChargeResult:
    """What ``Kernel.charge`` returns: the return value and ordered steps."""
    ret: int
    steps: list = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]

    def of(self, kind: str) -> list:
        return [s for s in self.steps if s.kind == kind]

    def as_dict(self) -> dict:
        return {"ret": self.ret, "steps": [s.as_dict() for s in self.steps]}


@dataclass
class WriteResult(ChargeResult):
    """Kernel.write_ex: like ChargeResult, for a control-file write."""
