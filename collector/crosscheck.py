"""The cross-checker: each observed episode replayed through the model's
layer 1 (``memcgscope.model``), and aggregate cgroupfs counters compared
with what the episodes imply.  The checks and the reason set are described
in collector/README.md, section "Cross-check".

How a replay works.  The model runs the kernel function of the episode
(``try_charge_memcg``, ``mem_cgroup_resize_max``, ``memory_max_write``,
``memory_high_write``) on a scratch ``Kernel`` whose calls into the world
are answered by the observation, in order:

* a page-counter attempt of the charged memcg fails exactly when the next
  observed step is a ``counter_fail`` of that counter (then ``over`` is the
  failing cgroup), and succeeds when the kernel went no further (a stock
  hit and a counter success look alike: neither is a step).  Other CPUs'
  charges and uncharges can make any attempt fail or succeed, so this is
  not a guess: it is the interleaving the kernel took.
* the reclaim oracle returns the observed ``freed``; the margin check that
  follows it reads the observed ``after`` counters (the model is resynced
  from them).
* the OOM oracle returns the observed ``mem_cgroup_out_of_memory`` result
  (and the kills seen inside it); the drain oracle consumes a drain step.
* unobservable task state is a choice: PF_MEMALLOC, v1 ``memcg_in_oom``
  and ``oom_kill_disable`` are tried as variants; a fatal signal (``dying``)
  or a pending signal may arrive at any moment, so the model sees one only
  where the kernel stopped (the end of the observation).

When the model wants to do something the kernel did not do next (or the
kernel did something the model cannot), the replay stops with a reason.
An episode is divergent only if no variant replays it.

Replays are pure functions of the episode's *shape* (gfp, sizes, step kinds,
targets relative to the charged memcg, progress and margin booleans, OOM
results, return value), so their outcome is cached by shape: a common
episode costs the shape computation and a dict lookup.
"""

from __future__ import annotations

import errno
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from memcgscope.model import Kernel
from memcgscope.model.context import OomOutcome, Task
from memcgscope.model.charge import MAX_RECLAIM_RETRIES
from memcgscope.model.gfp import GFP, order_of
from memcgscope.model.page_counter import PAGE_SIZE, PageCounter, page_counter_memparse
from memcgscope.model.profiles import get_profile

__all__ = ["REASONS", "CHECKS", "Divergence", "CheckResult", "CrossChecker", "AggregateChecker",
           "Tolerance", "compare_count"]

#: Divergence reasons (a bounded set: it is a Prometheus label).
REASONS = {
    # charge (try_charge_memcg / try_charge)
    "reclaim_without_failure": "a reclaim (or drain) with no counter failure before it in its pass",
    "reclaim_not_allowed": "a charge reclaimed although its gfp has no __GFP_DIRECT_RECLAIM",
    "missing_reclaim": "the kernel retried or gave up where the model reclaims",
    "enomem_early": "-ENOMEM while the model still retries (reclaim budget or OOM not spent)",
    "missing_oom": "the charge ended (-ENOMEM or forced) after the retry budget without the OOM the model calls",
    "oom_order": "an OOM for a charge of order > 3 (more than 8 pages)",
    "oom_early": "an OOM before the (zero-progress) retry budget is spent",
    "unexpected_oom": "an OOM where the model never calls one (v1 resize, memory.high, after -ENOMEM)",
    "retry_budget": "more passes than the model allows (budget, __GFP_NORETRY, failed OOM, zero progress)",
    "unexpected_drain": "a drain_all_stock the model does not do (twice, or before reclaim)",
    "missing_drain": "no drain where the model drains (only when drains are always visible)",
    "counter_mismatch": "a counter attempt of another counter or size than the model's (batch, shrink)",
    "target_mismatch": "reclaim or OOM on another cgroup than the one whose counter failed",
    "reclaim_args": "reclaim asked for another size, gfp or swap option than the model",
    "ret_mismatch": "the return value differs from the model's",
    "ebusy_after_progress": "v1 resize returned -EBUSY right after a reclaim that freed pages",
    "over_max": "usage above max after a charge that was not forced",
    "bad_ancestry": "a step on a cgroup that is neither the charged memcg nor an ancestor",
    "oom_kill_outside_oom": "an OOM kill step not inside an OOM call",
    "page_charge_mismatch": "__mem_cgroup_charge failed in a way its charge cannot",
    "malformed": "the episode lacks fields or has unknown steps",
    "replay_error": "the model raised while replaying (a bug of ours)",
    # aggregates
    "failcnt_mismatch": "v1 memory.failcnt delta vs counter failures seen",
    "memsw_failcnt_mismatch": "v1 memory.memsw.failcnt delta vs counter failures seen",
    "events_max_mismatch": "v2 memory.events.local max delta vs reclaim passes and forced charges",
    "events_oom_mismatch": "v2 memory.events.local oom delta vs OOM calls",
    "events_oom_kill_mismatch": "v2 memory.events.local oom_kill delta vs kills seen",
}
CHECKS = ("charge", "limit_write", "page_charge", "oom_kill", "reclaim",
          "failcnt", "memsw_failcnt", "events_max", "events_oom", "events_oom_kill")

_DIRECT = GFP.DIRECT_RECLAIM
_MAY_SWAP = 1 << 1
_BIG = 1 << 40          # the scratch model's limits: far from any observed size
_CHECK_OF_KIND = {"charge": "charge", "limit_write": "limit_write", "page_charge_fail": "page_charge",
                  "oom_kill": "oom_kill", "reclaim": "reclaim"}
_CACHE_MAX = 50_000     # shapes kept; cleared when full (shapes repeat a lot)
_END = ("E",)


@dataclass(frozen=True)
class Divergence:
    check: str
    reason: str
    detail: str
    episode: dict | None = None


@dataclass
class CheckResult:
    checks: list = field(default_factory=list)        # [(check, verdict)]
    divergences: list = field(default_factory=list)   # [Divergence]
    #: memory events the model raised replaying this episode: {(cgroup_id, name): n}
    events: dict = field(default_factory=dict)
    #: counter failures seen: {(cgroup_id, counter): n}
    failures: dict = field(default_factory=dict)
    #: OOM kills seen (all attributed to the cgroup whose OOM ran)
    kills: int = 0

    @property
    def ok(self) -> bool:
        return not self.divergences


