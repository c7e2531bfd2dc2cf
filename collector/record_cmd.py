"""`memcgscope record`: probe the charge path and write episodes as JSON
lines (the recording schema: docs/recording-schema.md).

The file starts with a header line (kernel, uname -v, the model profile
resolved for it, mode, what the probes can see), then one line per episode
as it completes, a line per CPU that lost events, and a trailer with the
counts. `--check` also runs every episode through the check pipeline `run`
uses and prints the verdicts at the end. SIGINT and SIGTERM end the
recording cleanly: probes detached, every episode and the trailer written,
exit status 0 (1 with --check when divergences were found).
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
    p.add_argument("--ebpf", action="store_true", help="print the BPF program this kernel gets, and exit")
    p.set_defaults(func=run)


def header_for(session, resolution) -> dict:
    """The recording header of a live session (probes.episodes.make_header)."""
    from memcgscope import __version__
    from memcgscope.probes.episodes import make_header
    r = session.report
    return make_header(
        kernel=r.kernel, kernel_version=r.kernel_version, upstream=resolution.upstream,
        profile=resolution.profile.name, profile_reason=resolution.reason, mode=session.mode,
        cgroup={"v1_memory": r.cgroups.v1_memory, "v2_mount": r.cgroups.v2_mount,
                "v2_memory": r.cgroups.v2_memory, "swap_accounting": r.cgroups.swap_accounting},
        memsw=session.assembler.memsw, probes=session.status(), memcgscope=__version__,
        machine=platform.machine(), hostname=platform.node(), started_unix=time.time())


def _fail(msg: str, code: int = 1) -> int:
    print(f"memcgscope record: {msg}", file=sys.stderr)
    return code


def run(args) -> int:
    from memcgscope.model.profiles import resolve_profile
    from memcgscope.probes.episodes import RecordingWriter
    from memcgscope.probes.session import Session, SessionError

    from .pipeline import CheckPipeline
    from .run_cmd import print_ebpf, resolution_for

    if args.ebpf:
        try:
            print_ebpf(Session(args.mode, memcg_state=args.memcg_state))
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
    session = Session(args.mode, memcg_state=args.memcg_state)
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
        out = sys.stdout if args.out == "-" else open(args.out, "w")
        writer = RecordingWriter(out, header_for(session, resolution))
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
            write(session.poll(timeout_ms=200))
            writer.flush()
        write(session.finish())
        lost = session.lost()
        writer.finish(lost, orphans=session.assembler.orphans, events=session.events_seen,
                      ended_unix=time.time())
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
