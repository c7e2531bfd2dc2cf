"""What one `validate` run needs, set up once and torn down on every exit
path: the memory hierarchy, the scratch parent (never outside the
caller's own cgroup unless --parent says so), the probe session, the
profile of this kernel, and the facts that decide which scenarios apply."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict

from memcgscope.probes.sysroot import SysRoot

__all__ = ["SetupError", "environment", "Environment", "thp_setting", "workdir_problem"]

#: filesystems whose pages are not page cache reclaim can drop (tmpfs,
#: ramfs: shmem; 9p, overlay on tmpfs: not charged as page cache in a guest)
_NOT_PAGE_CACHE = {"tmpfs", "ramfs", "9p", "overlay", "devtmpfs", "proc", "sysfs", "cgroup", "cgroup2"}


class SetupError(Exception):
    """One line: what, where, the fix."""


def thp_setting(sysroot: SysRoot, file: str = "enabled") -> str:
    text = sysroot.read_text(f"/sys/kernel/mm/transparent_hugepage/{file}") or ""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "never"


def workdir_problem(path: str, sysroot: SysRoot) -> str | None:
    if not os.path.isdir(path):
        return f"--workdir {path}: not a directory; give a directory on a local disk filesystem"
    real = os.path.realpath(path)
    best, fstype = "", None
    for m in sysroot.mounts():
        mp = m.mountpoint.rstrip("/") or "/"
        if (real == mp or real.startswith(mp.rstrip("/") + "/") or mp == "/") and len(mp) >= len(best):
            best, fstype = mp, m.fstype
    if fstype in _NOT_PAGE_CACHE:
        return (f"--workdir {path} is on {fstype}, whose pages are not page cache that reclaim can drop; "
                f"give a directory on a disk filesystem (ext4, xfs, btrfs)")
    return None


class Environment:
    def __init__(self, *, hierarchy, resolver, parent, facts, resolution, report, session, validator):
        self.hierarchy = hierarchy
        self.resolver = resolver
        self.parent = parent
        self.facts = facts
        self.resolution = resolution
        self.report = report
        self.session = session
        self.validator = validator

    def header(self) -> str:
        r, res = self.report, self.resolution
        mode = self.session.mode if self.session is not None else "no probes"
        import textwrap
        lines = [f"memcgscope validate: kernel {r.kernel} ({res.upstream or 'version unknown'}), "
                 f"model profile {res.profile.name}, {mode}",
                 f"cgroup {self.facts.cgroup} at {self.hierarchy.mountpoint}; scratch cgroups below "
                 f"{self.parent}"]
        if res.warning:
            lines.append(f"warning: {res.warning}")
        return "\n".join(textwrap.fill(line, 80, subsequent_indent="  ", break_long_words=True,
                                       break_on_hyphens=False) for line in lines)

    def facts_json(self) -> dict:
        r, res = self.report, self.resolution
        return {"kernel": r.kernel, "kernel_version": r.kernel_version, "upstream": res.upstream,
                "profile": res.profile.name, "profile_reason": res.reason, "profile_warning": res.warning,
                "mode": self.session.mode if self.session is not None else None,
                "facts": asdict(self.facts), "parent": self.parent}


@contextlib.contextmanager
def environment(args, sysroot: SysRoot | None = None):
    from ..cgroups import CgroupError, resolver_for

    sysroot = sysroot or SysRoot("/")
    try:
        hierarchy, resolver = resolver_for(sysroot)
    except CgroupError as e:
        raise SetupError(str(e)) from None
    version = f"v{hierarchy.version}"
    own = os.path.join(sysroot.path(hierarchy.mountpoint), hierarchy.own_cgroup.lstrip("/"))
    if args.parent:
        parent = args.parent
        mount = sysroot.path(hierarchy.mountpoint)
        if not os.path.isdir(parent) or not os.path.realpath(parent).startswith(os.path.realpath(mount)):
            raise SetupError(f"--parent {parent}: not a cgroup directory of the memory hierarchy at {mount}; "
                             f"give a directory below it that you own")
    elif hierarchy.own_cgroup == "/":
        raise SetupError(f"you run in the root memory cgroup of {hierarchy.mountpoint}: memcgscope makes scratch "
                         f"cgroups only below your own; pass --parent DIR to name where they may go")
    else:
        parent = own
    leaf = None
    if version == "v2" and "memory" not in _subtree(parent):
        if args.parent:
            raise SetupError(f"--parent {parent}: the memory controller is not enabled for its children "
                             f"(cgroup.subtree_control); echo +memory there, or give another parent")
        leaf = _own_leaf(own)
    try:
        yield from _environment(args, sysroot, hierarchy, resolver, version, own, parent)
    finally:
        if leaf is not None:
            _leave_leaf(own, leaf)


def _subtree(path: str) -> list[str]:
    try:
        with open(os.path.join(path, "cgroup.subtree_control")) as f:
            return f.read().split()
    except OSError:
        return []


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _own_leaf(own: str) -> str:
    """cgroup v2 lets a cgroup enable controllers for its children only
    while no process is in it ("no internal processes"). When memcgscope is
    alone in its own cgroup (``systemd-run --scope -p Delegate=yes
    memcgscope validate``), it moves itself into a leaf it makes there and
    enables the memory controller for the scenarios' siblings; undone on
    exit (_leave_leaf)."""
    others = [p for p in _procs(own) if p != os.getpid()]
    if others:
        raise SetupError(f"{own}: the memory controller is not enabled for its children (cgroup.subtree_control) "
                         f"and {len(others)} other process(es) share this cgroup; run memcgscope alone in a "
                         f"delegated cgroup (systemd-run --scope -p Delegate=yes memcgscope validate ...) or pass "
                         f"--parent with a cgroup whose children have the memory controller")
    leaf = os.path.join(own, f"memcgscope-self-{os.getpid()}")
    try:
        os.mkdir(leaf)
        with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
            f.write("0")
        with open(os.path.join(own, "cgroup.subtree_control"), "w") as f:
            f.write("+memory")
    except OSError as e:
        _leave_leaf(own, leaf)
        raise SetupError(f"{own}: could not enable the memory controller for its children ({e.strerror}); "
                         f"run from a delegated cgroup (systemd-run --scope -p Delegate=yes ...) or pass "
                         f"--parent") from None
    return leaf


def _leave_leaf(own: str, leaf: str) -> None:
    """Back as found: the controller off again, this process back in its
    cgroup, the leaf removed (the scratch cgroups are gone by now)."""
    for path, text in ((os.path.join(own, "cgroup.subtree_control"), "-memory"),
                       (os.path.join(own, "cgroup.procs"), "0")):
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError:
            pass
    try:
        os.rmdir(leaf)
    except OSError:
        pass


def _environment(args, sysroot, hierarchy, resolver, version, own, parent):
    from memcgscope.probes.detect import detect
    from memcgscope.probes.session import Session, SessionError

    from ..pipeline import CheckPipeline
    from ..run_cmd import resolution_for
    from .suite import Facts, Validator

    # page-cache files are the scenarios' (file ops); a command does its own I/O
    problem = workdir_problem(args.workdir, sysroot) if getattr(args, "command", None) is None else None
    if problem:
        raise SetupError(problem)
    session = None
    try:
        if getattr(args, "no_probes", False):
            report = detect(sysroot)
        else:
            session = Session(args.mode, sysroot=sysroot)
            try:
                session.open()
            except SessionError as e:
                raise SetupError(f"{e} (or pass --no-probes to compare end states only)") from None
            report = session.report
        try:
            resolution = resolution_for(report, args.profile)
        except ValueError as e:
            raise SetupError(f"--profile: {e}" if args.profile else f"kernel {report.kernel}: {e}") from None
        memsw = version == "v1" and os.path.exists(os.path.join(own, "memory.memsw.limit_in_bytes"))
        facts = Facts(version, bool(sysroot.swaps()), memsw, thp_setting(sysroot),
                      resolution.profile.has_memory_reclaim, thp_setting(sysroot, "defrag"))

        def pipeline_for():
            resolver.rescan()   # the scenario's cgroups are new
            return CheckPipeline(resolution.profile, version, memsw, session.visibility(),
                                 ancestors=resolver.ancestors)

        validator = Validator(facts, resolution, parent=parent, workdir=args.workdir, session=session,
                              pipeline_for=pipeline_for if session is not None else None,
                              scratch_limit=args.scratch_limit)
        yield Environment(hierarchy=hierarchy, resolver=resolver, parent=parent, facts=facts,
                          resolution=resolution, report=report, session=session, validator=validator)
    finally:
        if session is not None:
            session.close()