class _Mismatch(Exception):
    def __init__(self, reason, detail):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------
# the replay: hooks the model calls, answered from the observed steps


class _ScriptedCounter(PageCounter):
    """The charged memcg's counters: attempts and set_max follow the
    observation (same layout as PageCounter, so ``__class__`` can be swapped)."""
    __slots__ = ()

    def try_charge(self, nr_pages):
        return self.owner.kernel._mcs_replay.counter_attempt(self, nr_pages)

    def set_max(self, nr_pages, usage_grows=None):
        return self.owner.kernel._mcs_replay.set_max(self, nr_pages)


class _ReplayTask(Task):
    """A task whose fatal signal / pending signal is unobservable: it is seen
    only where the kernel stopped, i.e. at the end of the observation."""
    _replay = None

    @property
    def dying(self):
        r = self._replay
        if r is None or not r.at_end():
            return False
        # task_is_dying() inside mem_cgroup_out_of_memory is behind the probe:
        # the observed OOM result already says what it decided, and where no
        # OOM call was observed the kernel never got there
        return sys._getframe(1).f_code.co_name != "mem_cgroup_out_of_memory"

    @dying.setter
    def dying(self, value):
        pass

    @property
    def signal_pending(self):
        r = self._replay
        return r is not None and r.at_end() and r.signal_ok

    @signal_pending.setter
    def signal_pending(self, value):
        pass


def _kind(step):
    return "end" if step is _END else {"F": "counter_fail", "R": "reclaim", "D": "drain",
                                       "O": "oom", "K": "oom_kill"}[step[0]]


class _Replay:
    """One run of the model against one observed shape.

    Shape steps: ("F", counter, nr, rel) counter_fail; ("R", rel, nr, gfp,
    options, progress, margin_ok, high_like) reclaim; ("D", rel) drain;
    ("O", rel, gfp, order, result) oom; ("K", rel) oom_kill.  ``rel`` is 0
    for the episode's memcg, 1.. for other cgroups in order of appearance,
    None when unknown.
    """

    def __init__(self, kernel, mode, steps, ret, *, gfp=0, nr=0, drains_visible=False,
                 high_tail=False, limit_max=0):
        self.k, self.mode, self.steps, self.ret = kernel, mode, steps, ret
        self.i = 0
        self.gfp, self.nr = gfp, nr
        self.drains_visible = drains_visible
        self.high_tail = high_tail          # a trailing high reclaim may follow success
        self.limit_max = limit_max
        self.signal_ok = ret == -errno.EINTR if mode == "v1_limit" else True
        self.last = None                    # the last step consumed
        self.retries = MAX_RECLAIM_RETRIES  # the model's nr_retries, for `moving`
        self.cgroups = {}                   # rel -> MemCgroup
        self.task = None                    # the _ReplayTask of the run
        self.nomem = None                   # the model's -ENOMEM reason, once it returned
        kernel._mcs_replay = self

    # -- cursor ------------------------------------------------------------------
    def peek(self):
        return self.steps[self.i] if self.i < len(self.steps) else _END

    def at_end(self):
        return self.i >= len(self.steps)

    def take(self):
        s = self.steps[self.i]
        self.i += 1
        self.last = s
        return s

    def rel_of(self, memcg):
        for rel, m in self.cgroups.items():
            if m is memcg:
                return rel
        return -1

    def mismatch(self, wants, detail=""):
        nxt = self.peek()
        raise _Mismatch(_classify(self.mode, wants, nxt, self), detail or
                        f"model {wants}, kernel {_kind(nxt)}"
                        + (f" (ret {self.ret})" if nxt is _END else ""))

    # -- hooks -------------------------------------------------------------------
    def counter_attempt(self, counter, nr):
        nxt = self.peek()
        if nxt[0] == "F":
            if nxt[1] == counter.name:
                if nxt[2] != nr:
                    raise _Mismatch("counter_mismatch",
                                    f"model tries {nr} pages on {counter.name}, kernel {nxt[2]}")
                self.take()
                owner = self.cgroups.get(nxt[3]) or self.cgroups[0]
                return False, getattr(owner, counter.name)
            if counter.name == "memsw" and nxt[1] == "memory":
                counter.charge(nr)      # memsw passed, memory will fail
                return True, None
            raise _Mismatch("counter_mismatch",
                            f"model tries {counter.name}, kernel failed {nxt[1]}")
        if nxt is _END:
            if self.ret == 0:
                counter.charge(nr)
                return True, None
            self.mismatch("retries the charge")
        if nxt[0] == "R" and self.ret == 0 and self.high_tail and not self.task.pf_memalloc:
            rest = self.steps[self.i:]
            # >= 6.1 sync memory.high reclaim after a successful charge
            # (mem_cgroup_handle_over_high): every remaining step is a
            # may-swap reclaim of the charge's gfp, the first asking
            # over_high (> BATCH) pages, retries SWAP_CLUSTER_MAX
            if (all(s[0] == "R" and s[7] and s[3] == self.gfp for s in rest)
                    and rest[0][2] > self.k.profile.charge_batch):
                self.i = len(self.steps)
                counter.charge(nr)
                return True, None
        self.mismatch("charges again")

    def moving(self, over):
        """v1 <= 6.12 mem_cgroup_wait_acct_move: a charge move in progress
        sends the loop back to retry without using a retry.  Asked where the
        model is about to use one: ``retries`` mirrors the model's count, and
        only a kernel that retried with none left is explained by a move."""
        if self.retries > 0:
            self.retries -= 1
            return False
        return self.peek()[0] == "F"

    def set_max(self, counter, nr):
        nxt = self.peek()
        if nxt is _END and self.ret != -errno.EBUSY:
            counter.max = nr
            return 0
        return -errno.EBUSY

    def reclaim(self, target, nr, gfp, may_swap=True):
        nxt = self.peek()
        if nxt[0] != "R":
            self.mismatch("reclaims")
        rel = self.rel_of(target)
        if nxt[1] is not None and nxt[1] != rel:
            raise _Mismatch("target_mismatch", f"model reclaims cgroup #{rel}, kernel #{nxt[1]}")
        if nxt[2] != nr or nxt[3] != gfp:
            raise _Mismatch("reclaim_args", f"model reclaims {nr} pages gfp {gfp:#x}, "
                                            f"kernel {nxt[2]} gfp {nxt[3]:#x}")
        if self.k.profile.reclaim_signature == "may_swap":
            want_opt = int(may_swap)
        else:
            want_opt = _MAY_SWAP if may_swap else 0
        if nxt[4] is not None and nxt[4] != want_opt:
            raise _Mismatch("reclaim_args", f"model reclaim options {want_opt}, kernel {nxt[4]}")
        self.take()
        freed = 1 if nxt[5] else 0
        if self.mode == "charge":
            # resync the margin check that follows from the observed `after`
            usage = 0 if nxt[6] else _BIG
            target.memory.usage = usage + freed
            if target.memsw is not None:
                target.memsw.usage = usage + freed
        elif self.mode == "v2_write":
            self._prime(freed)
        return freed

    def drain(self, target, cpu):
        nxt = self.peek()
        if nxt[0] == "D":
            if nxt[1] is not None and nxt[1] != self.rel_of(target):
                raise _Mismatch("target_mismatch", "drain of another cgroup")
            self.take()
            if self.mode == "v2_write":
                self._prime(0)
            return "skipped"      # the scratch stocks are empty: nothing to give back
        if self.drains_visible:
            raise _Mismatch("missing_drain", f"model drains, kernel {_kind(nxt)}")
        # the drain probe sits on a clone entered only past the mutex trylock:
        # a drain that found another one running is invisible
        if self.mode == "v2_write":
            self._prime(0)
        return "skipped"

    def oom(self, target, order, gfp):
        kills = 0
        while self.peek()[0] == "K":
            self.take()
            kills += 1
        nxt = self.peek()
        if nxt[0] != "O":
            if kills:
                raise _Mismatch("oom_kill_outside_oom", "a kill not followed by its OOM call")
            self.mismatch("calls the OOM killer")
        rel = self.rel_of(target)
        if nxt[1] is not None and nxt[1] != rel:
            raise _Mismatch("target_mismatch", f"model OOMs cgroup #{rel}, kernel #{nxt[1]}")
        if nxt[3] != order:
            raise _Mismatch("oom_order", f"model OOM order {order}, kernel {nxt[3]}")
        self.take()
        if self.mode == "v2_write":
            self._prime(0)
        if nxt[4]:
            self.retries = MAX_RECLAIM_RETRIES   # passed_oom: the retries start again
        return OomOutcome(result=bool(nxt[4]), victim=target if kills else None)

    def _prime(self, freed):
        """v2 limit writes read usage at the top of their loop: over max while
        the kernel went on, within it where the kernel stopped (concurrent
        charges and uncharges make either possible)."""
        nxt = self.peek()
        m = self.cgroups[0]
        if nxt is _END:
            usage = self.limit_max
        elif nxt[0] == "R":
            usage = self.limit_max + nxt[2]
        else:
            usage = self.limit_max + 1
        m.memory.usage = usage + freed


