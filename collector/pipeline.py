"""The check pipeline: episodes in; checks, divergences and the counts the
metrics need out.  `run` (through the Daemon), `record --check`, `replay`
and `validate` all feed the same object, so a recording checks offline
exactly as it checked live.

    p = CheckPipeline(resolution.profile, "v2", memsw=False, visibility=session.visibility())
    result = p.feed(episode_dict)                 # CheckResult of that episode
    p.check_aggregates(raw, watched, aggregates)  # once per interval (run)
    p.counts()                                    # a snapshot, safe from any thread

A bug of ours (the model or the checker raising) is a ``replay_error``
divergence, counted and logged; it never escapes ``feed``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

from memcgscope.probes.episodes import Visibility

from .crosscheck import AggregateChecker, CheckResult, CrossChecker, Divergence

__all__ = ["CheckPipeline", "PipelineCounts", "check_of_kind"]

log = logging.getLogger(__name__)

_CHECK_OF_KIND = {"charge": "charge", "limit_write": "limit_write", "page_charge_fail": "page_charge",
                  "oom_kill": "oom_kill", "reclaim": "reclaim", "over_high": "over_high"}


def check_of_kind(kind) -> str:
    return _CHECK_OF_KIND.get(kind, "episode")


@dataclass(frozen=True)
class PipelineCounts:
    """A copy of the pipeline's counters (taken under its lock)."""
    episodes: Mapping[str, int] = field(default_factory=dict)            # kind -> n
    checks: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (check, verdict) -> n
    divergences: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (check, reason) -> n
    replay_errors: int = 0

    @property
    def total_divergences(self) -> int:
        return sum(self.divergences.values())


class CheckPipeline:
    """One kernel's episodes against one model profile.

    ``profile``: a profile (or its name) — the caller resolves it once with
    model.profiles.resolve_profile and records it.  ``visibility``: what the
    probes could see (probes.episodes.Visibility).  ``ancestors``: see
    CrossChecker.  ``on_divergence(divergence, episode)``: called for each
    divergence (the daemon's divergence log).
    """

    def __init__(self, profile, cgroup: str, memsw: bool, visibility: Visibility | None = None, *,
                 ancestors=None, on_divergence: Callable[[Divergence, dict | None], None] | None = None):
        visibility = visibility or Visibility()
        self.visibility = visibility
        self.checker = CrossChecker(profile, cgroup, memsw, ancestors=ancestors,
                                    drains_visible=visibility.drains,
                                    forced_charges_visible=visibility.forced_charges)
        self.profile = self.checker.profile
        self.cgroup = cgroup
        self.memsw = memsw
        # two-sided `max` check where every forced charge is an episode
        self.aggregates = AggregateChecker(self.profile, cgroup, memsw,
                                           forced_charges_visible=visibility.forced_charges,
                                           drains_visible=visibility.drains)
        self.on_divergence = on_divergence
        self._lock = threading.Lock()
        self._episodes: Counter = Counter()
        self._checks: Counter = Counter()
        self._divergences: Counter = Counter()
        self._replay_errors = 0

    def feed(self, episode: dict) -> CheckResult:
        """Checks one episode (its JSON form) and counts the result."""
        kind = episode.get("kind") if isinstance(episode, dict) else None
        try:
            result = self.checker.check(episode)
        except Exception as e:   # a bug of ours: never stop the caller for it
            result = self._replay_error(check_of_kind(kind), e, episode)
        try:
            self.aggregates.observe(result)
        except Exception as e:
            log.warning("observing a check result failed: %s", e, exc_info=True)
        self._count(result, episode, kind)
        return result

    def check_aggregates(self, raw: Mapping, watched: Mapping, aggregates, busy=()) -> CheckResult:
        """The interval's aggregate checks (cgroupfs counters against what
        the episodes fed since the last call imply); ``busy`` cgroups (an
        episode in progress at or below them) stay open to the next call."""
        try:
            result = self.aggregates.check(raw, watched, None, aggregates, busy=busy)
        except Exception as e:
            result = self._replay_error("aggregate", e, None)
        self._count(result, None, None)
        return result

    def _replay_error(self, check: str, e: Exception, episode) -> CheckResult:
        log.warning("replaying a %s episode failed (a bug of memcgscope; please report it with the "
                    "divergence log): %s: %s", check, type(e).__name__, e, exc_info=True)
        with self._lock:
            self._replay_errors += 1
        res = CheckResult()
        res.checks.append((check, "divergent"))
        res.divergences.append(Divergence(check, "replay_error", f"{type(e).__name__}: {e}", episode))
        return res

    def _count(self, result: CheckResult, episode, kind) -> None:
        checks = self._checks
        with self._lock:
            if kind is not None:
                self._episodes[kind] += 1
            for c in result.checks:     # (check, verdict) tuples: the key as it is
                checks[c] += 1
            for div in result.divergences:
                self._divergences[(div.check, div.reason)] += 1
        if result.divergences and self.on_divergence is not None:
            for div in result.divergences:
                try:
                    self.on_divergence(div, episode if episode is not None else div.episode)
                except Exception as e:
                    log.warning("writing a divergence failed: %s", e)

    def counts(self) -> PipelineCounts:
        with self._lock:
            return PipelineCounts(dict(self._episodes), dict(self._checks), dict(self._divergences),
                                  self._replay_errors)
