"""``CrossChecker``: the front of the per-episode checks.

``check(episode) -> CheckResult`` never raises.  Input problems (a missing
or ill-typed field, an unknown step) give ``malformed`` with the field
named; anything the model or the checker raises while replaying gives
``replay_error`` with the exception, counted in ``replay_errors``.

Replays are pure functions of the episode's *shape* (episode.py) and the
few fields that go with it in the key, so their outcome is cached by key:
a common episode costs building its shape and a cache lookup.
"""

from __future__ import annotations

from memcgscope.model import get_profile

from .cache import ShapeCache
from .charge import charge_outcome, with_counts
from .episode import ancestry_fn, as_ints, exit_fits, problem_of, shape_of
from .limits import BIG, V1_FILES, V2_FILES, replay_v1_limit, replay_v2_limit
from .reasons import CHECK_OF_KIND, BadInput, CheckResult, Divergence
from .standalone import check_oom_kill, check_over_high, check_over_max, check_page_charge, check_reclaim

__all__ = ["CrossChecker", "SHAPE_CACHE_SIZE"]

#: outcomes kept (segmented: shapes seen once cannot evict recurring ones)
SHAPE_CACHE_SIZE = 50_000
#: tasks whose last charge is kept for the page-charge check
_TIDS_MAX = 65536


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def count_victims(steps, res) -> None:
    """Kills whose victim's cgroup the probe read (oom:mark_victim with the
    victim's task): counted on that cgroup, where the kernel counts them
    (__oom_kill_process: memcg_memory_event_mm(victim's mm, MEMCG_OOM_KILL))."""
    for s in steps:
        if isinstance(s, dict) and s.get("kind") == "oom_kill":
            v = s.get("victim_cgroup_id")
            if type(v) is int and v:
                res.victims[v] = res.victims.get(v, 0) + 1


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
    PF_MEMALLOC or __GFP_HIGH, is unseen and could explain the excess);
    ``AggregateChecker`` takes the same flag for its two-sided ``max``.
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
        self.ancestors = ancestry_fn(ancestors)
        self.drains_visible = drains_visible
        self.forced_charges_visible = forced_charges_visible
        self.over_max_slack = over_max_slack
        self.forced_window_ns = forced_window_ns
        self._cache = ShapeCache(SHAPE_CACHE_SIZE)
        self._hot = self._cache.hot       # the lookup of nearly every episode
        self._last_forced_ns = None       # ts of the last (possibly) forced charge seen
        self._charges_by_tid: dict = {}   # tid -> (ts, end, nr, ret) of its last charge
        self.replays = 0                  # full model replays run (cache misses)
        self.replay_errors = 0            # episodes whose replay raised (bugs of ours)

    # -- entry point -----------------------------------------------------------------
    def check(self, ep: dict) -> CheckResult:
        res = CheckResult()
        kind = ep.get("kind") if isinstance(ep, dict) else None
        handler = _HANDLERS.get(kind)
        if handler is None:
            self.flag(res, "episode", "malformed", f"kind: unknown episode kind {kind!r}", ep)
            return res
        try:
            handler(self, ep, res)
        except BadInput as e:
            res = self._failed(kind, ep, e.detail, None)
        except Exception as e:
            res = self._failed(kind, ep, "", e)
        return res

    def _failed(self, kind, ep, detail, exc) -> CheckResult:
        """A check stopped on an exception: the input's fault if the
        validator names a field, ours otherwise.  Partial counts are dropped."""
        res = CheckResult()
        try:
            problem = problem_of(ep, self.cgroup, self.memsw)
        except Exception as e:     # the validator itself failed: ours
            problem, exc = None, exc or e
        check = CHECK_OF_KIND.get(kind, "episode")
        if problem or (detail and exc is None):
            self.flag(res, check, "malformed", problem or detail, ep)
        else:
            why = _error(exc) if exc is not None else "the fast path refused a field the validator accepts"
            self.flag(res, check, "replay_error", why, ep)
        return res

    def flag(self, res, check, reason, detail, ep):
        if reason == "replay_error":
            self.replay_errors += 1
        res.checks.append((check, "divergent"))
        res.divergences.append(Divergence(check, reason, detail, ep))

    def _valid_or_raise(self, ep):
        problem = problem_of(ep, self.cgroup, self.memsw)
        if problem:
            raise BadInput(problem)

    def _check_ancestry(self, ep, ids, res, check) -> bool:
        if self.ancestors is None or len(ids) == 1:
            return True
        anc = self.ancestors(ids[0])
        if anc is None:
            return True
        allowed = set(anc)
        for g in ids[1:]:
            if g not in allowed:
                self.flag(res, check, "bad_ancestry",
                          f"step on cgroup {g}, not {ids[0]} or an ancestor", ep)
                return False
        return True

    # -- charge ------------------------------------------------------------------------
    def _check_charge(self, ep, res):
        get = ep.get
        if get("complete") is False:
            res.checks.append(("charge", "skipped"))
            return
        cid = ep["cgroup_id"]
        gfp, nr, ret = ep["gfp"], ep["nr_pages"], ep["ret"]
        # gfp, nr, ret and the steps are in the key, validated when it was
        # first seen; cid is not (the timestamps are only added and compared:
        # what breaks that raises, and the validator names it)
        if type(cid) is not int:
            raise BadInput()
        steps = get("steps") or ()
        shape, ids = shape_of(steps, cid, self.memsw)
        if self.ancestors is not None and not self._check_ancestry(ep, ids, res, "charge"):
            return
        # a success right after a reclaim that left no room: the margin read
        # may have seen an uncharge, unless the charge ended over its max
        fits = (exit_fits(ep, self.memsw)
                if ret == 0 and shape and shape[-1][0] == "R" and shape[-1][6] is False else None)
        key = ("charge", gfp, nr, ret, shape, fits)
        out = self._hot(key)
        if out is None and (out := self._cache.get(key)) is None:
            self._valid_or_raise(ep)     # a cached key comes from a valid episode
            self.replays += 1
            try:
                out = charge_outcome(self, int(gfp), int(nr), int(ret), as_ints(shape), fits)
            except Exception as e:
                out = with_counts(shape, "divergent", "replay_error", _error(e), (), False)
            self._cache.put(key, out)
        verdict, reason, detail, events, forced, fails, kills = out
        # per-cgroup counts for the aggregate checks (rel -> id of this episode)
        for (rel, name), n in events:
            k = (ids[rel], name)
            res.events[k] = res.events.get(k, 0) + n
        for (rel, counter), n in fails:
            k = (ids[rel], counter)
            res.failures[k] = res.failures.get(k, 0) + n
        if kills:
            # kills counts the shape's oom_kill steps (with_counts): none, no victims
            res.kills += kills
            count_victims(steps, res)
        ts = get("ts_ns", 0)
        tids = self._charges_by_tid
        if len(tids) > _TIDS_MAX:
            tids.clear()     # only the latest charge of a task is ever asked for
        dur = get("duration_ns")
        tids[get("tid")] = (ts, ts if dur is None else ts + dur, nr, ret)
        if forced:
            self._last_forced_ns = ts
        if verdict == "divergent":
            self.flag(res, "charge", reason, detail, ep)
            return
        res.checks.append(("charge", verdict))
        if (ret == 0 and verdict == "ok" and not forced and self.cgroup == "v1"
                and self.forced_charges_visible):
            check_over_max(self, ep, res, ts)

    # -- limit writes ---------------------------------------------------------------------
    def _check_limit(self, ep, res):
        if ep.get("complete") is False:
            res.checks.append(("limit_write", "skipped"))
            return
        cid = ep["cgroup_id"]
        fname = ep["file"]
        ret = ep["ret"]
        if type(cid) is not int:
            raise BadInput()
        shape, ids = shape_of(ep.get("steps") or (), cid, self.memsw)
        kills, fails = 0, False
        for s in shape:     # one pass (an OOM loop's shape has hundreds of steps)
            c = s[0]
            if c == "K":
                kills += 1
            elif c == "F":
                fails = True
        if kills:
            res.kills += kills
            count_victims(ep.get("steps") or (), res)
        if not self._check_ancestry(ep, ids, res, "limit_write"):
            return
        if (fname in V1_FILES) != (self.cgroup == "v1") or fname not in V1_FILES + V2_FILES:
            self.flag(res, "limit_write", "malformed", f"file: {fname} on cgroup {self.cgroup}", ep)
            return
        if fails:
            # limit writes charge nothing: a charge's steps got mixed in
            self.flag(res, "limit_write", "malformed", "steps: counter failure inside a limit write", ep)
            return
        # the replay depends on the values only through these (see limits.py)
        if fname in V1_FILES:
            ent = ep.get("entry") or {}
            value = ep["value"]
            if type(value) is not int or value < 0:     # not in the key: checked here
                raise BadInput()
            memsw_file = fname == "memory.memsw.limit_in_bytes"
            inv = (value >= ent.get("max", 0)) if memsw_file else (value <= ent.get("memsw_max", BIG))
            key = ("v1_limit", fname, ret, bool(ent), bool(inv), shape)
        else:
            key = ("v2_limit", fname, ret, ep.get("text"), ep.get("value"),
                   (ep.get("exit") or {}).get("max"), shape)
        out = self._hot(key)
        if out is None and (out := self._cache.get(key)) is None:
            self._valid_or_raise(ep)     # a cached key comes from a valid episode
            try:
                if fname in V1_FILES:
                    out = replay_v1_limit(self, ep, fname, int(ret), as_ints(shape), bool(inv))
                else:
                    out = replay_v2_limit(self, ep, fname, int(ret), as_ints(shape))
            except Exception as e:
                out = ("divergent", "replay_error", _error(e), ())
            self._cache.put(key, out)
        verdict, reason, detail, events = out
        for (rel, name), n in events:
            g = ids[rel]
            res.events[(g, name)] = res.events.get((g, name), 0) + n
        if verdict == "divergent":
            self.flag(res, "limit_write", reason, detail, ep)
        else:
            res.checks.append(("limit_write", verdict))

    # -- page charge, kills, reclaim ----------------------------------------------------
    def _check_page_charge(self, ep, res):
        ret, nr, gfp = ep["ret"], ep["nr_pages"], ep["gfp"]
        if type(ret) is not int or type(nr) is not int or type(gfp) is not int or nr < 1:
            raise BadInput()
        check_page_charge(self, ep, res)


_HANDLERS = {
    "charge": CrossChecker._check_charge,
    "limit_write": CrossChecker._check_limit,
    "page_charge_fail": CrossChecker._check_page_charge,
    "oom_kill": check_oom_kill,
    "reclaim": check_reclaim,
    "over_high": check_over_high,
}
