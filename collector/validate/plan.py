"""A scenario read for `validate`: what to build and run on the real
kernel, which fields to compare with the model, and with what tolerance.

The file is the one `memcgscope simulate` runs (model/scenario.py documents
its format); validate reads these keys beyond it:

    thp = "never"                 # the workers' anon memory: "never" (THP
                                  # disabled for them), "always" (needs the
                                  # system setting "always"), unset: as is
    requires = ["memory.reclaim"] # features: memory.reclaim, swap, memsw,
                                  # thp=always; a kernel without one: n/a

    [validate]                    # tolerance per field, with the reason
    "app memory.events max" = { min = 1, why = "one per reclaim pass" }
    "app memory.current" = { abs = "4M", why = "stock and kernel objects" }
    "ops[1]" = { exact = true, why = "the errno is deterministic" }

    [validate.episodes]           # what the probes must have seen
    "charge nr_pages>=512 ret=-12 steps=counter_fail" = { min = 1, why = "..." }

A field is "<cgroup> <file>" or "<cgroup> <file> <key>" (keyed files such
as memory.events), "ops[N]" (an operation's result) or "task <name>"
(alive or killed at the end).  A tolerance is one of: ``exact = true``;
``abs = N`` (pages or a size such as "4M"); ``min``/``max`` (a bound on the
kernel's value whatever the model says); ``zero_iff = true`` (zero exactly
when the model's is, any count otherwise).  Fields without one get the
suite's default (collector/validate/compare.py, DEFAULTS).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from memcgscope.model.page_counter import PAGE_SIZE, memparse

__all__ = ["Plan", "PlanError", "Tolerance", "EpisodeRule", "load_plan", "KERNEL_OPS", "REAL_OPS"]

#: ops a real kernel can be driven through
REAL_OPS = {"touch", "write", "read", "spawn", "exit"}
#: ops only the model can run (a raw charge, task flags): such a scenario is
#: not applicable to a real kernel
KERNEL_OPS = {"charge", "uncharge", "flags", "return_to_user"}
FEATURES = {"memory.reclaim", "swap", "memsw", "thp=always"}


class PlanError(ValueError):
    """One line: the file, the place and the fix."""


@dataclass(frozen=True)
class Tolerance:
    kind: str                  # exact | abs | bound | zero_iff
    value: int | None = None   # abs: in the field's unit (bytes for the byte files)
    low: int | None = None
    high: int | None = None
    why: str = ""

    def describe(self) -> str:
        if self.kind == "exact":
            return "exact"
        if self.kind == "abs":
            return f"±{_human(self.value)}"
        if self.kind == "zero_iff":
            return "0 iff 0"
        lo = "" if self.low is None else str(self.low)
        hi = "" if self.high is None else str(self.high)
        return f"{lo}..{hi}"

    def admits(self, kernel, model) -> bool:
        if self.kind == "exact":
            return kernel == model
        if not isinstance(kernel, (int, float)):
            return kernel == model
        if self.kind == "abs":
            return model is not None and abs(kernel - model) <= self.value
        if self.kind == "zero_iff":
            return (kernel == 0) == (model == 0)
        return (self.low is None or kernel >= self.low) and (self.high is None or kernel <= self.high)


@dataclass(frozen=True)
class EpisodeRule:
    """``<kind> cond ...`` over episodes: cond is ``field=V``, ``field>=V``,
    ``field<=V``, ``field!=V`` (nr_pages, ret, gfp, ...), ``comm=NAME`` or
    ``comm!=NAME`` (the charging task's name, e.g. khugepaged), ``steps=a,b``
    (exact step kinds), ``has=kind`` or ``no=kind`` (a step kind present or
    absent; ``kind@cgroup``: a step on that scenario cgroup)."""
    text: str
    kind: str
    conds: tuple
    low: int | None = None
    high: int | None = None
    why: str = ""

    def matches(self, ep: dict, ids: dict | None = None) -> bool:
        """``ids``: scenario cgroup path -> cgroup id, for ``kind@cgroup``."""
        if ep.get("kind") != self.kind:
            return False
        steps = ep.get("steps") or ()
        kinds = [s.get("kind") for s in steps]

        def present(spec):
            kind, _, path = spec.partition("@")
            if not path:
                return kind in kinds
            want = (ids or {}).get(path.strip("/"))
            return any(s.get("kind") == kind and s.get("cgroup_id") == want for s in steps)

        for name, op, value in self.conds:
            if name == "steps":
                if kinds != value:
                    return False
            elif name == "has":
                if not present(value):
                    return False
            elif name == "no":
                if present(value):
                    return False
            elif name == "comm":
                if (ep.get("comm") == value) != (op == "="):
                    return False
            else:
                v = ep.get(name)
                if not isinstance(v, int):
                    return False
                if ((op == "=" and v != value) or (op == "!=" and v == value) or (op == ">=" and v < value)
                        or (op == "<=" and v > value)):
                    return False
        return True


@dataclass
class Plan:
    name: str
    text: str
    description: str
    cgroup: str                      # v1 | v2
    swap: int                        # pages of swap the scenario assumes
    thp: str | None
    requires: tuple
    cgroups: list                    # [(path, [(file, value)])] in file order
    tasks: dict                      # name -> cgroup path
    ops: list                        # the [[ops]] tables
    tolerances: dict = field(default_factory=dict)   # field -> Tolerance
    episodes: list = field(default_factory=list)     # [EpisodeRule]

    @property
    def model_only_ops(self) -> list[str]:
        return sorted({op.get("op") for op in self.ops if op.get("op") in KERNEL_OPS})


def _human(n: int) -> str:
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _err(name, where, msg):
    return PlanError(f"{name}: {where}: {msg}")


def _size(name, where, value, *, pages: bool = True) -> int:
    """A size: an integer (pages, or with ``pages=False`` the number as
    given) or a string with a suffix (in pages, or bytes)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _err(name, where, f"expected a number or a size like \"4M\", not {value!r}")
    if isinstance(value, int):
        return value
    b, rest = memparse(value.strip())
    if rest:
        raise _err(name, where, f"bad size {value!r}; use e.g. \"4M\"")
    return -(-b // PAGE_SIZE) if pages else b


def _tolerance(name, where, spec) -> Tolerance:
    if not isinstance(spec, dict):
        raise _err(name, where, "expected a table like { min = 1, why = \"...\" }")
    why = spec.get("why", "")
    if not isinstance(why, str) or not why.strip():
        raise _err(name, f"{where}.why", "missing; say why this tolerance is right")
    keys = set(spec) - {"why"}
    if keys == {"exact"} and spec["exact"] is True:
        return Tolerance("exact", why=why)
    if keys == {"abs"}:
        return Tolerance("abs", _size(name, f"{where}.abs", spec["abs"], pages=False), why=why)
    if keys == {"zero_iff"} and spec["zero_iff"] is True:
        return Tolerance("zero_iff", why=why)
    if keys and keys <= {"min", "max"}:
        lo, hi = spec.get("min"), spec.get("max")
        for k, v in (("min", lo), ("max", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise _err(name, f"{where}.{k}", f"{v!r}: use an integer")
        return Tolerance("bound", low=lo, high=hi, why=why)
    raise _err(name, where, f"{sorted(keys)}: use one of exact = true, abs = N, min/max = N, zero_iff = true")


_COND = re.compile(r"^(\w+)(>=|<=|!=|=)(.+)$")


def _episode_rule(name, where, text, spec) -> EpisodeRule:
    parts = text.split()
    if not parts:
        raise _err(name, where, "empty; write '<kind> field=value ...'")
    conds = []
    for p in parts[1:]:
        m = _COND.match(p)
        if not m:
            raise _err(name, where, f"condition {p!r}: use field=V, field>=V, field<=V, field!=V, "
                                    f"comm=NAME, steps=a,b, has=K, no=K")
        key, op, value = m.groups()
        if key in ("steps", "has", "no") and op != "=":
            raise _err(name, where, f"condition {p!r}: {key} takes =; no=K is a step kind absent")
        if key == "comm" and op not in ("=", "!="):
            raise _err(name, where, f"condition {p!r}: comm takes = or !=")
        if key == "comm":
            conds.append((key, op, value))
        elif key == "steps":
            conds.append((key, op, value.split(",")))
        elif key in ("has", "no"):
            conds.append((key, op, value))
        else:
            try:
                conds.append((key, op, int(value, 0)))
            except ValueError:
                raise _err(name, where, f"condition {p!r}: {value!r} is not an integer") from None
    tol = _tolerance(name, where, spec)
    if tol.kind != "bound":
        raise _err(name, where, "an episode rule takes min and/or max")
    return EpisodeRule(text, parts[0], tuple(conds), tol.low, tol.high, tol.why)


def load_plan(text: str, name: str) -> Plan:
    """Reads the validate view of a scenario; the model side is checked by
    model.scenario.load_scenario (which the comparison runs)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{name}: TOML syntax error: {e}; fix the file there") from None
    cgroup = data.get("cgroup", "v2")
    if cgroup not in ("v1", "v2"):
        raise _err(name, "cgroup", f"{cgroup!r}; use \"v1\" or \"v2\"")
    thp = data.get("thp")
    if thp not in (None, "never", "always"):
        raise _err(name, "thp", f"{thp!r}; use \"never\" or \"always\"")
    requires = data.get("requires", [])
    if not isinstance(requires, list) or any(r not in FEATURES for r in requires):
        raise _err(name, "requires", f"{requires!r}; use a list of {', '.join(sorted(FEATURES))}")
    cgroups = []
    for path, files in (data.get("cgroups") or {}).items():
        if not isinstance(files, dict):
            raise _err(name, f"cgroups.{path}", "expected a table of control files and values")
        cgroups.append((path.strip("/"), [(f, str(v)) for f, v in files.items()]))
    known = {p for p, _ in cgroups}
    tasks = {}
    for t, path in (data.get("tasks") or {}).items():
        if not isinstance(path, str) or path.strip("/") not in known:
            raise _err(name, f"tasks.{t}", f"no cgroup {path!r}; declare it under [cgroups]")
        tasks[t] = path.strip("/")
    if any(isinstance(op, dict) and op.get("op") == "touch" and op.get("huge") for op in data.get("ops") or []):
        # a `huge` touch is only a huge-page attempt where THP is "always"
        requires = list(dict.fromkeys([*requires, "thp=always"]))
    v = data.get("validate") or {}
    if not isinstance(v, dict):
        raise _err(name, "validate", "expected a table of field = { tolerance }")
    tolerances, rules = {}, []
    for key, spec in v.items():
        if key == "episodes":
            if not isinstance(spec, dict):
                raise _err(name, "validate.episodes", "expected a table of rule = { min = N, why = ... }")
            for text_rule, rule_spec in spec.items():
                rules.append(_episode_rule(name, f"validate.episodes.\"{text_rule}\"", text_rule, rule_spec))
            continue
        tolerances[" ".join(key.split())] = _tolerance(name, f"validate.\"{key}\"", spec)
    return Plan(name, text, str(data.get("description", "")), cgroup,
                _size(name, "swap", data.get("swap", 0)), thp, tuple(requires), cgroups, tasks,
                list(data.get("ops") or []), tolerances, rules)
