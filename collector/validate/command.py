"""`validate [limits] -- CMD`: a user's command in a scratch cgroup with
those limits, under the probes; every episode of it through the check
pipeline.  Reports its exit status, the cgroupfs end state, the episodes
by kind and each divergence with its episode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from memcgscope.model.page_counter import PAGE_SIZE, memparse

from ..scratch import ScratchCgroup
from .runner import END_FILES

__all__ = ["run_command"]


def _bytes(flag: str, text: str) -> int:
    b, rest = memparse(text.strip())
    if rest or not text.strip():
        raise ValueError(f"{flag} {text!r}: not a size; use e.g. 30M, 1G or a byte count")
    return b


def run_command(env, args, command: list[str]) -> int:
    from memcgscope.probes.episodes import RecordingWriter

    from ..pipeline import CheckPipeline
    from ..record_cmd import header_for

    v = env.facts.cgroup
    try:
        limit = _bytes("--memory-max", args.memory_max) if args.memory_max else None
        high = _bytes("--memory-high", args.memory_high) if args.memory_high else None
        swap = _bytes("--swap-max", args.swap_max) if args.swap_max else None
    except ValueError as e:
        print(f"memcgscope validate: {e}", file=sys.stderr)
        return 2
    if high is not None and v == "v1":
        print("memcgscope validate: --memory-high: cgroup v1 has no memory.high; drop it or use a v2 host",
              file=sys.stderr)
        return 2
    if swap is not None and v == "v1" and not env.facts.memsw:
        print("memcgscope validate: --swap-max: v1 swap accounting is off here (no memory.memsw.*)",
              file=sys.stderr)
        return 2
    out = None
    if args.out:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            print(f"memcgscope validate: --out {args.out}: directory {parent} does not exist", file=sys.stderr)
            return 2
    session = env.session
    pipeline = (CheckPipeline(env.resolution.profile, v, env.facts.memsw, session.visibility(),
                              ancestors=env.resolver.ancestors) if session is not None else None)
    episodes, stop = [], threading.Event()

    def pump():
        while not stop.is_set():
            episodes.extend(session.poll(timeout_ms=50))

    # the scratch cgroup's own hard limit: the user's, else the scratch bound
    cg = ScratchCgroup("cmd", limit if limit is not None else args.scratch_limit, parent=env.parent, version=v,
                       memsw_limit=(limit or 0) + swap if (swap is not None and v == "v1") else None)
    status = None
    started = time.monotonic()
    files = {}
    with cg:
        if v == "v2":
            if high is not None:
                cg.write("memory.high", str(high))
            if swap is not None:
                cg.write("memory.swap.max", str(swap))
        env.resolver.rescan()
        t = None
        if session is not None:
            t = threading.Thread(target=pump, daemon=True)
            t.start()
        try:
            proc = cg.popen(command, start_new_session=True)
        except OSError as e:
            stop.set()
            print(f"memcgscope validate: {command[0]}: {e.strerror}; give a command on PATH", file=sys.stderr)
            return 2
        try:
            status = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
            print(f"memcgscope validate: {command[0]}: killed after --timeout {args.timeout:.0f}s", file=sys.stderr)
        time.sleep(0.3)
        files = {f: cg.read(f) for f in END_FILES[v] if os.path.exists(os.path.join(cg.path, f))}
        stop.set()
        if t is not None:
            t.join()
        cgid = cg.inode
    if session is not None:
        episodes.extend(session.finish())
    mine = [e.to_json() if hasattr(e, "to_json") else e for e in episodes]
    mine = [e for e in mine if e.get("cgroup_id") == cgid]
    divergences = []
    if pipeline is not None:
        for ep in mine:
            for d in pipeline.feed(ep).divergences:
                divergences.append({"check": d.check, "reason": d.reason, "detail": d.detail, "episode": ep})
    if args.out and session is not None:
        with open(args.out, "w") as f:
            w = RecordingWriter(f, header_for(session, env.resolution))
            for ep in mine:
                w.episode(ep)
            w.finish(session.lost(), orphans=session.assembler.orphans, events=session.events_seen,
                     ended_unix=time.time(), command=command, status=status)
    by_kind = {}
    for ep in mine:
        by_kind[ep["kind"]] = by_kind.get(ep["kind"], 0) + 1
    killed = status == -signal.SIGKILL
    report = {**env.facts_json(), "command": command, "exit_status": status, "oom_killed_likely": killed,
              "seconds": round(time.monotonic() - started, 1), "limits": {"memory_max": limit, "memory_high": high,
                                                                           "swap_max": swap},
              "end_state": {f: t.strip() for f, t in files.items()}, "episodes": len(mine),
              "episodes_by_kind": by_kind, "divergences": divergences}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(env.header())
        shown = "killed by SIGKILL (an OOM kill?)" if killed else f"exit status {status}"
        print(f"command: {' '.join(command)}: {shown} after {report['seconds']}s")
        for f, text in report["end_state"].items():
            print(f"  {f}: {text.replace(chr(10), '; ')}")
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())) or "none"
        print(f"episodes: {len(mine)} ({kinds})")
        if divergences:
            print(f"{len(divergences)} divergences:")
            for d in divergences:
                print(f"  {d['check']}/{d['reason']}: {d['detail']}")
                print(f"    episode: {json.dumps(d['episode'])[:300]}")
        else:
            print("no divergence" if pipeline is not None else "episodes not checked (--no-probes)")
    return 1 if divergences else 0
