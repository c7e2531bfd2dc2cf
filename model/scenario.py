"""Scenario files for ``memcgscope simulate``: parse TOML text, run it
through the model and the layer-2 environment, return per-step results.
No file I/O here: the CLI reads the file.

Format (sizes are strings with an optional K/M/G suffix, or integers in
pages)::

    kernel = "6.1"            # a profile (model/profiles.py: 5.10, 6.1, 6.12, 6.18, 7.3, ...)
    cgroup = "v2"             # v1 or v2
    cpus = 2
    swap = "0"                # swap device size (anon is reclaimable only with swap)
    swap_account = true       # v1: memsw counters and files

    [cgroups.a]               # created in file order; values are files to write
    "memory.max" = "30M"

    [tasks]
    t = "a"                   # task name = cgroup it runs in

    [[ops]]
    op = "touch"              # touch, charge, uncharge, write, read, spawn, exit, flags, return_to_user
    task = "t"
    anon = "100M"
    expect = "killed"         # optional: the CLI fails if the result differs

Per op, optional: ``cpu``; for charge/write ``reclaim = [pages, ...]`` (the
reclaim oracle's answers, in order, then 0; default: the environment),
``drain = "all" | "local" | "skipped"``, ``oom = [true, false, ...]`` (what
out_of_memory() returns, in order; default: the environment kills);
for charge ``pages``, ``gfp`` and ``flags = ["PF_MEMALLOC", "DYING"]`` (also
``OOM_REAPED``: an OOM victim whose mm the reaper is done with; op
``flags`` sets them for a ``task``, or for later charge ops);
for write ``file``, ``value``, ``signal_pending``, ``nonblock``;
for touch ``anon``, ``file`` and ``huge`` (anon in 2 MiB-aligned ranges
with THP: one GFP_TRANSHUGE_LIGHT charge of 512 pages per range, small
pages where it fails).
"""

from __future__ import annotations

import errno as _errno
import tomllib
from dataclasses import dataclass, field

from .context import OomOutcome, Task
from .environment import Environment
from .gfp import parse_gfp
from .kernel import Kernel
from .page_counter import PAGE_SIZE, memparse
from .profiles import PROFILES

__all__ = ["ScenarioError", "Scenario", "OpResult", "ScenarioRun", "load_scenario", "run_scenario", "simulate"]

_TOP_KEYS = {"kernel", "cgroup", "cpus", "swap", "swap_account", "hz",
             "memory_localevents", "cgroups", "tasks", "ops", "description", "name",
             # read by `memcgscope validate` (collector/validate/plan.py), not by the model
             "thp", "requires", "validate"}
_OP_KEYS = {
    "touch": {"task", "anon", "file", "huge", "gfp", "cpu"},
    "charge": {"cgroup", "pages", "gfp", "cpu", "flags", "reclaim", "drain", "oom"},
    "uncharge": {"cgroup", "pages", "cpu"},
    "write": {"cgroup", "file", "value", "reclaim", "drain", "oom", "signal_pending",
              "nonblock", "cpu"},
    "read": {"cgroup", "file"},
    "spawn": {"task", "cgroup"},
    "exit": {"task"},
    "flags": {"flags", "task"},
    "return_to_user": {"task", "reclaim"},
}
_COMMON = {"op", "expect", "note"}
_FLAGS = {"PF_MEMALLOC": "pf_memalloc", "DYING": "dying", "NOT_USER_FAULT": "not_user_fault",
          "SIGNAL_PENDING": "signal_pending", "OOM_REAPED": "oom_reaped"}


class ScenarioError(ValueError):
    """One line: the file, the place (key or line) and the fix."""


@dataclass
class OpResult:
    index: int
    op: str
    summary: str
    ret: int | str | None = None
    steps: list = field(default_factory=list)
    changed: dict = field(default_factory=dict)
    expect: object = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.expect is None or self.expect == self.ret

    def as_dict(self) -> dict:
        d = {"index": self.index, "op": self.op, "summary": self.summary, "ret": self.ret,
             "changed": self.changed, "steps": [s.as_dict() for s in self.steps]}
        if self.expect is not None:
            d["expect"] = self.expect
            d["ok"] = self.ok
        if self.text is not None:
            d["text"] = self.text
        return d