def _classify(mode, wants, nxt, r) -> str:
    """The reason for 'the model wants X, the kernel did Y next'."""
    k = nxt[0]
    if k == "D":
        return "unexpected_drain"
    if wants in ("retries the charge", "charges again"):
        if k == "R":
            return "reclaim_without_failure"
        if k in ("O", "K"):
            return "oom_early"
        return "enomem_early" if r.ret == -errno.ENOMEM else "ret_mismatch"
    if wants == "reclaims":
        if k in ("O", "K"):
            return "oom_early" if mode != "v1_limit" else "unexpected_oom"
        if k == "F":
            return "missing_reclaim"
        if mode == "v1_limit" and r.last is not None and r.last[0] == "R" and r.last[5]:
            return "ebusy_after_progress"
        if mode == "charge" and r.ret == -errno.ENOMEM:
            return "enomem_early"
        return "ret_mismatch"
    if wants == "calls the OOM killer":
        if k in ("F", "R"):
            return "retry_budget"
        return "missing_oom"
    # the model returned
    if k in ("F", "R"):
        if mode == "charge" and r.nomem == "no_direct_reclaim":
            return "reclaim_not_allowed"
        return "retry_budget"
    if k in ("O", "K"):
        # another OOM after one that failed: the kernel should have stopped
        return "retry_budget" if r.nomem == "oom" else "unexpected_oom"
    return "ret_mismatch"


# ---------------------------------------------------------------------------------
# ancestry


def _ancestry_fn(ancestors):
    """``ancestors``: None, a callable ``id -> [ancestor ids] | None``, or a
    mapping ``id -> cgroup path`` (ancestors are the ids of parent paths)."""
    if ancestors is None or callable(ancestors):
        return ancestors
    if isinstance(ancestors, Mapping):
        paths = {int(k): "/" + "/".join(x for x in str(v).split("/") if x) for k, v in ancestors.items()}
        by_path = {p: i for i, p in paths.items()}

        def fn(cid):
            p = paths.get(cid)
            if p is None:
                return None
            out = []
            while p != "/":
                p = p.rsplit("/", 1)[0] or "/"
                if p in by_path:
                    out.append(by_path[p])
            return out
        return fn
    raise TypeError("ancestors must be None, a callable or a mapping of cgroup id to path")


# ---------------------------------------------------------------------------------


