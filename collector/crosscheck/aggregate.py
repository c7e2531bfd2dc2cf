"""Aggregate checks: cgroupfs counters (v1 ``memory.failcnt``,
``memory.memsw.failcnt``; v2 ``memory.events.local``) against what the
episodes of an interval imply, per watched cgroup."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from memcgscope.model import get_profile

from .checker import CrossChecker
from .reasons import CheckResult, Divergence

__all__ = ["Tolerance", "compare_count", "AggregateChecker"]


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


def _add(counter: Counter, counts) -> None:
    """``counter.update(counts)``; plain dicts (what CheckResult holds) added
    in place, anything else left to Counter."""
    if not counts:
        return
    if type(counts) is dict:
        get = counter.get
        for k, n in counts.items():
            counter[k] = get(k, 0) + n
    else:
        counter.update(counts)


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

    def __init__(self, profile: str, cgroup: str, memsw: bool, tol: Tolerance = Tolerance(), *,
                 forced_charges_visible: bool = False, drains_visible: bool = False):
        self.profile = get_profile(profile)
        if cgroup not in ("v1", "v2"):
            raise ValueError(f"cgroup must be 'v1' or 'v2', not {cgroup!r}")
        self.cgroup = cgroup
        self.memsw = memsw
        self.tol = tol
        #: every forced charge is an episode (the charge core and
        #: page_counter_try_charge are probed): the v2 ``max`` count is
        #: then held two-sided (see check_v2)
        self.forced_charges_visible = forced_charges_visible
        self.drains_visible = drains_visible
        self._checker = None
        self._prev: dict = {}          # cgroup_id -> (failcnt dict, events dict, kernel failures dict)
        self._prev_lost = None
        self.reset()

    def reset(self) -> None:
        self.failures: Counter = Counter()   # (cgroup_id, counter) -> n
        self.events: Counter = Counter()     # (cgroup_id, name) -> n
        self.kills = 0
        self.victims: Counter = Counter()    # victim's cgroup_id -> kills
        self.unknown_victims = 0             # kills whose victim's cgroup was not read

    def observe(self, result: CheckResult) -> None:
        # once per episode: Counter.update's own checks (an abc isinstance
        # per call) cost more than the adding; most results carry no
        # failures and no victims
        if result.failures:
            _add(self.failures, result.failures)
        ev = result.events
        if ev:   # most charges raise a max event or an oom: _add inline
            if type(ev) is dict:
                counter = self.events
                get = counter.get
                for k, n in ev.items():
                    counter[k] = get(k, 0) + n
            else:
                self.events.update(ev)
        kills = result.kills
        self.kills += kills
        victims = getattr(result, "victims", None)
        if victims:
            known = sum(victims.values())
            _add(self.victims, victims)
        else:
            known = 0
        if kills > known:
            self.unknown_victims += kills - known

    def observe_episodes(self, episodes) -> None:
        """Check a window's episodes (dicts) with this checker's own
        CrossChecker (shape-cached) and observe the results."""
        if self._checker is None:
            self._checker = CrossChecker(self.profile, self.cgroup, self.memsw,
                                         drains_visible=self.drains_visible,
                                         forced_charges_visible=self.forced_charges_visible)
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
        tracked = self.profile.failcnt_counters
        if tracked is not None and counter not in tracked:
            implied = 0   # 6.15–6.18.49, 7.2.0–7.2.3: memsw counts no failures
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
        with it as the failing level, plus a forced charge's on 6.1+ and a
        rejected one's on 7.3.4+; one ``oom`` per mem_cgroup_oom of order
        <= 3 and per memory.max write OOM).  ``max`` is one-sided on 6.1+
        unless every forced charge is an episode (``forced_charges_visible``):
        then the kernel may count neither fewer nor more than implied, within
        the tolerance.  Kills are counted by the kernel on the victim's own
        cgroup: where the probe read every victim's cgroup the ``oom_kill``
        check is per cgroup and two-sided; otherwise a cgroup is only
        flagged for more kills than its known victims and all the kills of
        unknown victims together."""
        out = []
        delta = {k: int(v) for k, v in events_local_delta.items()}
        for name in ("max", "oom"):
            if name not in delta:
                continue
            implied = self.events.get((cgroup_id, name), 0)
            # >= 6.1 a forced charge raises max; one forced right after its
            # counter failures is an episode only where the charge core and
            # page_counter_try_charge are probed: elsewhere the kernel may
            # count more.  (A rejected charge, whose 7.3.4+ max event enters
            # `implied`, is an episode whenever charges are probed: it failed.)
            one_sided = (name == "max" and self.profile.forced_charge_raises_max
                         and not self.forced_charges_visible)
            d = compare_count(f"events_{name}", f"events_{name}_mismatch", delta[name], implied,
                              tol=self.tol, lost=lost, one_sided=one_sided,
                              what=f"cgroup {cgroup_id} {name}: ")
            if d:
                out.append(d)
        if "oom_kill" in delta:
            if self.unknown_victims == 0:
                # every victim's cgroup was read: the kernel counts each kill
                # on its victim's cgroup, so the check is per cgroup, two-sided
                d = compare_count("events_oom_kill", "events_oom_kill_mismatch", delta["oom_kill"],
                                  self.victims.get(cgroup_id, 0), tol=self.tol, lost=lost,
                                  what=f"cgroup {cgroup_id} oom_kill (victims): ")
                if d:
                    out.append(d)
            elif delta["oom_kill"] > (self.victims.get(cgroup_id, 0) + self.unknown_victims + self.tol.slack
                                      + self.tol.per_lost * lost):
                out.append(Divergence("events_oom_kill", "events_oom_kill_mismatch",
                                      f"cgroup {cgroup_id} oom_kill: kernel {delta['oom_kill']}, "
                                      f"{self.victims.get(cgroup_id, 0)} kills of its tasks and "
                                      f"{self.unknown_victims} of unknown cgroups seen"))
        return out

    # -- the daemon's entry point -------------------------------------------------------
    def check(self, raw: Mapping, watched: Mapping, window=None, aggregates=None,
              busy: Collection[int] = ()) -> CheckResult:
        """``window``: the interval's episodes to replay here; None when the
        caller already fed each episode's CheckResult to ``observe`` (the
        daemon does: every episode is replayed once, by its CrossChecker).
        ``busy``: watched cgroups with an episode in progress at or below
        them. Their files already count what that episode raised (a ``max``
        per reclaim pass of an OOM loop: dozens) while its replay comes with
        its exit, so their window is not closed now: no check, the baseline
        and what was observed for them carry over to the next interval.
        Observed counts of the others are consumed: their next interval
        starts from zero."""
        res = CheckResult()
        if window is not None:
            self.reset()
            self.observe_episodes(window)
        busy = set(busy)
        try:
            self._check_window(raw, watched, aggregates, res, busy)
        finally:
            self._reset_except(busy)
        return res

    def _reset_except(self, keep: set) -> None:
        if not keep:
            self.reset()
            return
        failures = Counter({k: n for k, n in self.failures.items() if k[0] in keep})
        events = Counter({k: n for k, n in self.events.items() if k[0] in keep})
        victims = Counter({k: n for k, n in self.victims.items() if k in keep})
        # kills of unknown cgroups only widen the allowance of the one-sided
        # oom_kill check: carried while a window stays open, so it keeps them
        unknown = self.unknown_victims
        self.reset()
        self.failures, self.events, self.victims, self.unknown_victims = failures, events, victims, unknown

    def _check_window(self, raw: Mapping, watched: Mapping, aggregates, res: CheckResult,
                      busy: Collection[int] = ()) -> None:
        kagg = getattr(aggregates, "cgroups", None) or {}
        lost_now = sum(getattr(aggregates, "lost_per_cpu", None) or [])
        lost = max(0, lost_now - self._prev_lost) if self._prev_lost is not None else 0
        self._prev_lost = lost_now
        for cid, path in watched.items():
            snap = raw.get(path)
            if snap is None or cid in busy:
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
