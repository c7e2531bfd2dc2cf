"""`memcgscope trace`: a live line per slow-path episode of the memory-cgroup
charge path, in the manner of bcc's tools (root).

Traces the charge core's slow paths (reclaim, drains, OOM, failures,
forced charges), limit writes, page-charge failures, OOM kills and memcg
reclaims, with the probes `run` uses, and checks each episode against the
model of this kernel as it comes (a divergence is printed under its line).
On exit (Ctrl-C, or --duration) it prints a summary per cgroup.

Columns: TIME, COMM and PID of the task, the workload (pod, unit) or
cgroup, KIND (charge, limit, page, kill, reclm), PAGES asked, RECLAIM as
passes/pages freed, RESULT (0, -ENOMEM, -EBUSY, oom:PID for a charge that
killed, or the pages a reclaim freed), MS in the episode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict

EPILOG = """examples:
  memcgscope trace                          every slow path, every cgroup
  memcgscope trace --cgroup '/kubepods*'    only cgroups below /kubepods ('*' crosses '/')
  memcgscope trace --pod shop/cart          one pod (namespace/pod, or just the pod name)
  memcgscope trace --json | jq .            one JSON object per episode
  memcgscope trace --duration 60            stop after a minute, then the summary
"""

WIDTHS = (8, 9, 6, 15, 6, 5, 8, 9, 6)   # 72 + 8 spaces = 80
HEADER = ("TIME", "COMM", "PID", "CGROUP", "KIND", "PAGES", "RECLAIM", "RESULT", "MS")
KIND = {"charge": "charge", "limit_write": "limit", "page_charge_fail": "page", "oom_kill": "kill",
        "reclaim": "reclm"}
ERRNO = {-12: "-ENOMEM", -16: "-EBUSY", -4: "-EINTR", -22: "-EINVAL", -11: "-EAGAIN"}


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="a live line per slow-path episode, like bcc's tools (root)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cgroup", action="append", default=[], metavar="GLOB",
                   help="only cgroups whose path matches (repeatable; '*' crosses '/')")
    p.add_argument("--pod", metavar="[NAMESPACE/]POD", help="only this Kubernetes pod's cgroups")
    p.add_argument("--json", action="store_true", help="one JSON object per episode instead of columns")
    p.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"), help="probe mode (default: the best usable)")
    p.add_argument("--profile", help="model profile to check against (default: from the running kernel)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program and exit")
    p.set_defaults(func=run)


def _cell(value, width: int, tail: bool = False) -> str:
    text = "-" if value is None else str(value)
    if len(text) <= width:
        return text
    # a cgroup path says most at its end: keep that
    return "…" + text[-(width - 1):] if tail else text[:width - 1] + "…"


def line(cells) -> str:
    out = []
    for i, (c, w) in enumerate(zip(cells, WIDTHS)):
        text = _cell(c, w, tail=i == 3)
        out.append(text.rjust(w) if i in (2, 5, 6, 8) else text.ljust(w))
    return " ".join(out).rstrip()


def describe(ep: dict) -> dict:
    """The columns of one episode (as a dict, also the --json fields)."""
    steps = ep.get("steps") or ()
    reclaims = [s for s in steps if s.get("kind") == "reclaim"]
    kills = [s.get("victim_pid") for s in steps if s.get("kind") == "oom_kill"]
    kind = ep.get("kind")
    ret = ep.get("ret")
    if kind == "oom_kill":
        result = f"oom:{ep.get('victim_pid')}"
    elif kind == "reclaim":
        result = f"{ret}p" if isinstance(ret, int) else "-"
    elif kills:
        result = f"oom:{kills[0]}"
    elif isinstance(ret, int):
        result = ERRNO.get(ret, str(ret)) if ret < 0 else ("0" if kind != "limit_write" or ret == 0 else "ok")
    else:
        result = "-"
    pages = ep.get("nr_pages")
    if kind == "limit_write":
        pages = ep.get("value")
    freed = sum(s.get("freed", 0) for s in reclaims)
    return {"kind": KIND.get(kind, kind), "pages": pages, "reclaims": len(reclaims), "freed": freed,
            "result": result, "ms": (ep.get("duration_ns") or 0) / 1e6, "victims": kills}


def _fail(msg: str, code: int = 1) -> int:
    print(f"memcgscope trace: {msg}", file=sys.stderr)
    return code


def run(args) -> int:
    from memcgscope.model.profiles import resolve_profile
    from memcgscope.probes.session import Session, SessionError

    from .cgroups import CgroupError, resolver_for
    from .identity import NodeNames, identify
    from .pipeline import CheckPipeline
    from .run_cmd import print_ebpf, resolution_for
    from .watch import WatchList

    if args.ebpf:
        try:
            print_ebpf(Session(args.mode))
        except SessionError as e:
            return _fail(str(e))
        return 0
    if args.duration is not None and args.duration <= 0:
        return _fail(f"--duration {args.duration}: must be positive seconds", 2)
    if os.geteuid() != 0:
        return _fail("needs root (it loads BPF programs); run it as root", 2)
    try:
        hierarchy, resolver = resolver_for()
    except CgroupError as e:
        return _fail(str(e))
    stop = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    session = Session(args.mode)
    try:
        try:
            session.open()
        except SessionError as e:
            return _fail(str(e))
        r = session.report
        try:
            res = resolution_for(r, args.profile)
        except ValueError as e:
            return _fail(f"kernel {r.kernel}: {e}")
        pipeline = CheckPipeline(res.profile, f"v{hierarchy.version}", session.assembler.memsw,
                                 session.visibility(), ancestors=resolver.ancestors)
        watch = WatchList(resolver, globs=args.cgroup, max_cgroups=None)
        names = NodeNames()
        out = sys.stdout
        attached = [p for p in session.status() if p.attached]
        print(f"Tracing memory-cgroup slow paths with {session.mode} probes ({len(attached)} attached) on "
              f"{r.kernel}, checking against model profile {res.profile.name}"
              + (f" ({res.warning})" if res.warning else "") + "... Ctrl-C to end.", file=sys.stderr)
        if not args.json:
            out.write(line(HEADER) + "\n")
        summary = defaultdict(lambda: {"episodes": 0, "reclaims": 0, "ooms": 0, "divergences": 0})
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            for ep in session.poll(timeout_ms=200):
                _show(ep.to_json(), watch, names, identify, args, pipeline, summary, out)
            out.flush()
        for ep in session.finish():
            _show(ep.to_json(), watch, names, identify, args, pipeline, summary, out)
        _summary(summary, out if not args.json else sys.stderr)
        return 0
    finally:
        session.close()
        for s, h in old.items():
            signal.signal(s, h)


def _matches_pod(ident, pod: str) -> bool:
    if "/" in pod:
        ns, name = pod.split("/", 1)
        return ident.namespace == ns and ident.pod == name
    return ident.pod == pod


def _show(d, watch, names, identify, args, pipeline, summary, out) -> None:
    path, label = watch.observe(d["cgroup_id"])
    if path is not None and label is None:
        return   # --cgroup filters it out
    names.refresh()
    ident = identify(path, names) if path else None
    if args.pod and (ident is None or not _matches_pod(ident, args.pod)):
        return
    d["cgroup"] = path
    res = pipeline.feed(d)
    cols = describe(d)
    where = (ident.workload if ident else "") or path or f"id {d['cgroup_id']}"
    s = summary[where]
    s["episodes"] += 1
    s["reclaims"] += cols["reclaims"] + (1 if d["kind"] == "reclaim" else 0)
    s["ooms"] += len(cols["victims"]) + (1 if d["kind"] == "oom_kill" else 0)
    s["divergences"] += len(res.divergences)
    if args.json:
        out.write(json.dumps({**d, "workload": where, **({"identity": ident.labels()} if ident else {}),
                              "summary": cols, "divergences": [{"check": x.check, "reason": x.reason,
                                                                "detail": x.detail} for x in res.divergences]})
                  + "\n")
        return
    stamp = time.strftime("%H:%M:%S")
    recl = f"{cols['reclaims']}/{cols['freed']}" if cols["reclaims"] else "-"
    out.write(line((stamp, d.get("comm"), d.get("pid"), where, cols["kind"], cols["pages"], recl, cols["result"],
                    f"{cols['ms']:.1f}")) + "\n")
    for x in res.divergences:
        out.write(f"  ! divergence {x.check}/{x.reason}: {x.detail}"[:80] + "\n")


def _summary(summary, out) -> None:
    out.write("\n")
    out.write(f"{'CGROUP':<44} {'EPISODES':>8} {'RECLAIMS':>8} {'OOMS':>6} {'DIVERG':>8}\n")
    for where, s in sorted(summary.items(), key=lambda x: -x[1]["episodes"]):
        name = _cell(where, 44, tail=True)
        out.write(f"{name:<44} {s['episodes']:>8} {s['reclaims']:>8} {s['ooms']:>6} {s['divergences']:>8}\n")