class CrossChecker:
    """Checks episodes of one kernel against the model.

    ``profile``: a model profile name or a kernel release; ``cgroup``: "v1"
    or "v2"; ``memsw``: v1 swap accounting.  ``ancestors`` (optional): a
    callable ``cgroup_id -> list of ancestor ids (nearest first) or None``
    or a mapping ``cgroup_id -> path``; without it ancestry is not checked.
    ``drains_visible``: every ``drain_all_stock`` call is probed (False
    when only a ``.part`` clone entered past its trylock is, as on Debian
    6.1, or when drains are not probed).  ``forced_charges_visible``: every
    forced charge is an episode; only then is ``over_max`` checked (the
    probes keep a charge in the kernel unless it reclaims, drains, OOMs or
    fails, so a charge forced right after its counter failures, e.g. by
    PF_MEMALLOC or __GFP_HIGH, is unseen and could explain the excess).
    ``over_max_slack``: pages above max tolerated even then (see README).
    """

    def __init__(self, profile: str, cgroup: str, memsw: bool, *, ancestors=None,
                 drains_visible: bool = False, forced_charges_visible: bool = False,
                 over_max_slack: int = 0, forced_window_ns: int = 1_000_000_000):
        self.profile = get_profile(profile)
        if cgroup not in ("v1", "v2"):
            raise ValueError(f"cgroup must be 'v1' or 'v2', not {cgroup!r}")
        self.cgroup = cgroup
        self.memsw = bool(memsw) and cgroup == "v1"
        self.ancestors = _ancestry_fn(ancestors)
        self.drains_visible = drains_visible
        self.forced_charges_visible = forced_charges_visible
        self.over_max_slack = over_max_slack
        self.forced_window_ns = forced_window_ns
        self._cache: dict = {}
        self._last_forced_ns = None       # ts of the last (possibly) forced charge seen
        self._charges_by_tid: dict = {}   # tid -> (ts, end, nr, ret) of its last charge
        self.replays = 0                  # full model replays run (cache misses)

    # -- entry point -----------------------------------------------------------------
    def check(self, ep: dict) -> CheckResult:
        res = CheckResult()
        kind = ep.get("kind") if isinstance(ep, dict) else None
        try:
            if kind == "charge":
                self._check_charge(ep, res)
            elif kind == "limit_write":
                self._check_limit(ep, res)
            elif kind == "page_charge_fail":
                self._check_page_charge(ep, res)
            elif kind == "oom_kill":
                self._check_oom_kill(ep, res)
            elif kind == "reclaim":
                self._check_reclaim(ep, res)
            else:
                self._flag(res, "episode", "malformed", f"unknown episode kind {kind!r}", ep)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            self._flag(res, _CHECK_OF_KIND.get(kind, "episode"), "malformed",
                       f"{type(e).__name__}: {e}", ep)
        return res

    @staticmethod
    def _flag(res, check, reason, detail, ep):
        res.checks.append((check, "divergent"))
        res.divergences.append(Divergence(check, reason, detail, ep))

    # -- charge ------------------------------------------------------------------------
    def _shape(self, ep, steps, cid):
        """(shape steps, rel -> cgroup id) of an episode's steps.  Hot: every
        episode builds its shape, so the common cases come first."""
        rels = None
        ids = [cid]
        out = []
        add = out.append
        memsw = self.memsw
        for s in steps:
            k = s["kind"]
            g = s.get("cgroup_id")
            if g == cid:
                rel = 0
            elif g is None:
                rel = None
            else:
                if rels is None:
                    rels = {cid: 0}
                rel = rels.get(g)
                if rel is None:
                    rel = rels[g] = len(ids)
                    ids.append(g)
            if k == "counter_fail":
                add(("F", s["counter"], s["nr_pages"], rel))
            elif k == "reclaim":
                nr = s["nr_pages"]
                a = s.get("after")
                if a is None:
                    margin = None
                else:
                    margin = a["max"] - a["usage"]
                    if memsw and "memsw_max" in a:
                        m2 = a["memsw_max"] - a["memsw_usage"]
                        if m2 < margin:
                            margin = m2
                    margin = margin >= nr
                opt = s.get("options")
                add(("R", rel, nr, s["gfp"], opt, s["freed"] > 0, margin,
                     opt is None or bool(opt & _MAY_SWAP)))
            elif k == "drain":
                add(("D", rel))
            elif k == "oom":
                add(("O", rel, s.get("gfp"), s["order"], bool(s["result"])))
            elif k == "oom_kill":
                add(("K", rel))
            else:
                raise ValueError(f"unknown step kind {k!r}")
        return tuple(out), ids

    def _check_ancestry(self, ep, ids, res, check) -> bool:
        if self.ancestors is None or len(ids) == 1:
            return True
        anc = self.ancestors(ids[0])
        if anc is None:
            return True
        allowed = set(anc)
        for g in ids[1:]:
            if g not in allowed:
                self._flag(res, check, "bad_ancestry",
                           f"step on cgroup {g}, not {ids[0]} or an ancestor", ep)
                return False
        return True

    def _check_charge(self, ep, res):
        if ep.get("complete") is False:
            res.checks.append(("charge", "skipped"))
            return
        cid = ep["cgroup_id"]
        gfp, nr, ret = ep["gfp"], ep["nr_pages"], ep["ret"]
        shape, ids = self._shape(ep, ep.get("steps") or (), cid)
        if self.ancestors is not None and not self._check_ancestry(ep, ids, res, "charge"):
            return
        key = ("charge", gfp, nr, ret, shape)
        out = self._cache.get(key)
        if out is None:
            out = self._charge_outcome(gfp, nr, ret, shape)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = out
        verdict, reason, detail, events, forced, fails, kills = out
        # per-cgroup counts for the aggregate checks (rel -> id of this episode)
        for (rel, name), n in events:
            k = (ids[rel], name)
            res.events[k] = res.events.get(k, 0) + n
        for (rel, counter), n in fails:
            k = (ids[rel], counter)
            res.failures[k] = res.failures.get(k, 0) + n
        res.kills += kills
        ts = ep.get("ts_ns", 0)
        tids = self._charges_by_tid
        if len(tids) > 65536:
            tids.clear()     # only the latest charge of a task is ever asked for
        tids[ep.get("tid")] = (ts, ts + (ep.get("duration_ns") or 0), nr, ret)
        if forced:
            self._last_forced_ns = ts
        if verdict == "divergent":
            self._flag(res, "charge", reason, detail, ep)
            return
        res.checks.append(("charge", verdict))
        if (ret == 0 and verdict == "ok" and not forced and self.cgroup == "v1"
                and self.forced_charges_visible):
            self._check_over_max(ep, res, ts)

    def _charge_outcome(self, gfp, nr, ret, shape):
        """The cached outcome of a charge shape: the replay's verdict and the
        counts the aggregates need, relative to the charged memcg."""
        verdict, reason, detail, events, forced = self._replay_charge(gfp, nr, ret, shape)
        fails, kills = Counter(), 0
        for s in shape:
            if s[0] == "F" and s[3] is not None:
                fails[(s[3], s[1])] += 1
            elif s[0] == "K":
                kills += 1
        if verdict != "ok":
            # not replayed: the events the observation shows (a max per reclaim
            # pass on its target, an oom per OOM call) stand in for the model's
            ev = Counter()
            for s in shape:
                if s[0] in ("R", "O") and s[1] is not None:
                    ev[(s[1], "max" if s[0] == "R" else "oom")] += 1
            events = tuple(ev.items())
        return verdict, reason, detail, events, forced, tuple(fails.items()), kills

    def _check_over_max(self, ep, res, ts):
        # v1 limits are never set below usage and a successful try_charge keeps
        # usage <= max, so only forced charges push usage above max.  Forced
        # charges we saw recently (any cgroup: the tree may be unknown) excuse it.
        ent, ex = ep.get("entry"), ep.get("exit")
        if not ex or not ent or ent.get("max") != ex.get("max"):
            return
        if (self._last_forced_ns is not None
                and ts - self._last_forced_ns <= self.forced_window_ns):
            return
        if ex["usage"] > ex["max"] + self.over_max_slack:
            res.checks[-1] = ("charge", "divergent")
            res.divergences.append(Divergence(
                "charge", "over_max",
                f"usage {ex['usage']} > max {ex['max']} after a charge that was not forced", ep))

    def _new_kernel(self, nrel):
        k = Kernel(self.profile, cgroup=self.cgroup, cpus=1, swap_account=self.memsw)
        # the charged memcg is the deepest; other cgroups of the episode are its ancestors
        path = ""
        chain = []
        for rel in range(nrel - 1, 0, -1):
            path += f"/a{rel}"
            chain.append((rel, k.mkdir(path)))
        leaf = k.mkdir(path + "/m")
        cgroups = {0: leaf}
        for rel, m in chain:
            cgroups[rel] = m
        for m in cgroups.values():
            m.memory.max = _BIG
            if m.memsw is not None:
                m.memsw.max = _BIG
        leaf.charged = _BIG * 4
        return k, cgroups

    def _replay_charge(self, gfp, nr, ret, shape):
        """→ (verdict, reason, detail, events, forced)."""
        self.replays += 1
        p = self.profile
        # structural rules first: they hold whatever the interleaving
        if any(s[0] == "R" for s in shape) and not gfp & _DIRECT:
            return ("divergent", "reclaim_not_allowed",
                    f"reclaim in a charge with gfp {gfp:#x} (no __GFP_DIRECT_RECLAIM)", (), False)
        if order_of(nr) > 3 and any(s[0] in ("O", "K") for s in shape):
            return ("divergent", "oom_order",
                    f"OOM for a charge of {nr} pages (order {order_of(nr)} > 3)", (), False)
        if any(s[0] == "R" and s[6] is None for s in shape):
            return ("skipped", "", "", (), False)   # margin unknown: no `after` counters
        nrel = 1 + max((s[3] if s[0] == "F" else s[1]) or 0 for s in shape) if shape else 1
        variants = [dict()]
        variants.append(dict(pf_memalloc=True))
        if self.cgroup == "v1":
            variants.append(dict(in_oom=True))
            variants.append(dict(oom_kill_disable=True))
            if p.charge_move_wait:
                variants.append(dict(moving=True))
        first = None
        for v in variants:
            k, cgroups = self._new_kernel(nrel)
            task = _ReplayTask(pf_memalloc=v.get("pf_memalloc", False), in_user_fault=True)
            r = _Replay(k, "charge", shape, ret, gfp=gfp, nr=nr, drains_visible=self.drains_visible,
                        high_tail=p.sync_high_reclaim and self.cgroup == "v2" and bool(gfp & _DIRECT))
            r.cgroups, r.task, r.nomem = cgroups, task, None
            task._replay = r
            leaf = cgroups[0]
            for c in (leaf.memory, leaf.memsw):
                if c is not None:
                    c.__class__ = _ScriptedCounter
            if v.get("in_oom"):
                task.memcg_in_oom = leaf
            if v.get("oom_kill_disable"):
                for m in cgroups.values():
                    m.oom_kill_disable = True
            try:
                out = k.charge(leaf, nr, gfp, 0, r.reclaim, task=task, oom=r.oom, drain=r.drain,
                               moving=r.moving if v.get("moving") else None)
                final = out.steps[-1] if out.steps else None
                r.nomem = final.reason if final is not None and final.kind == "nomem" else None
                forced = any(s.kind == "force" for s in out.steps)
                if not r.at_end():
                    r.mismatch("returns " + (f"-ENOMEM ({r.nomem})" if out.ret else "0"))
                if out.ret != ret:
                    raise _Mismatch("ret_mismatch", f"model returns {out.ret}, kernel {ret}"
                                    + (f" (model: {r.nomem})" if r.nomem else ""))
            except _Mismatch as m:
                if first is None:
                    first = m
                continue
            except (RuntimeError, ValueError) as e:
                if first is None:
                    first = _Mismatch("replay_error", f"{type(e).__name__}: {e}")
                continue
            events = []
            for rel, m in cgroups.items():
                for name, n in m.memory_events_local.items():
                    if name in ("max", "oom", "oom_kill"):
                        events.append(((rel, name), n))
            return ("ok", "", "", tuple(events), forced)
        return ("divergent", first.reason, first.detail, (), False)

    # -- limit writes ---------------------------------------------------------------------
    def _check_limit(self, ep, res):
        if ep.get("complete") is False:
            res.checks.append(("limit_write", "skipped"))
            return
        cid = ep["cgroup_id"]
        fname = ep["file"]
        ret = ep["ret"]
        shape, ids = self._shape(ep, ep.get("steps") or (), cid)
        res.kills += sum(1 for s in shape if s[0] == "K")
        if not self._check_ancestry(ep, ids, res, "limit_write"):
            return
        v1_files = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        if (fname in v1_files) != (self.cgroup == "v1") or fname not in v1_files + ("memory.max", "memory.high"):
            self._flag(res, "limit_write", "malformed", f"file {fname} on cgroup {self.cgroup}", ep)
            return
        if any(s[0] == "F" for s in shape):
            # limit writes charge nothing: a charge's steps got mixed in
            self._flag(res, "limit_write", "malformed", "counter failure inside a limit write", ep)
            return
        # the replay depends on the values only through these (see below)
        if fname in v1_files:
            ent = ep.get("entry") or {}
            value = ep["value"]
            memsw_file = fname == "memory.memsw.limit_in_bytes"
            inv = (value >= ent.get("max", 0)) if memsw_file else (value <= ent.get("memsw_max", _BIG))
            key = ("v1_limit", fname, ret, bool(ent), inv, shape)
        else:
            key = ("v2_limit", fname, ret, ep.get("text"), ep.get("value"),
                   (ep.get("exit") or {}).get("max"), shape)
        out = self._cache.get(key)
        if out is None:
            if fname in v1_files:
                out = self._replay_v1_limit(ep, fname, ret, shape)
            else:
                out = self._replay_v2_limit(ep, fname, ret, shape)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = out
        verdict, reason, detail, events = out
        for (rel, name), n in events:
            g = ids[rel]
            res.events[(g, name)] = res.events.get((g, name), 0) + n
        if verdict == "divergent":
            self._flag(res, "limit_write", reason, detail, ep)
        else:
            res.checks.append(("limit_write", verdict))

    def _run_write(self, mode, shape, ret, fname, text, *, limit_max=0, entry=None):
        self.replays += 1
        nrel = 1 + max(((s[3] if s[0] == "F" else s[1]) or 0) for s in shape) if shape else 1
        k, cgroups = self._new_kernel(nrel)
        leaf = cgroups[0]
        r = _Replay(k, mode, shape, ret, drains_visible=self.drains_visible, limit_max=limit_max)
        task = _ReplayTask(in_user_fault=False)
        r.cgroups, r.task, r.nomem = cgroups, task, None
        task._replay = r
        if mode == "v1_limit":
            # the invariant memsw.max >= memory.max is checked on the values at entry
            leaf.memory.max = entry["max"]
            if leaf.memsw is not None:
                leaf.memsw.max = entry.get("memsw_max", _BIG)
            target = leaf.memsw if fname == "memory.memsw.limit_in_bytes" else leaf.memory
            if target is not None:
                target.__class__ = _ScriptedCounter
        else:
            r._prime(0)
        try:
            out = k.write_ex(leaf, fname, text, reclaim=r.reclaim, oom=r.oom, drain=r.drain, task=task)
            oom_steps = [s for s in out.steps if s.kind == "oom"]
            if oom_steps and not oom_steps[-1].ret:
                r.nomem = "oom"
            if not r.at_end():
                r.mismatch("returns")
            model_ret = out.ret
            if mode == "v2_write":
                want_ok = ret >= 0
                if (model_ret == 0) != want_ok or (not want_ok and model_ret != ret):
                    raise _Mismatch("ret_mismatch", f"model returns {model_ret}, kernel {ret}")
            elif model_ret != ret:
                raise _Mismatch("ret_mismatch", f"model returns {model_ret}, kernel {ret}")
        except _Mismatch as m:
            return ("divergent", m.reason, m.detail, ())
        except (RuntimeError, ValueError) as e:
            return ("divergent", "replay_error", f"{type(e).__name__}: {e}", ())
        events = []
        for rel, m in cgroups.items():
            for name, n in m.memory_events_local.items():
                if name in ("max", "oom", "oom_kill"):
                    events.append(((rel, name), n))
        return ("ok", "", "", tuple(events))

    def _replay_v1_limit(self, ep, fname, ret, shape):
        entry = ep.get("entry")
        if not entry:
            return ("skipped", "", "", ())
        value = ep["value"]
        text = "-1" if value >= (1 << 63) // PAGE_SIZE else str(value * PAGE_SIZE)
        return self._run_write("v1_limit", shape, ret, fname, text, entry=entry)

    def _replay_v2_limit(self, ep, fname, ret, shape):
        text = ep.get("text")
        value = ep.get("value")
        if text is None or (isinstance(value, int) and len(text) < value and len(text) >= 23):
            # the probe keeps 23 bytes; a longer value cannot be parsed back
            ex = ep.get("exit") or {}
            if "max" not in ex or fname != "memory.max":
                return ("skipped", "", "", ())
            text = "max" if ex["max"] >= (1 << 63) // PAGE_SIZE else str(ex["max"] * PAGE_SIZE)
        err, pages = page_counter_memparse(text.strip(), "max")
        if err:
            if shape or ret != err:
                return ("divergent", "ret_mismatch", f"model returns {err} for {text!r}, kernel {ret}", ())
            return ("ok", "", "", ())
        if ret >= 0 and isinstance(value, int) and ret != value:
            return ("divergent", "ret_mismatch", f"write of {value} bytes returned {ret}", ())
        return self._run_write("v2_write", shape, ret, fname, text, limit_max=pages)

    # -- page charge, kills, reclaim ----------------------------------------------------
    def _check_page_charge(self, ep, res):
        ret, nr, gfp = ep["ret"], ep["nr_pages"], ep["gfp"]
        ts = ep.get("ts_ns", 0)
        end = ts + (ep.get("duration_ns") or 0)
        nested = self._charges_by_tid.get(ep.get("tid"))
        if ret not in (-errno.ENOMEM, -errno.EINTR):
            self._flag(res, "page_charge", "page_charge_mismatch",
                       f"__mem_cgroup_charge returned {ret}; its charge returns 0 or -ENOMEM", ep)
            return
        if nested is not None and ts <= nested[0] and nested[1] <= end:
            if nested[3] != ret or nested[2] != nr:
                self._flag(res, "page_charge", "page_charge_mismatch",
                           f"returned {ret} for {nr} pages; its charge returned {nested[3]} "
                           f"for {nested[2]}", ep)
            else:
                res.checks.append(("page_charge", "ok"))
            return
        # no nested charge seen: can this gfp fail at all?  Replay a charge
        # whose every attempt fails and whose reclaims and OOMs do nothing.
        key = ("page", gfp, nr)
        can_fail = self._cache.get(key)
        if can_fail is None:
            k = Kernel(self.profile, cgroup=self.cgroup, cpus=1, swap_account=self.memsw)
            m = k.mkdir("m")
            m.memory.max = 0
            can_fail = k.charge(m, nr, gfp, 0).ret == -errno.ENOMEM
            self._cache[key] = can_fail
        if can_fail or ret == -errno.EINTR:
            res.checks.append(("page_charge", "ok"))
        else:
            self._flag(res, "page_charge", "page_charge_mismatch",
                       f"-ENOMEM for gfp {gfp:#x}, which the model always forces", ep)

    def _check_oom_kill(self, ep, res):
        if not isinstance(ep.get("victim_pid"), int):
            self._flag(res, "oom_kill", "malformed", "oom_kill without a victim_pid", ep)
            return
        res.kills += 1
        res.checks.append(("oom_kill", "ok"))

    def _check_reclaim(self, ep, res):
        freed, gfp = ep.get("ret"), ep.get("gfp")
        if not isinstance(freed, int) or freed < 0:
            self._flag(res, "reclaim", "malformed", f"reclaim freed {freed!r}", ep)
        elif isinstance(gfp, int) and not gfp & _DIRECT:
            self._flag(res, "reclaim", "reclaim_not_allowed",
                       f"memcg reclaim with gfp {gfp:#x} (no __GFP_DIRECT_RECLAIM)", ep)
        else:
            res.checks.append(("reclaim", "ok"))


