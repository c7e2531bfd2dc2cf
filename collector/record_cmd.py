"""`memcgscope record`: probe the charge path and write episodes as JSON
lines (the recording schema: docs/recording-schema.md).

The file starts with a header line (kernel, uname -v, the model profile
resolved for it, mode, what the probes can see), then one line per episode
as it completes, a line per CPU that lost events, and a trailer with the
counts. Each cgroup id gets a line with its path and workload identity
(unit, pod, container...) as this host sees it, before the first line that
mentions it, so `replay` names cgroups on any machine. `--check` also runs
every episode through the check pipeline `run` uses and prints the
verdicts at the end. SIGINT and SIGTERM end the recording cleanly: probes
detached, every episode and the trailer written, exit status 0 (1 with
--check when divergences were found).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading
import time

EPILOG = """examples:
  memcgscope record --duration 60 --out episodes.jsonl
  memcgscope record --mode kprobe --out - | head
  memcgscope record --check --out episodes.jsonl     also cross-check live
  memcgscope record --ebpf                           print the BPF program and exit
"""


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="record slow-path episodes as JSON lines",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="FILE", help="where to write JSON lines ('-' for stdout)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    p.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"),
                   help="probe mode (default: the best usable one, see 'memcgscope doctor')")
    p.add_argument("--profile", help="model profile to record and check against (default: from the running kernel)")
    p.add_argument("--check", action="store_true",
                   help="cross-check each episode against the model as it is recorded; summary on stderr")
    p.add_argument("--memcg-state", action="store_true",
                   help="also count memcg:mod_memcg_lruvec_state (6.13+); it fires several times per page fault")
    from .run_cmd import add_no_probe
    add_no_probe(p)
    p.add_argument("--ebpf", action="store_true", help="print the BPF program this kernel gets, and exit")
    p.set_defaults(func=run)


class HostNames:
    """Names cgroup ids for a recording (probes.episodes.RecordingWriter's
    ``names``) from this host's cgroupfs, with the collector's resolver
    (the id -> path of the `cgroup` label, WatchList.path_for) and
    identity (collector/identity.py).

    The resolver rate-limits its walks, which would leave a cgroup created
    since the last walk unnamed for good (the writer names an id once).  So
    a miss walks again, at most once per batch (``batch()`` is called
    after each poll): that walk comes after the batch's events, so an id
    still missing is of a cgroup already removed, and gets path null."""

    def __init__(self, hierarchy, resolver, names=None):
        from .identity import NodeNames
        from .watch import WatchList
        self.hierarchy = hierarchy
        self.resolver = resolver
        self.watch = WatchList(resolver, max_cgroups=None)
        self.names = names if names is not None else NodeNames()
        self._scans = resolver.scans
        self._refreshed = False

    def header(self) -> dict:
        """The header's ``cgroup_names``."""
        return {"relative_to": self.hierarchy.mountpoint, "source": "cgroupfs"}

    def batch(self) -> None:
        self._scans = self.resolver.scans
        self._refreshed = False

    def __call__(self, cgid: int) -> tuple[str | None, dict]:
        from .identity import identify
        path = self.watch.path_for(cgid)
        if path is None and self.resolver.scans == self._scans:
            self.resolver.rescan()
            path = self.watch.path_for(cgid)
        if path is None:
            return None, {}
        self.names.refresh()
        ident = identify(path, self.names)
        if not self._refreshed and ((ident.pod_uid and not ident.pod) or (ident.container_id and not ident.container)):
            # a pod or container newer than the names' last read
            self._refreshed = True
            self.names.refresh(force=True)
            ident = identify(path, self.names)
        return path, {k: v for k, v in ident.labels().items() if v}


def host_names():
    """HostNames over this host's memory hierarchy; raises CgroupError."""
    from .cgroups import resolver_for
    hierarchy, resolver = resolver_for()
    return HostNames(hierarchy, resolver)


def header_for(session, resolution, cgroup_names: dict | None = None) -> dict:
    """The recording header of a live session (probes.episodes.make_header);
    ``cgroup_names`` from HostNames.header() when the recording names its
    cgroups."""
    from memcgscope import __version__
    from memcgscope.probes.episodes import make_header
    r = session.report
    return make_header(
        kernel=r.kernel, kernel_version=r.kernel_version, upstream=resolution.upstream,
        profile=resolution.profile.name, profile_reason=resolution.reason, mode=session.mode,
        cgroup={"v1_memory": r.cgroups.v1_memory, "v2_mount": r.cgroups.v2_mount,
                "v2_memory": r.cgroups.v2_memory, "swap_accounting": r.cgroups.swap_accounting},
        memsw=session.assembler.memsw, probes=session.status(), memcgscope=__version__,
        machine=platform.machine(), hostname=platform.node(), started_unix=time.time(),
        cgroup_names=cgroup_names)


