"""Runs a scenario on the real kernel: scratch cgroups below the caller's
own, real processes doing the scenario's operations, the probes watching,
and the end state read back.  Everything it creates is removed on every
exit path (success, failure, a signal, a worker that crashes).

Layout below ``parent`` (the caller's own memory cgroup unless given)::

    memcgscope-validate-<scenario>-<pid>/      hard limit (--scratch-limit)
        launch/                                 workers start here
        <the scenario's cgroups>/               workers move in when ready
"""

from __future__ import annotations

import errno as _errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from memcgscope.model.page_counter import PAGE_SIZE, memparse

from ..scratch import PREFIX, _kill_members, sweep_stale
from .plan import Plan

__all__ = ["KernelRun", "ScenarioRunner", "RunnerError", "END_FILES"]

#: the control files read back after a scenario, per hierarchy
END_FILES = {
    "v1": ("memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes", "memory.failcnt",
           "memory.memsw.usage_in_bytes", "memory.memsw.max_usage_in_bytes", "memory.memsw.limit_in_bytes",
           "memory.memsw.failcnt", "memory.oom_control"),
    "v2": ("memory.current", "memory.peak", "memory.max", "memory.high", "memory.events",
           "memory.events.local", "memory.swap.current", "memory.swap.max", "memory.swap.events"),
}
REPLY_TIMEOUT = 300.0   # a touch that reclaims a lot under TCG takes a while


class RunnerError(Exception):
    """A set-up failure: one line, what and where."""


@dataclass
class KernelRun:
    """What the real kernel did."""
    results: list = field(default_factory=list)    # per op: its result (same forms as the model's)
    tasks: dict = field(default_factory=dict)      # name -> "alive" | "killed" | "exited"
    files: dict = field(default_factory=dict)      # cgroup path -> {file: text}
    cgroup_ids: dict = field(default_factory=dict)  # cgroup path -> cgroup id (inode)
    episodes: list = field(default_factory=list)   # episode dicts of the scenario's cgroups
    seconds: float = 0.0


class _Worker:
    def __init__(self, name: str, launch_procs: str):
        self.name = name

        def enter():
            with open(launch_procs, "w") as f:
                f.write("0")
        self.proc = subprocess.Popen([sys.executable, "-m", "memcgscope.collector.validate.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     preexec_fn=enter, start_new_session=True)
        self.state = "alive"

    def ask(self, line: str, timeout: float = REPLY_TIMEOUT) -> str | None:
        """The reply, or None when the worker died (an OOM kill)."""
        if self.state != "alive":
            return None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        result: list = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            self.kill()
            raise RunnerError(f"task {self.name}: no answer to {line.split()[0]!r} after {timeout:.0f}s; "
                              "killed it (raise the scenario's limits or check the kernel log)")
        reply = result[0] if result else ""
        if not reply:
            return self._died()
        reply = reply.strip()
        if reply.startswith("error"):
            raise RunnerError(f"task {self.name}: {reply[6:]}")
        return reply

    def _died(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.state = "killed" if self.proc.returncode == -signal.SIGKILL else f"died ({self.proc.returncode})"
        return None

    def refresh(self) -> str:
        """The state, noticing a death no reply revealed (a worker killed by
        a limit write's OOM while it was not asked anything)."""
        if self.state == "alive" and self.proc.poll() is not None:
            self.state = "killed" if self.proc.returncode == -signal.SIGKILL else f"died ({self.proc.returncode})"
        return self.state

    def exit(self) -> None:
        if self.state == "alive" and self.ask("exit") is not None:
            self.proc.wait(timeout=30)
            self.state = "exited"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def _slug(name: str) -> str:
    base = os.path.basename(name).rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:40] or "scenario"


class ScenarioRunner:
    """``parent``: the directory below which scratch cgroups go (the
    caller's own memory cgroup, or an explicit --parent); ``version``: v1 or
    v2; ``workdir``: a directory on a local filesystem for page-cache files;
    ``session``: an open probe Session, polled while the scenario runs
    (None: no episodes)."""

    def __init__(self, parent: str, version: str, workdir: str, *, session=None,
                 scratch_limit: str = "1G", settle: float = 0.5):
        self.parent = parent
        self.version = version
        self.workdir = workdir
        self.session = session
        self.scratch_limit = scratch_limit
        self.settle = settle

    # -- cgroups --------------------------------------------------------------------

    def _limit_file(self) -> str:
        return "memory.limit_in_bytes" if self.version == "v1" else "memory.max"

    def _mkdir(self, path: str, *, enable_children: bool) -> None:
        os.mkdir(path)
        self._made.append(path)
        if self.version == "v2" and enable_children:
            _write(os.path.join(path, "cgroup.subtree_control"), "+memory")

    def _build(self, plan: Plan) -> None:
        sweep_stale(self.parent)
        self.root = os.path.join(self.parent, f"{PREFIX}validate-{_slug(plan.name)}-{os.getpid()}")
        self._mkdir(self.root, enable_children=True)
        if self.version == "v1":
            use = os.path.join(self.root, "memory.use_hierarchy")
            if os.path.exists(use) and _read(use).strip() != "1":
                _write(use, "1")   # 5.10 v1 defaults to a flat hierarchy below a flat parent
        _write(os.path.join(self.root, self._limit_file()), self.scratch_limit)
        if not plan.swap:
            # a scenario without swap must not swap where the machine has a
            # swap device: v2 memory.swap.max 0 bounds the whole subtree; v1
            # memory.swappiness 0 stops memcg reclaim from swapping anon, and
            # children created after it inherit it (mem_cgroup_css_alloc)
            if self.version == "v2":
                swap_max = os.path.join(self.root, "memory.swap.max")
                if os.path.exists(swap_max):
                    _write(swap_max, "0")
            else:
                swappiness = os.path.join(self.root, "memory.swappiness")
                if os.path.exists(swappiness):
                    _write(swappiness, "0")
        self.launch = os.path.join(self.root, "launch")
        self._mkdir(self.launch, enable_children=False)
        parents = {p.rsplit("/", 1)[0] for p, _ in plan.cgroups if "/" in p}
        for path, files in plan.cgroups:
            d = os.path.join(self.root, path)
            self._mkdir(d, enable_children=path in parents)
            self.run.cgroup_ids[path] = os.stat(d).st_ino
            for fname, value in files:
                try:
                    _write(os.path.join(d, fname), value)
                except OSError as e:
                    raise RunnerError(f"{plan.name}: cgroups.{path}.\"{fname}\": writing {value!r} failed "
                                      f"({_errname(-e.errno)}); check the file for cgroup {self.version}") from None

    def _teardown(self) -> None:
        for w in self._workers.values():
            w.kill()
        for path in reversed(self._made):
            _kill_members(path)
            for _ in range(100):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
        self._made = []
        for f in self._files:
            try:
                os.unlink(f)
            except OSError:
                pass

    # -- the run --------------------------------------------------------------------

    def run_plan(self, plan: Plan) -> KernelRun:
        self.run = KernelRun()
        self._made: list[str] = []
        self._workers: dict[str, _Worker] = {}
        self._files: list[str] = []
        started = time.monotonic()
        stop = threading.Event()
        collected: list = []
        pump = None
        try:
            self._build(plan)
            if self.session is not None:
                pump = threading.Thread(target=self._pump, args=(stop, collected), daemon=True)
                pump.start()
            for name, path in plan.tasks.items():
                self._spawn(plan, name, path)
            for i, op in enumerate(plan.ops):
                self.run.results.append(self._op(plan, i, op))
            time.sleep(self.settle)   # late events of the last op
            for path, _ in plan.cgroups:
                d = os.path.join(self.root, path)
                self.run.files[path] = {f: _read(os.path.join(d, f)) for f in END_FILES[self.version]
                                        if os.path.exists(os.path.join(d, f))}
            self.run.tasks = {n: w.refresh() for n, w in self._workers.items()}
        finally:
            stop.set()
            if pump is not None:
                pump.join()
            self._teardown()
        if self.session is not None:
            collected.extend(self.session.finish())
        ids = set(self.run.cgroup_ids.values())
        for ep in collected:
            d = ep.to_json() if hasattr(ep, "to_json") else ep
            if d.get("cgroup_id") in ids:
                self.run.episodes.append(d)
        self.run.seconds = time.monotonic() - started
        return self.run

    def _pump(self, stop: threading.Event, out: list) -> None:
        while not stop.is_set():
            out.extend(self.session.poll(timeout_ms=50))

    def _spawn(self, plan: Plan, name: str, path: str) -> None:
        w = _Worker(name, os.path.join(self.launch, "cgroup.procs"))
        self._workers[name] = w
        if plan.thp == "never":
            w.ask("thp never")
        w.ask(f"enter {os.path.join(self.root, path, 'cgroup.procs')}")

    def _op(self, plan: Plan, i: int, op: dict):
        kind = op.get("op")
        where = f"ops[{i}]"
        if kind == "touch":
            w = self._workers.get(op.get("task"))
            if w is None:
                raise RunnerError(f"{plan.name}: {where}.task: no task {op.get('task')!r}")
            # in the model's order: anon, file, then huge (model/environment.py touch)
            for what in ("anon", "file", "huge"):
                pages = _pages(op.get(what, 0))
                if not pages:
                    continue
                if what in ("anon", "huge"):
                    reply = w.ask(f"{what} {pages}")
                else:
                    target = os.path.join(self.workdir, f"{os.path.basename(self.root)}-{w.name}.bin")
                    if target not in self._files:
                        self._files.append(target)
                    reply = w.ask(f"file {target} {pages}")
                if reply is None:
                    return "killed"
            return "done"
        if kind == "write":
            d = os.path.join(self.root, str(op["cgroup"]).strip("/"))
            try:
                _write(os.path.join(d, op["file"]), str(op["value"]))
                return 0
            except OSError as e:
                return -e.errno
        if kind == "read":
            d = os.path.join(self.root, str(op["cgroup"]).strip("/"))
            return _read(os.path.join(d, op["file"]))
        if kind == "spawn":
            self._spawn(plan, op["task"], str(op["cgroup"]).strip("/"))
            return 0
        if kind == "exit":
            self._workers[op["task"]].exit()
            return 0
        raise RunnerError(f"{plan.name}: {where}.op: {kind!r} runs only in the model")


def _pages(value) -> int:
    if isinstance(value, int):
        return value
    b, _ = memparse(str(value).strip())
    return -(-b // PAGE_SIZE)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _errname(ret: int) -> str:
    return f"-{_errno.errorcode.get(-ret, str(-ret))}"