# ---------------------------------------------------------------------------------
# aggregates


@dataclass(frozen=True)
class Tolerance:
    """How far a cgroupfs delta may be from what the episodes imply.

    ``slack``: always allowed (reads of the file and of the episode stream
    are not atomic: a charge in flight at the boundary counts in one window
    for the file and the next for the episodes).  ``per_lost``: added per
    event the ring buffer lost in the window.  ``unprobed``: kernel events
    from paths we do not probe may only *add* to the kernel side (one-sided).
    """
    slack: int = 2
    per_lost: int = 1
    unprobed: int = 0


def compare_count(check: str, reason: str, kernel_delta: int, implied: int, *,
                  tol: Tolerance = Tolerance(), lost: int = 0, one_sided: bool = False,
                  what: str = "") -> Divergence | None:
    """→ a Divergence if ``kernel_delta`` is outside ``implied`` ± tolerance.
    ``one_sided``: the kernel may count more (events we cannot see), not fewer."""
    low = implied - tol.slack - tol.per_lost * lost
    high = implied + tol.slack + tol.per_lost * lost + tol.unprobed
    if one_sided:
        high = None
    if kernel_delta < low or (high is not None and kernel_delta > high):
        return Divergence(check, reason, f"{what}kernel {kernel_delta}, episodes imply {implied}"
                          f" (allowed {max(low, 0)}..{'∞' if high is None else high})")
    return None


class AggregateChecker:
    """Compares cgroupfs counters with what the episodes imply, per cgroup.

    Two ways in.  Pure: ``observe(result)`` for each ``CheckResult`` of the
    window, then ``check_v1`` / ``check_v2`` per cgroup with the *deltas* of
    the window, then ``reset()``.  Daemon: ``check(raw, watched, window,
    aggregates)`` once per interval with absolute cgroupfs values
    (``{path: snapshot with .failcnt / .events}``), ``{cgroup_id: path}``,
    the window's episode dicts and the in-kernel aggregates; it keeps the
    previous values, replays the window itself (shape-cached) and returns a
    ``CheckResult``.  The first call only records a baseline.
    """

    def __init__(self, profile: str, cgroup: str, memsw: bool, tol: Tolerance = Tolerance()):
        self.profile = get_profile(profile)
        if cgroup not in ("v1", "v2"):
            raise ValueError(f"cgroup must be 'v1' or 'v2', not {cgroup!r}")
        self.cgroup = cgroup
        self.memsw = memsw
        self.tol = tol
        self._checker = None
        self._prev: dict = {}          # cgroup_id -> (failcnt dict, events dict, kernel failures dict)
        self._prev_lost = None
        self.reset()

    def reset(self) -> None:
        self.failures: Counter = Counter()   # (cgroup_id, counter) -> n
        self.events: Counter = Counter()     # (cgroup_id, name) -> n
        self.kills = 0

    def observe(self, result: CheckResult) -> None:
        self.failures.update(result.failures)
        self.events.update(result.events)
        self.kills += result.kills

    def observe_episodes(self, episodes) -> None:
        """Check a window's episodes (dicts) with this checker's own
        CrossChecker (shape-cached) and observe the results."""
        if self._checker is None:
            self._checker = CrossChecker(self.profile, self.cgroup, self.memsw)
        for ep in episodes:
            self.observe(self._checker.check(ep))

    def check_v1(self, cgroup_id: int, failcnt_delta: int, memsw_failcnt_delta: int | None = None,
                 kernel_failures: Mapping | None = None, lost: int = 0) -> list[Divergence]:
        """v1 ``memory.failcnt`` (and ``memory.memsw.failcnt``) deltas.

        ``kernel_failures``: the in-kernel count of failed page_counter_try_charge
        calls at this cgroup's level in the window (``{"memory": n, "memsw": n}``):
        when given, the files must match it (two-sided, read skew only).
        Otherwise they are compared with the failures in the episodes, one-sided:
        a charge whose batch attempt failed and whose retry succeeded is not
        an episode (its failure stays in the kernel), so the file may be higher.
        """
        out = []
        d = self._failcnt(cgroup_id, "memory", failcnt_delta, kernel_failures, lost)
        if d:
            out.append(d)
        if memsw_failcnt_delta is not None:
            d = self._failcnt(cgroup_id, "memsw", memsw_failcnt_delta, kernel_failures, lost)
            if d:
                out.append(d)
        return out

    def _failcnt(self, cgroup_id, counter, delta, kernel_failures, lost):
        check = "failcnt" if counter == "memory" else "memsw_failcnt"
        one_sided = False
        if counter == "memsw" and self.profile.track_failcnt:
            implied = 0   # 6.18: only the v1 memory counter tracks failcnt
        elif kernel_failures is not None and counter in kernel_failures:
            implied = kernel_failures[counter]
        else:
            implied = self.failures.get((cgroup_id, counter), 0)
            one_sided = True
        return compare_count(check, f"{check}_mismatch", delta, implied, tol=self.tol, lost=lost,
                             one_sided=one_sided, what=f"cgroup {cgroup_id} {counter}: ")

    def check_v2(self, cgroup_id: int, events_local_delta: Mapping, lost: int = 0) -> list[Divergence]:
        """v2 ``memory.events.local`` deltas (ints or text) of ``max``, ``oom``,
        ``oom_kill``.  ``max`` and ``oom`` are what the model raised replaying
        the window's episodes on this cgroup (one ``max`` per reclaim pass
        with it as the failing level, plus a forced charge's on 6.1+; one
        ``oom`` per mem_cgroup_oom of order <= 3 and per memory.max write
        OOM).  Kills are seen (oom:mark_victim) but attributed to the cgroup
        whose OOM ran, while the kernel counts them on the victim's cgroup:
        a cgroup is only flagged for more kills than were seen in all."""
        out = []
        delta = {k: int(v) for k, v in events_local_delta.items()}
        for name in ("max", "oom"):
            if name not in delta:
                continue
            implied = self.events.get((cgroup_id, name), 0)
            # >= 6.1 a forced charge raises max; one forced right after its
            # counter failures is not an episode, so the kernel may count more
            one_sided = name == "max" and self.profile.forced_charge_raises_max
            d = compare_count(f"events_{name}", f"events_{name}_mismatch", delta[name], implied,
                              tol=self.tol, lost=lost, one_sided=one_sided,
                              what=f"cgroup {cgroup_id} {name}: ")
            if d:
                out.append(d)
        if delta.get("oom_kill", 0) > self.kills + self.tol.slack + self.tol.per_lost * lost:
            out.append(Divergence("events_oom_kill", "events_oom_kill_mismatch",
                                  f"cgroup {cgroup_id} oom_kill: kernel {delta['oom_kill']}, "
                                  f"{self.kills} kills seen in all"))
        return out

    # -- the daemon's entry point -------------------------------------------------------
    def check(self, raw: Mapping, watched: Mapping, window=None, aggregates=None) -> CheckResult:
        """``window``: the interval's episodes to replay here; None when the
        caller already fed each episode's CheckResult to ``observe`` (the
        daemon does: every episode is replayed once, by its CrossChecker).
        Observed counts are consumed: the next interval starts from zero."""
        res = CheckResult()
        if window is not None:
            self.reset()
            self.observe_episodes(window)
        try:
            self._check_window(raw, watched, aggregates, res)
        finally:
            self.reset()
        return res

    def _check_window(self, raw: Mapping, watched: Mapping, aggregates, res: CheckResult) -> None:
        kagg = getattr(aggregates, "cgroups", None) or {}
        lost_now = sum(getattr(aggregates, "lost_per_cpu", None) or [])
        lost = max(0, lost_now - self._prev_lost) if self._prev_lost is not None else 0
        self._prev_lost = lost_now
        for cid, path in watched.items():
            snap = raw.get(path)
            if snap is None:
                continue
            ka = kagg.get(cid)
            kfail = dict(getattr(ka, "counter_failures", None) or {})
            cur = (dict(getattr(snap, "failcnt", {}) or {}), dict(getattr(snap, "events", {}) or {}), kfail)
            prev = self._prev.get(cid)
            self._prev[cid] = cur
            if prev is None:
                continue   # baseline
            if self.cgroup == "v1":
                checks = self._window_v1(cid, prev, cur, lost)
            else:
                checks = self._window_v2(cid, prev, cur, lost)
            for check, divs in checks:
                for d in divs:
                    res.divergences.append(Divergence(d.check, d.reason, d.detail,
                                                      {"cgroup_id": cid, "cgroup": path}))
                res.checks.append((check, "divergent" if divs else "ok"))
        for cid in [c for c in self._prev if c not in watched]:
            del self._prev[cid]

    def _window_v1(self, cid, prev, cur, lost):
        out = []
        (pf, _, pk), (cf, _, ck) = prev, cur
        for counter, check in (("memory", "failcnt"), ("memsw", "memsw_failcnt")):
            if counter not in cf or counter not in pf:
                continue
            delta = cf[counter] - pf[counter]
            if delta < 0:
                out.append((check, []))   # reset by a write to the file: a new baseline
                continue
            kern = None
            if counter in ck:
                kern = {counter: ck[counter] - pk.get(counter, 0)}
            d = self._failcnt(cid, counter, delta, kern, lost)
            out.append((check, [d] if d else []))
        return out

    def _window_v2(self, cid, prev, cur, lost):
        (_, pe, _), (_, ce, _) = prev, cur
        delta = {k: ce[k] - pe[k] for k in ("max", "oom", "oom_kill") if k in ce and k in pe}
        divs = self.check_v2(cid, delta, lost)
        out = []
        for name in ("max", "oom", "oom_kill"):
            if name in delta:
                out.append((f"events_{name}", [d for d in divs if d.check == f"events_{name}"]))
        return out
