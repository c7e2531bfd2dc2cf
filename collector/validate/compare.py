"""The model's side of a scenario and the comparison with the kernel's.

The model runs the scenario (model.scenario) under the profile resolved for
the kernel being validated; its virtual cgroupfs is read back like the real
one.  Every field is compared with a tolerance — the scenario's own
(`[validate]`), else the suite's default below — and each tolerance says why
it is right.  Episodes are not compared here: they go through the check
pipeline, and the scenario's `[validate.episodes]` rules count them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .plan import Plan, Tolerance
from .runner import END_FILES

__all__ = ["Row", "ModelRun", "run_model", "compare", "recheck", "DEFAULTS", "default_tolerance"]

_MIB = 1 << 20

#: the suite's defaults: (field pattern, tolerance); the first match wins.
#: Fields: "ops[N]", "task NAME", "CGROUP FILE", "CGROUP FILE KEY", "CGROUP FILE keys".
DEFAULTS: tuple[tuple[str, Tolerance], ...] = (
    (r"^ops\[\d+\]$", Tolerance("exact", why="a write's result and errno, a touch's outcome and a read's "
                                "text are deterministic")),
    (r"^task ", Tolerance("exact", why="who is OOM-killed is deterministic with one task per cgroup")),
    (r" keys$", Tolerance("exact", why="the keys a file prints are fixed per kernel version")),
    (r" memory\.(max|high|swap\.max|limit_in_bytes|memsw\.limit_in_bytes)$",
     Tolerance("exact", why="limits read back exactly as parsed and rounded down to pages")),
    (r" (oom|oom_kill|oom_group_kill)$", Tolerance("exact", why="one per OOM invocation and per victim")),
    (r" memory\.oom_control (oom_kill|under_oom|oom_kill_disable)$",
     Tolerance("exact", why="one per victim; the flags are what was written")),
    (r" (max|high|low|fail)$", Tolerance("zero_iff", why="events per reclaim pass or failed attempt: their "
                                         "number varies with what each reclaim frees, not whether they occur")),
    (r" memory\.(memsw\.)?failcnt$", Tolerance("zero_iff", why="failed counter attempts: batch and huge-page "
                                               "attempts and kernel allocations vary their number")),
    (r" memory\.(current|usage_in_bytes|memsw\.usage_in_bytes|swap\.current)$",
     Tolerance("abs", 4 * _MIB, why="per-CPU stocks, page tables and kernel objects are charged too, and "
               "reclaim frees more or less than asked")),
    (r" memory\.(peak|max_usage_in_bytes|memsw\.max_usage_in_bytes)$",
     Tolerance("abs", 8 * _MIB, why="the high-water mark also holds stocks, page tables and huge pages "
               "charged before their fallback")),
)


def default_tolerance(name: str) -> Tolerance:
    for pattern, tol in DEFAULTS:
        if re.search(pattern, name):
            return tol
    return Tolerance("exact", why="no default matched: compared exactly")


@dataclass
class Row:
    scenario: str
    field: str
    kernel: object
    model: object
    tolerance: Tolerance
    verdict: str        # agree | disagree | n/a
    note: str = ""

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "field": self.field, "kernel": self.kernel, "model": self.model,
                "tolerance": self.tolerance.describe(), "why": self.tolerance.why, "verdict": self.verdict,
                "note": self.note}


@dataclass
class ModelRun:
    results: list     # per op: "done" | "killed" | 0/-errno | text
    tasks: dict       # name -> "alive" | "killed" | "exited"
    files: dict       # cgroup path -> {file: text}


def run_model(plan: Plan, profile) -> ModelRun:
    """The scenario through the model under ``profile`` (not the file's own
    ``kernel``: the profile of the kernel being validated); the same files
    as the kernel side are read back (runner.END_FILES)."""
    from memcgscope.model.scenario import simulate
    run = simulate(plan.text, plan.name, profile=profile)
    k = run.kernel
    files = {}
    wanted = END_FILES[plan.cgroup]
    for path, _ in plan.cgroups:
        m = k.cgroup_at(path)
        out = {}
        for f in k.files(m):
            if f not in wanted:
                continue
            try:
                out[f] = k.read(m, f)
            except (PermissionError, FileNotFoundError):
                continue
        files[path] = out
    tasks = {}
    for name, t in run.env.tasks.items():
        tasks[name] = "alive" if t.alive else ("killed" if name in run.env.kills else "exited")
    return ModelRun([_model_result(r) for r in run.results], tasks, files)


def _model_result(r):
    if r.op == "touch":
        return "killed" if r.ret in ("killed", "dying") else r.ret
    if r.op == "read":
        return r.text
    return r.ret


def _number(text: str):
    text = text.strip()
    if text == "max":
        return "max"
    try:
        return int(text)
    except ValueError:
        return text


def _keyed(text: str) -> dict | None:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            return None
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            return None
    return out


def _fields(files: dict) -> dict:
    """{"CGROUP FILE[ KEY]": value} of the read-back files."""
    out = {}
    for path, per_file in files.items():
        for f, text in per_file.items():
            keyed = _keyed(text)
            if keyed is not None and len(keyed) > 1 or f.endswith(("events", "events.local", "oom_control")):
                keyed = keyed or {}
                out[f"{path} {f} keys"] = " ".join(keyed)
                for key, v in keyed.items():
                    out[f"{path} {f} {key}"] = v
            else:
                out[f"{path} {f}"] = _number(text)
    return out


def compare(plan: Plan, kernel, model: ModelRun, *, profile_name: str = "") -> list[Row]:
    """Rows for every field both sides have (and for those only one has)."""
    rows = []

    def tol_for(name):
        return plan.tolerances.get(name) or default_tolerance(name)

    def add(name, kval, mval, note=""):
        t = tol_for(name)
        rows.append(Row(plan.name, name, kval, mval, t, "agree" if t.admits(kval, mval) else "disagree", note))

    for i, op in enumerate(plan.ops):
        mres = model.results[i] if i < len(model.results) else None
        kres = kernel.results[i] if i < len(kernel.results) else None
        if op.get("op") == "read":
            # a read is compared field by field, with the end state's tolerances
            path = str(op.get("cgroup", "")).strip("/")
            kf = _fields({path: {op["file"]: kres}}) if isinstance(kres, str) else {}
            mf = _fields({path: {op["file"]: mres}}) if isinstance(mres, str) else {}
            for name in sorted(set(kf) | set(mf)):
                add(f"ops[{i}] {name}", kf.get(name), mf.get(name))
            continue
        add(f"ops[{i}]", kres, mres, f"{op.get('op')} {op.get('file') or op.get('task') or ''}".strip())
    for name in sorted(set(kernel.tasks) | set(model.tasks)):
        add(f"task {name}", kernel.tasks.get(name), model.tasks.get(name))
    kf, mf = _fields(kernel.files), _fields(model.files)
    for name in sorted(set(kf) | set(mf)):
        if name not in mf:
            rows.append(Row(plan.name, name, kf[name], None, tol_for(name), "disagree",
                            f"the kernel has it, model profile {profile_name} does not"))
        elif name not in kf:
            rows.append(Row(plan.name, name, None, mf[name], tol_for(name), "disagree",
                            f"model profile {profile_name} has it, the kernel does not"))
        else:
            add(name, kf[name], mf[name])
    return rows


def _episode_brief(ep: dict) -> str:
    kinds = [s.get("kind") for s in ep.get("steps") or ()]
    shown = ",".join(kinds[:6]) + (f",... ({len(kinds)})" if len(kinds) > 6 else "")
    gfp = ep.get("gfp")
    return (f"pid {ep.get('pid', '?')} {ep.get('comm') or '?'} nr_pages={ep.get('nr_pages', '?')} "
            f"ret={ep.get('ret', '?')}" + (f" gfp={gfp:#x}" if isinstance(gfp, int) else "") + f" steps={shown or '-'}")


def episode_rows(plan: Plan, episodes: list, *, charges_visible: bool, ids: dict | None = None) -> list[Row]:
    """The scenario's `[validate.episodes]` rules over what the probes saw."""
    rows = []
    for rule in plan.episodes:
        tol = Tolerance("bound", low=rule.low, high=rule.high, why=rule.why)
        name = f"episodes {rule.text}"
        if rule.kind in ("charge", "page_charge_fail") and not charges_visible:
            rows.append(Row(plan.name, name, None, None, tol, "n/a",
                            "this probe mode does not see charges (tracepoint mode)"))
            continue
        hits = [ep for ep in episodes if rule.matches(ep, ids)]
        ok = tol.admits(len(hits), None)
        # a bound exceeded shows the episodes that exceeded it: who charged,
        # how, what happened (khugepaged's collapse was found this way)
        note = "" if ok or not hits else "e.g. " + "; ".join(_episode_brief(ep) for ep in hits[:3])
        rows.append(Row(plan.name, name, len(hits), None, tol, "agree" if ok else "disagree", note))
    return rows




def recheck(plan: Plan, kernel_side: dict, profile, model: ModelRun | None = None) -> list[Row]:
    """A recorded kernel side (a report's ``kernel_side``: results, tasks,
    files) compared with the model under ``profile``: the end-state rows
    `validate` would have printed had the kernel resolved to it. Episode
    rules need the episodes, which a report does not keep: they are not
    rechecked. ``model``: the model's run of the scenario under ``profile``,
    if the caller has it already."""
    from types import SimpleNamespace
    kernel = SimpleNamespace(results=list(kernel_side.get("results") or []),
                             tasks=dict(kernel_side.get("tasks") or {}), files=dict(kernel_side.get("files") or {}))
    model = model if model is not None else run_model(plan, profile)
    return compare(plan, kernel, model, profile_name=getattr(profile, "name", str(profile)))
