"""Validating a kernel: each scenario run on it under the probes and
through the model, compared field by field.

`Validator` holds what is shared by every scenario of one run: the probe
session, the profile resolved for the kernel, the facts that decide which
scenarios apply (hierarchy, swap, THP, memsw), the scratch parent.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from .compare import Row, compare, episode_rows, run_model
from .plan import Plan, Tolerance, load_plan
from .runner import KernelRun, ScenarioRunner

__all__ = ["Facts", "Validator", "ScenarioReport", "builtin_scenarios", "not_applicable"]

SCENARIO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "model", "scenarios")


def builtin_scenarios() -> list[str]:
    """The built-in suite: model/scenarios/*.toml."""
    return sorted(glob.glob(os.path.join(SCENARIO_DIR, "*.toml")))


@dataclass(frozen=True)
class Facts:
    """What the host (or guest) offers a scenario."""
    cgroup: str                  # v1 | v2: where the memory controller is
    swap: bool                   # a swap device is on
    memsw: bool                  # v1 swap accounting (memory.memsw.* files)
    thp: str                     # the system's THP setting: always | madvise | never
    has_memory_reclaim: bool     # the profile (and kernel) have memory.reclaim
    thp_defrag: str = "madvise"  # /sys/kernel/mm/transparent_hugepage/defrag


def not_applicable(plan: Plan, facts: Facts) -> str | None:
    """Why the scenario cannot run here, or None."""
    if plan.cgroup != facts.cgroup:
        return f"a cgroup {plan.cgroup} scenario; this kernel's memory controller is on {facts.cgroup}"
    if plan.model_only_ops:
        return f"op {', '.join(plan.model_only_ops)} runs only in the model (no user-space equivalent)"
    if (plan.swap or "swap" in plan.requires) and not facts.swap:
        return "needs swap; no swap device is on (swapon, or zram in a guest)"
    if "memsw" in plan.requires and not facts.memsw:
        return "needs v1 swap accounting (memory.memsw.*); it is off"
    if "memory.reclaim" in plan.requires and not facts.has_memory_reclaim:
        return "needs memory.reclaim, which this kernel does not have (5.19+)"
    if ("thp=always" in plan.requires or plan.thp == "always") and facts.thp != "always":
        return f"needs transparent huge pages 'always'; this system has '{facts.thp}'"
    if "thp=always" in plan.requires and facts.thp_defrag == "always":
        # defrag "always" gives every THP fault GFP_TRANSHUGE, which reclaims
        return "needs THP defrag other than 'always' (huge-page faults would reclaim); this system has 'always'"
    return None


@dataclass
class ScenarioReport:
    name: str
    description: str
    rows: list = field(default_factory=list)
    not_applicable: str | None = None
    error: str | None = None
    kernel: KernelRun | None = None
    divergences: list = field(default_factory=list)   # [(check, reason, detail)]
    text: str = ""                                     # the scenario file as run

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if self.not_applicable:
            return "n/a"
        return "disagree" if any(r.verdict == "disagree" for r in self.rows) else "agree"

    def to_json(self) -> dict:
        return {"scenario": self.name, "description": self.description, "verdict": self.verdict,
                "not_applicable": self.not_applicable, "error": self.error,
                "rows": [r.to_json() for r in self.rows],
                "episodes": len(self.kernel.episodes) if self.kernel else 0,
                "episodes_by_kind": _by_kind(self.kernel.episodes) if self.kernel else {},
                "divergences": [{"check": c, "reason": r, "detail": d} for c, r, d in self.divergences],
                "seconds": round(self.kernel.seconds, 1) if self.kernel else 0.0,
                # what `validate --recheck` compares with another profile's model, offline
                "source": self.text if self.kernel else None,
                "kernel_side": {"results": self.kernel.results, "tasks": self.kernel.tasks,
                                "files": self.kernel.files} if self.kernel else None}


def _by_kind(episodes) -> dict:
    out: dict = {}
    for ep in episodes:
        out[ep["kind"]] = out.get(ep["kind"], 0) + 1
    return out


class Validator:
    """``session``: an open probe Session (or None); ``resolution``: the
    kernel's profile (model.profiles.Resolution); ``pipeline_for()``: a
    fresh CheckPipeline per scenario."""

    def __init__(self, facts: Facts, resolution, *, parent: str, workdir: str, session=None,
                 pipeline_for=None, scratch_limit: str = "1G", progress=None):
        self.facts = facts
        self.resolution = resolution
        self.session = session
        self.pipeline_for = pipeline_for
        self.runner = ScenarioRunner(parent, facts.cgroup, workdir, session=session, scratch_limit=scratch_limit)
        self.progress = progress or (lambda msg: None)

    def validate(self, path: str, text: str | None = None) -> ScenarioReport:
        from memcgscope.model.scenario import ScenarioError
        from .plan import PlanError
        name = os.path.basename(path)
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        plan = load_plan(text, name)   # PlanError: a usage error, raised to the caller
        rep = ScenarioReport(name, plan.description, text=text)
        why = not_applicable(plan, self.facts)
        if why:
            rep.not_applicable = why
            return rep
        profile = self.resolution.profile
        try:
            model = run_model(plan, profile)
        except ScenarioError as e:
            raise PlanError(str(e)) from None
        self.progress(f"{name}: running on the kernel ({len(plan.ops)} operations)")
        kernel = self.runner.run_plan(plan)
        rep.kernel = kernel
        rep.rows = compare(plan, kernel, model, profile_name=profile.name)
        visible = self.session.visibility() if self.session is not None else None
        if self.session is not None:
            rep.rows += episode_rows(plan, kernel.episodes, charges_visible=visible.charges,
                                     ids=kernel.cgroup_ids)
        if self.pipeline_for is not None:
            pipeline = self.pipeline_for()
            for ep in kernel.episodes:
                res = pipeline.feed(ep)
                for d in res.divergences:
                    rep.divergences.append((d.check, d.reason, d.detail))
            counts = pipeline.counts()
            checked = sum(n for (c, v), n in counts.checks.items() if v != "skipped")
            tol = Tolerance("exact", why="every episode must be a behaviour the model of this kernel allows")
            rep.rows.append(Row(name, "episodes divergent", counts.total_divergences, 0, tol,
                                "agree" if counts.total_divergences == 0 else "disagree",
                                f"{len(kernel.episodes)} episodes, {checked} checks"))
        return rep
