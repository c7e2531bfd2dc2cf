"""What a check says: the bounded sets of check names and divergence
reasons (both are Prometheus labels), ``Divergence`` and ``CheckResult``.
collector/README.md, section "Cross-check", documents every reason."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "CHECKS", "Divergence", "CheckResult", "Mismatch", "BadInput",
           "CHECK_OF_KIND"]

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
    "high_penalty": "the memory.high penalty sleep outside what the model's formula allows (own overage .. 2 s)",
    "malformed": "the episode lacks fields, has ill-typed ones or unknown steps (the field is named)",
    "replay_error": "the model or the checker raised while replaying (a bug of ours)",
    # aggregates
    "failcnt_mismatch": "v1 memory.failcnt delta vs counter failures seen",
    "memsw_failcnt_mismatch": "v1 memory.memsw.failcnt delta vs counter failures seen",
    "events_max_mismatch": "v2 memory.events.local max delta vs reclaim passes and forced charges",
    "events_oom_mismatch": "v2 memory.events.local oom delta vs OOM calls",
    "events_oom_kill_mismatch": "v2 memory.events.local oom_kill delta vs kills seen",
}
CHECKS = ("charge", "limit_write", "page_charge", "oom_kill", "reclaim", "over_high",
          "failcnt", "memsw_failcnt", "events_max", "events_oom", "events_oom_kill")

#: the check an episode kind is counted under ("episode" for an unknown kind)
CHECK_OF_KIND = {"charge": "charge", "limit_write": "limit_write",
                 "page_charge_fail": "page_charge", "oom_kill": "oom_kill", "reclaim": "reclaim",
                 "over_high": "over_high"}


@dataclass(frozen=True)
class Divergence:
    check: str
    reason: str
    detail: str
    episode: dict | None = None


class CheckResult:
    """What checking one episode (or one window) found.  A plain class with
    slots, not a dataclass: one is made per episode, and five
    default_factory calls cost twice this __init__ (bench_collector.py)."""
    __slots__ = ("checks", "divergences", "events", "failures", "kills", "victims")

    def __init__(self, checks=None, divergences=None, events=None, failures=None, kills: int = 0,
                 victims=None):
        self.checks: list = [] if checks is None else checks                # [(check, verdict)]
        self.divergences: list = [] if divergences is None else divergences  # [Divergence]
        #: memory events the model raised replaying this episode: {(cgroup_id, name): n}
        self.events: dict = {} if events is None else events
        #: counter failures seen: {(cgroup_id, counter): n}
        self.failures: dict = {} if failures is None else failures
        #: OOM kills seen (all attributed to the cgroup whose OOM ran)
        self.kills = kills
        #: of those, the kills whose victim's own cgroup is known: {cgroup_id: n}
        self.victims: dict = {} if victims is None else victims

    def __repr__(self) -> str:
        return (f"CheckResult(checks={self.checks!r}, divergences={self.divergences!r}, "
                f"events={self.events!r}, failures={self.failures!r}, kills={self.kills!r}, "
                f"victims={self.victims!r})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CheckResult):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @property
    def ok(self) -> bool:
        return not self.divergences


class Mismatch(Exception):
    """The model wants something the kernel did not do (or the reverse):
    the replay stops with this reason."""

    def __init__(self, reason, detail):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class BadInput(Exception):
    """The episode is malformed; ``detail`` names the field when the fast
    path knows it (otherwise the validator is asked)."""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail
