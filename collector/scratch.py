"""Scratch memory cgroups for workloads (validate, tests, benchmarks).

Rules (docs/architecture.md): a scratch cgroup is created only
below the cgroup this process already runs in, gets its hard limit before
anything runs in it, holds only processes this module started, and is
removed on every exit path (context manager, plus a sweep of stale ones
left by a crashed run, recognised by the dead pid in their name).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from memcgscope.probes.sysroot import SysRoot

__all__ = ["ScratchCgroup", "ScratchError", "own_memory_cgroup_dir", "pid_alive", "sweep_stale"]

PREFIX = "memcgscope-"
_STALE = re.compile(rf"^{PREFIX}.*-(\d+)$")


class ScratchError(Exception):
    pass


def own_memory_cgroup_dir(sysroot: SysRoot | None = None) -> tuple[str, str]:
    """(directory of this process's memory cgroup, "v1" | "v2")."""
    sysroot = sysroot or SysRoot("/")
    own = sysroot.proc_self_cgroup()
    for m in sysroot.mounts():
        if m.fstype == "cgroup" and "memory" in m.options and "memory" in own:
            return os.path.join(m.mountpoint, own["memory"].lstrip("/")), "v1"
    for m in sysroot.mounts():
        if m.fstype == "cgroup2" and "" in own:
            controllers = (sysroot.read_text(f"{m.mountpoint}/cgroup.controllers") or "").split()
            if "memory" in controllers:
                return os.path.join(m.mountpoint, own[""].lstrip("/")), "v2"
    raise ScratchError("no memory cgroup for this process (no v1 memory hierarchy, no v2 memory controller); "
                       "see 'memcgscope doctor'")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_stale(parent: str | None = None) -> list[str]:
    """Removes scratch cgroups whose creating process is gone."""
    parent = parent or own_memory_cgroup_dir()[0]
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _STALE.match(name)
        if m and not pid_alive(int(m.group(1))):
            path = os.path.join(parent, name)
            _kill_members(path)
            try:
                os.rmdir(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _read_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_members(path: str) -> None:
    for _ in range(50):
        pids = _read_pids(path)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


class ScratchCgroup:
    """A memory cgroup below our own, with a hard limit.

        with ScratchCgroup("probe-test", limit="32M") as cg:
            proc = cg.popen(["dd", ...]); proc.wait()
    """

    def __init__(self, name: str, limit: str | int, *, memsw_limit: str | int | None = None,
                 parent: str | None = None, version: str | None = None):
        if parent is None:
            parent, detected = own_memory_cgroup_dir()
            version = version or detected
        self.version = version or "v1"
        self.parent = parent
        self.name = f"{PREFIX}{name}-{os.getpid()}"
        self.path = os.path.join(parent, self.name)
        self.limit = str(limit)
        self.memsw_limit = None if memsw_limit is None else str(memsw_limit)
        self._procs: list[subprocess.Popen] = []
        self._inode: int | None = None

    # files
    def write(self, filename: str, text: str) -> None:
        with open(os.path.join(self.path, filename), "w") as f:
            f.write(text)

    def read(self, filename: str) -> str:
        with open(os.path.join(self.path, filename)) as f:
            return f.read()

    @property
    def inode(self) -> int:
        """The cgroup id the kernel reports for this cgroup (kept after removal)."""
        if self._inode is None:
            self._inode = os.stat(self.path).st_ino
        return self._inode

    def create(self) -> "ScratchCgroup":
        sweep_stale(self.parent)
        os.mkdir(self.path)
        self._inode = os.stat(self.path).st_ino
        try:
            if self.version == "v1":
                self.write("memory.limit_in_bytes", self.limit)
                if self.memsw_limit is not None:
                    self.write("memory.memsw.limit_in_bytes", self.memsw_limit)
            else:
                self.write("memory.max", self.limit)
                if self.memsw_limit is not None:
                    self.write("memory.swap.max", self.memsw_limit)
        except BaseException:
            os.rmdir(self.path)
            raise
        return self

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Starts argv inside the cgroup: the child moves itself in before
        exec, so nothing of it runs outside the limit."""
        procs_file = os.path.join(self.path, "cgroup.procs")

        def enter():
            with open(procs_file, "w") as f:
                f.write("0")  # "0" is the writing process itself
        proc = subprocess.Popen(argv, preexec_fn=enter, **kw)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = self.popen(argv, stdout=kw.pop("stdout", subprocess.PIPE),
                          stderr=kw.pop("stderr", subprocess.PIPE), text=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def remove(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        _kill_members(self.path)
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        raise ScratchError(f"{self.path}: could not be removed (still busy); remove it with rmdir")

    def __enter__(self) -> "ScratchCgroup":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()