@dataclass
class Scenario:
    name: str
    kernel: Kernel
    env: Environment
    ops: list
    setup: list
    default_flags: list = field(default_factory=list)


def _err(name, where, msg):
    return ScenarioError(f"{name}: {where}: {msg}")


def _pages(name, where, value) -> int:
    """Integer = pages; string = a size (K/M/G…), rounded up to pages."""
    if isinstance(value, bool):
        raise _err(name, where, f"expected a size like \"30M\" or a page count, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise _err(name, where, f"negative page count {value}; use a count ≥ 0")
        return value
    if isinstance(value, str):
        b, rest = memparse(value.strip())
        if rest or not value.strip():
            raise _err(name, where, f"bad size {value!r}; use e.g. \"100M\", \"4K\" or a page count")
        return -(-b // PAGE_SIZE)
    raise _err(name, where, f"expected a size like \"30M\" or a page count, not {value!r}")


def _gfp(name, where, value, profile) -> int:
    try:
        return parse_gfp(value, profile)
    except ValueError as e:
        words = ", ".join(["KERNEL", "NOWAIT", "ATOMIC", "HIGHUSER_MOVABLE", "TRANSHUGE",
                           "TRANSHUGE_LIGHT", "NORETRY", "NOFAIL", "HIGH", "RETRY_MAYFAIL"])
        raise _err(name, where, f"{e}; use one of {words}, … joined with '|', or a number") from None


def _list_oracle(values, fallback_reclaim=None):
    it = iter(values)

    def reclaim(target, nr, gfp, may_swap=True):
        n = next(it, 0)
        return fallback_reclaim(target, n) if fallback_reclaim else n
    return reclaim


def load_scenario(text: str, name: str = "scenario.toml", profile=None) -> Scenario:
    """``profile`` (a name or Profile) replaces the file's ``kernel``: how
    validate runs a scenario under the profile of the kernel it checks."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{name}: TOML syntax error: {e}; fix the file there") from None
    if profile is not None:
        data["kernel"] = profile
    unknown = set(data) - _TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise _err(name, key, f"unknown key; use one of {', '.join(sorted(_TOP_KEYS))}")
    profile = data.get("kernel")
    if profile is None:
        raise _err(name, "kernel", f"missing; set kernel = one of {', '.join(PROFILES)}")
    cgroup = data.get("cgroup", "v2")
    if cgroup not in ("v1", "v2"):
        raise _err(name, "cgroup", f"{cgroup!r} is not a cgroup version; use \"v1\" or \"v2\"")
    cpus = data.get("cpus", 1)
    if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
        raise _err(name, "cpus", f"{cpus!r}: use a positive integer")
    hz = data.get("hz", 250)
    if not isinstance(hz, int) or isinstance(hz, bool) or hz < 100:
        raise _err(name, "hz", f"{hz!r}: use CONFIG_HZ, e.g. 100, 250, 300 or 1000")
    for key in ("swap_account", "memory_localevents"):
        if not isinstance(data.get(key, False), bool):
            raise _err(name, key, f"{data[key]!r}: use true or false")
    try:
        kernel = Kernel(profile if not isinstance(profile, str) else str(profile), cgroup=cgroup, cpus=cpus,
                        swap_account=bool(data.get("swap_account", True)),
                        memory_localevents=bool(data.get("memory_localevents", False)),
                        hz=hz)
    except ValueError as e:
        raise _err(name, "kernel", str(e)) from None
    env = Environment(kernel, swap_pages=_pages(name, "swap", data.get("swap", 0)))
    setup = []
    cgroups = data.get("cgroups", {})
    if not isinstance(cgroups, dict):
        raise _err(name, "cgroups", "expected a table of [cgroups.NAME] sections")
    for path, files in cgroups.items():
        where = f"cgroups.{path}"
        try:
            m = kernel.mkdir(path)
        except OSError as e:
            raise _err(name, where, f"{e.strerror}; list a parent before its children") from None
        if not isinstance(files, dict):
            raise _err(name, where, "expected a table of control files and values")
        for fname, value in files.items():
            ret = kernel.write(m, fname, str(value), reclaim=env.reclaim, oom=env.oom)
            if ret:
                raise _err(name, f"{where}.\"{fname}\"",
                           f"write of {value!r} failed with {_errname(ret)}; "
                           f"check the file name for cgroup {cgroup} and the value")
            setup.append((m.path, fname, str(value)))
    tasks = data.get("tasks", {})
    if not isinstance(tasks, dict):
        raise _err(name, "tasks", "expected a table: task name = cgroup")
    for tname, path in tasks.items():
        env.spawn(tname, _cgroup(kernel, name, f"tasks.{tname}", path))
    ops = data.get("ops", [])
    if not isinstance(ops, list):
        raise _err(name, "ops", "expected [[ops]] tables")
    for i, op in enumerate(ops):
        where = f"ops[{i}]"
        if not isinstance(op, dict) or "op" not in op:
            raise _err(name, where, f"missing 'op'; use one of {', '.join(_OP_KEYS)}")
        kind = op["op"]
        if kind not in _OP_KEYS:
            raise _err(name, f"{where}.op", f"unknown op {kind!r}; use one of {', '.join(_OP_KEYS)}")
        extra = set(op) - _OP_KEYS[kind] - _COMMON
        if extra:
            key = sorted(extra)[0]
            raise _err(name, f"{where}.{key}", f"not a key of op {kind!r}; use "
                       f"{', '.join(sorted(_OP_KEYS[kind] | _COMMON))}")
    return Scenario(name, kernel, env, ops, setup)


def _cgroup(kernel, name, where, path):
    if not isinstance(path, str):
        raise _err(name, where, f"expected a cgroup path string, not {path!r}")
    try:
        return kernel.cgroup_at(path)
    except OSError:
        raise _err(name, where, f"no cgroup {path!r}; declare it under [cgroups]") from None


def _errname(ret) -> str:
    if isinstance(ret, int) and ret < 0:
        return f"-{_errno.errorcode.get(-ret, str(-ret))}"
    return str(ret)


def _changed(before, after) -> dict:
    out = {}
    for path, files in after.items():
        old = before.get(path, {})
        diff = {f: [old.get(f), t] for f, t in files.items() if old.get(f) != t}
        if diff:
            out[path] = diff
    return out


def _oom_list(values, env):
    it = iter(values)

    def oom(target, order, gfp):
        v = next(it, None)
        if v is None or v == "kill":
            return env.oom(target, order, gfp)
        if isinstance(v, bool):
            return OomOutcome(v)
        raise ValueError(v)
    return oom


def _summ_steps(steps) -> str:
    counts = {}
    for s in steps:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return ", ".join(f"{k}×{n}" if n > 1 else k for k, n in counts.items())


def _run_op(sc: Scenario, i: int, op: dict) -> OpResult:
    k, env, name = sc.kernel, sc.env, sc.name
    kind = op["op"]
    where = f"ops[{i}]"
    cpu = op.get("cpu", 0)
    if not isinstance(cpu, int) or not 0 <= cpu < k.cpus:
        raise _err(name, f"{where}.cpu", f"{cpu!r}: use a CPU number 0..{k.cpus - 1}")

    def need(key):
        if key not in op:
            raise _err(name, f"{where}.{key}", f"missing; op {kind!r} needs it")
        return op[key]

    def oracles():
        kw = {}
        if "reclaim" in op:
            vals = op["reclaim"]
            if not isinstance(vals, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     and v >= 0 for v in vals):
                raise _err(name, f"{where}.reclaim", "expected a list of pages freed per "
                           "reclaim call, e.g. [0, 3, 0]")
            kw["reclaim"] = _list_oracle(vals, env.take_exact)
        else:
            kw["reclaim"] = env.reclaim
        if "drain" in op:
            d = op["drain"]
            if d not in ("all", "local", "skipped"):
                raise _err(name, f"{where}.drain", f"{d!r}; use \"all\", \"local\" or \"skipped\"")
            kw["drain"] = lambda target, c, d=d: d
        vals = op.get("oom")
        if vals is not None:
            if not isinstance(vals, list) or not all(isinstance(v, bool) or v == "kill" for v in vals):
                raise _err(name, f"{where}.oom", "expected a list of true/false/\"kill\" "
                           "(what each out_of_memory() call does)")
            kw["oom"] = _oom_list(vals, env)
        else:
            kw["oom"] = env.oom
        return kw

    if kind == "touch":
        t = env.tasks.get(need("task"))
        if t is None:
            raise _err(name, f"{where}.task", f"no task {op['task']!r}; add it under [tasks] "
                       "or spawn it first")
        gfp = _gfp(name, f"{where}.gfp", op["gfp"], k.profile) if "gfp" in op else None
        anon = _pages(name, f"{where}.anon", op.get("anon", 0))
        file = _pages(name, f"{where}.file", op.get("file", 0))
        huge = _pages(name, f"{where}.huge", op.get("huge", 0))
        r = env.touch(t.name, anon=anon, file=file, gfp=gfp, cpu=cpu, huge=huge)
        steps = [s for res in r.slow for s in res.steps]
        summ = (f"{t.name}: {r.anon} anon + {r.file} file pages charged in {r.charges} charges "
                f"({r.stock_hits} stock hits, {r.stock_misses} stock misses, {len(r.slow)} over a "
                f"limit, {r.reclaims} reclaim calls)"
                f"{'; OOM killed ' + ', '.join(r.killed) if r.killed else ''}; {r.end}")
        return OpResult(i, kind, summ, r.end, steps)
    if kind == "charge":
        m = _cgroup(k, name, f"{where}.cgroup", need("cgroup"))
        pages = _pages(name, f"{where}.pages", op.get("pages", 1))
        if pages < 1:
            raise _err(name, f"{where}.pages", "charge at least 1 page")
        gfp = _gfp(name, f"{where}.gfp", op.get("gfp", "KERNEL"), k.profile)
        flags = op.get("flags", sc.default_flags)
        if not isinstance(flags, list) or any(f not in _FLAGS for f in flags):
            raise _err(name, f"{where}.flags", f"{flags!r}; use a list of {', '.join(_FLAGS)}")
        task = Task(pf_memalloc="PF_MEMALLOC" in flags, dying="DYING" in flags,
                    in_user_fault="NOT_USER_FAULT" not in flags,
                    signal_pending="SIGNAL_PENDING" in flags, oom_reaped="OOM_REAPED" in flags)
        r = env.charge(m, pages, gfp, cpu, task=task, **oracles())
        return OpResult(i, kind, f"charge {pages} to {m.path}: ret {_errname(r.ret)} "
                        f"({_summ_steps(r.steps)})", r.ret, r.steps)
    if kind == "uncharge":
        m = _cgroup(k, name, f"{where}.cgroup", need("cgroup"))
        pages = _pages(name, f"{where}.pages", op.get("pages", 1))
        try:
            env.uncharge(m, pages)
        except ValueError as e:
            raise _err(name, where, f"{e}; uncharge only what raw charges put there") from None
        return OpResult(i, kind, f"uncharge {pages} from {m.path}", 0)
    if kind == "write":
        m = _cgroup(k, name, f"{where}.cgroup", need("cgroup"))
        fname, value = need("file"), need("value")
        kw = oracles()
        r = k.write_ex(m, str(fname), str(value), signal_pending=bool(op.get("signal_pending")),
                       nonblock=bool(op.get("nonblock")), cpu=cpu, **kw)
        return OpResult(i, kind, f"write {value!r} to {m.path}/{fname}: {_errname(r.ret)} "
                        f"({_summ_steps(r.steps)})", r.ret, r.steps)
    if kind == "read":
        m = _cgroup(k, name, f"{where}.cgroup", need("cgroup"))
        try:
            text = k.read(m, str(need("file")))
        except OSError as e:
            raise _err(name, f"{where}.file", f"{e.strerror}") from None
        return OpResult(i, kind, f"{m.path}/{op['file']}: {text.strip()!r}", 0, text=text)
    if kind == "spawn":
        m = _cgroup(k, name, f"{where}.cgroup", need("cgroup"))
        try:
            env.spawn(str(need("task")), m)
        except ValueError as e:
            raise _err(name, f"{where}.task", f"{e}; pick another name") from None
        return OpResult(i, kind, f"task {op['task']} in {m.path}", 0)
    if kind == "exit":
        tname = need("task")
        if tname not in env.tasks:
            raise _err(name, f"{where}.task", f"no task {tname!r}")
        env.exit(tname)
        return OpResult(i, kind, f"task {tname} exits", 0)
    if kind == "flags":
        flags = need("flags")
        if not isinstance(flags, list) or any(f not in _FLAGS for f in flags):
            raise _err(name, f"{where}.flags", f"{flags!r}; use a list of {', '.join(_FLAGS)}")
        if "task" not in op:
            sc.default_flags = list(flags)  # for later charge ops without flags
            return OpResult(i, kind, f"charge ops now run with flags {flags}", 0)
        t = env.tasks.get(op["task"])
        if t is None:
            raise _err(name, f"{where}.task", f"no task {op['task']!r}; add it under [tasks]")
        t.task.pf_memalloc = "PF_MEMALLOC" in flags
        t.task.dying = "DYING" in flags
        t.task.in_user_fault = "NOT_USER_FAULT" not in flags
        t.task.signal_pending = "SIGNAL_PENDING" in flags
        t.task.oom_reaped = "OOM_REAPED" in flags
        return OpResult(i, kind, f"task {t.name} flags {flags}", 0)
    # return_to_user
    t = env.tasks.get(need("task"))
    if t is None:
        raise _err(name, f"{where}.task", f"no task {op['task']!r}; add it under [tasks]")
    r = k.return_to_user(t.cgroup, reclaim=oracles()["reclaim"], task=t.task)
    return OpResult(i, kind, f"{t.name} returns to user ({_summ_steps(r.steps) or 'nothing owed'})",
                    0, r.steps)


@dataclass
class ScenarioRun:
    """A scenario run to its end: the per-op results, and the model's
    kernel and environment as they were left (for reading the end state)."""
    results: list
    kernel: Kernel
    env: Environment


def simulate(text: str, name: str = "scenario.toml", profile=None) -> ScenarioRun:
    """Like run_scenario, keeping the kernel and environment; ``profile``
    replaces the file's ``kernel``.  Raises ScenarioError."""
    sc = load_scenario(text, name, profile)
    return ScenarioRun(_run_ops(sc), sc.kernel, sc.env)


def run_scenario(text: str, name: str = "scenario.toml") -> list[OpResult]:
    """Parse and run a scenario; one OpResult per op.  Raises ScenarioError."""
    return _run_ops(load_scenario(text, name))


def _run_ops(sc: Scenario) -> list[OpResult]:
    name = sc.name
    results = []
    before = sc.kernel.snapshot()
    for i, op in enumerate(sc.ops):
        res = _run_op(sc, i, op)
        after = sc.kernel.snapshot()
        res.changed = _changed(before, after)
        before = after
        if "expect" in op:
            exp = op["expect"]
            if isinstance(exp, str) and exp.startswith("-E"):
                code = getattr(_errno, exp[1:], None)
                if code is None:
                    raise _err(name, f"ops[{i}].expect", f"unknown errno {exp!r}; use e.g. \"-EBUSY\"")
                exp = -code
            res.expect = exp
        results.append(res)
    return results