def _fail(msg: str, code: int = 1) -> int:
    print(f"memcgscope record: {msg}", file=sys.stderr)
    return code


def run(args) -> int:
    from memcgscope.model.profiles import resolve_profile
    from memcgscope.probes.episodes import RecordingWriter
    from memcgscope.probes.session import Session, SessionError

    from .cgroups import CgroupError
    from .pipeline import CheckPipeline
    from .run_cmd import print_ebpf, resolution_for

    if args.ebpf:
        try:
            print_ebpf(Session(args.mode, memcg_state=args.memcg_state, without=args.no_probe))
        except SessionError as e:
            return _fail(str(e))
        return 0
    if not args.out:
        return _fail("--out FILE is required (or --ebpf)", 2)
    if args.duration is not None and args.duration <= 0:
        return _fail(f"--duration {args.duration}: must be positive seconds", 2)
    if args.profile:
        try:
            resolve_profile("", override=args.profile)
        except ValueError as e:
            return _fail(f"--profile: {e}", 2)
    if args.out != "-":
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            return _fail(f"--out {args.out}: directory {parent} does not exist", 2)

    # the handler only sets an event: the loop ends between two polls, so
    # no episode, lost line or trailer is cut off by the signal
    stop = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    out = None
    session = Session(args.mode, memcg_state=args.memcg_state, without=args.no_probe)
    try:
        try:
            session.open()
        except SessionError as e:
            return _fail(str(e))
        report = session.report
        try:
            resolution = resolution_for(report, args.profile)
        except ValueError as e:
            return _fail(f"kernel {report.kernel}: {e}")
        if resolution.warning:
            print(f"memcgscope record: {resolution.warning}", file=sys.stderr)
        pipeline = None
        if args.check:
            version = "v1" if report.cgroups.v1_memory else "v2"
            pipeline = CheckPipeline(resolution.profile, version, session.assembler.memsw, session.visibility())
        try:
            names = host_names()
        except CgroupError as e:
            names = None
            print(f"memcgscope record: {e}; the recording holds cgroup ids only, without names", file=sys.stderr)
        out = sys.stdout if args.out == "-" else open(args.out, "w")
        writer = RecordingWriter(out, header_for(session, resolution, names.header() if names else None), names)
        attached = [p.target for p in session.status() if p.attached]
        print(f"memcgscope record: mode {session.mode}, {len(attached)} probes attached, model profile "
              f"{resolution.profile.name}; writing {args.out}", file=sys.stderr)

        def write(episodes) -> None:
            for ep in episodes:
                d = ep.to_json()
                writer.episode(d)
                if pipeline is not None:
                    pipeline.feed(d)

        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = session.poll(timeout_ms=200)
            if names is not None:
                names.batch()
            write(batch)
            writer.flush()
        batch = session.finish()
        if names is not None:
            names.batch()
        write(batch)
        lost = session.lost()
        writer.finish(lost, orphans=session.assembler.orphans, events=session.events_seen,
                      ended_unix=time.time())
        if names is not None:
            print(f"memcgscope record: {writer.episodes} episodes, {writer.cgroups} cgroups named"
                  + (f" ({writer.unresolved} already removed: ids only)" if writer.unresolved else ""),
                  file=sys.stderr)
        if sum(lost):
            print(f"memcgscope record: {sum(lost)} events lost (ring buffer full); "
                  f"fewer episodes than happened", file=sys.stderr)
        if pipeline is not None:
            counts = pipeline.counts()
            checked = sum(n for (c, v), n in counts.checks.items() if v != "skipped")
            print(f"memcgscope record: {writer.episodes} episodes, {checked} checks against profile "
                  f"{resolution.profile.name}, {counts.total_divergences} divergences"
                  + "".join(f"; {c}/{r}: {n}" for (c, r), n in sorted(counts.divergences.items())),
                  file=sys.stderr)
            return 1 if counts.total_divergences else 0
        return 0
    finally:
        session.close()
        for s, h in old.items():
            signal.signal(s, h)
        if out is not None and out is not sys.stdout:
            out.close()
