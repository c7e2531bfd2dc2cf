"""`memcgscope record`: probe the charge path and write episodes as JSON
lines (schema memcgscope.episodes/1, documented in probes/README.md).

The file starts with a header line (kernel, mode, probes), then one line
per episode as it completes, a line per CPU that lost events, and a
trailer with the counts. SIGINT and SIGTERM end the recording cleanly:
probes detached, trailer written, exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time

EPILOG = """examples:
  memcgscope record --duration 60 --out episodes.jsonl
  memcgscope record --mode kprobe --out - | head
"""


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="record slow-path episodes as JSON lines",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE", help="where to write JSON lines ('-' for stdout)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    p.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"),
                   help="probe mode (default: the best usable one, see 'memcgscope doctor')")
    p.add_argument("--memcg-state", action="store_true",
                   help="also count memcg:mod_memcg_lruvec_state (6.13+); it fires several times per page fault")
    p.set_defaults(func=run)


class _Stop(Exception):
    pass


def header(session) -> dict:
    from memcgscope import __version__
    from memcgscope.probes.episodes import SCHEMA
    r = session.report
    return {"type": "header", "schema": SCHEMA, "memcgscope": __version__, "kernel": r.kernel,
            "machine": platform.machine(), "hostname": platform.node(), "mode": session.mode,
            "cgroup": {"v1_memory": r.cgroups.v1_memory, "v2_mount": r.cgroups.v2_mount,
                       "v2_memory": r.cgroups.v2_memory, "swap_accounting": r.cgroups.swap_accounting},
            "memsw": session.assembler.memsw, "page_size": os.sysconf("SC_PAGE_SIZE"),
            "forced_charges": session.forced_charges_visible(),
            "started_unix": time.time(),
            "probes": [{"role": p.role, "target": p.target, "kind": p.kind, "attached": p.attached,
                        "reason": p.reason} for p in session.status()]}


def run(args) -> int:
    from memcgscope.probes.session import Session, SessionError

    if args.duration is not None and args.duration <= 0:
        print(f"memcgscope record: --duration {args.duration}: must be positive seconds", file=sys.stderr)
        return 2
    if args.out != "-":
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            print(f"memcgscope record: --out {args.out}: directory {parent} does not exist", file=sys.stderr)
            return 2

    def stop(signum, frame):
        raise _Stop()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    episodes = 0
    session = Session(args.mode, memcg_state=args.memcg_state)
    try:
        try:
            session.open()
        except SessionError as e:
            print(f"memcgscope record: {e}", file=sys.stderr)
            return 1
        hdr = header(session)
        out.write(json.dumps(hdr) + "\n")
        out.flush()
        attached = [p.target for p in session.status() if p.attached]
        print(f"memcgscope record: mode {session.mode}, {len(attached)} probes attached; writing {args.out}",
              file=sys.stderr)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        try:
            while deadline is None or time.monotonic() < deadline:
                for ep in session.poll(timeout_ms=200):
                    out.write(json.dumps(ep.to_json()) + "\n")
                    episodes += 1
                out.flush()
        except _Stop:
            pass
        # block further signals while finishing, so the trailer is written
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        for ep in session.finish():
            out.write(json.dumps(ep.to_json()) + "\n")
            episodes += 1
        lost = session.lost()
        for cpu, n in enumerate(lost):
            if n:
                out.write(json.dumps({"type": "lost", "cpu": cpu, "events": n}) + "\n")
        out.write(json.dumps({"type": "trailer", "episodes": episodes, "lost_events": sum(lost),
                              "orphan_events": session.assembler.orphans, "events": session.events_seen,
                              "ended_unix": time.time()}) + "\n")
        if sum(lost):
            print(f"memcgscope record: {sum(lost)} events lost (ring buffer full); "
                  f"fewer episodes than happened", file=sys.stderr)
        return 0
    except _Stop:
        return 0
    finally:
        session.close()
        for s, h in old.items():
            signal.signal(s, h)
        if out is not sys.stdout:
            out.close()
