"""The collector's costs, on this machine.

    python tests/bench/bench_collector.py [--count N] [--baseline-ref REF [--rounds N]] [--live]

1. Ingest (no root): episodes recorded on the Debian guests
   (tests/unit/data/recordings) are turned back into the raw ring-buffer
   events the BPF side sends (struct event_t), then pushed through what the
   collector does with each: decode, episode assembly, cgroup label, the
   model cross-check, the counters behind the metrics, and a /metrics
   render every 10,000 episodes. Prints episodes per second on one core
   (targets: ≥ 100,000 short, ≥ 50,000 as recorded).
   --baseline-ref REF: before/after, same machine, same run. The code of
   git REF (a temporary worktree, removed afterwards) and this tree are
   each measured in a child process of this interpreter, recording by
   recording (the same files), alternately, --rounds times; each side runs
   its own tree's ingest() (so each its own decode and assembly path), the
   best round of each is printed with the ratio.
2. Ring-buffer bytes per episode (no root), for every guest x mode
   recording of the kernel matrix (tests/unit/data/recordings/matrix): one
   record (struct event_t and the ring's 8-byte header) per entry, step
   and exit, against the same with the OOM loop run-length encoded
   (EV_REPEAT), as the BPF side sends it now.
3. --live (root): `memcgscope run` on this host: time from start to the
   first successful scrape, resident memory after start, CPU at idle over
   10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from memcgscope.collector.cgroupfs import CgroupfsReader
from memcgscope.collector.daemon import Daemon
from memcgscope.collector.metrics import MemcgCollector
from memcgscope.collector.pipeline import CheckPipeline
from memcgscope.collector.replay_cmd import profile_of
from memcgscope.collector.watch import WatchList
from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import EV, EVENT_SIZE, RawEvent, decode_fields, load_recording
from memcgscope.probes.session import Aggregates

RECORDINGS = Path(__file__).resolve().parents[1] / "unit" / "data" / "recordings"
#: records per poll in ingest(): a busy node's polls hand over thousands
#: (Session.CONSUME_LIMIT is 8192); 64 keeps the batches small
POLL = 64
CALLER = {"other": 0, "charge": 1, "v1_limit": 2, "v2_max": 3, "v2_high": 4, "unknown": 5}
LIMIT_KIND = {"memory.limit_in_bytes": 1, "memory.memsw.limit_in_bytes": 1, "memory.max": 2, "memory.high": 3}


def _raw(type_, ep, ts, **fields) -> bytes:
    r = RawEvent()
    r.type, r.pid, r.tid, r.cpu, r.ts, r.episode = type_, ep["pid"], ep["tid"], ep["cpu"], ts, ep["ts_ns"]
    r.comm = ep["comm"].encode()[:15]
    for k, v in fields.items():
        if k == "counters":
            for name, value in (v or {}).items():
                setattr(r, name, value)
        elif k == "data":
            r.data = v.encode()[:23]
        else:
            setattr(r, k, v)
    return bytes(r)


def _oom_key(s: dict):
    return (s["cgroup_id"], s["gfp"], s["order"], s["result"], tuple(sorted((s.get("after") or {}).items())))


def to_raw_events(ep: dict) -> list[bytes]:
    """The events the BPF side would have sent for this episode: an OOM step
    identical to the one before it is counted, and the count goes out as one
    EV_REPEAT before the next event (probes/memcgscope.bpf.c on_oom_exit)."""
    out, ts = [], ep["ts_ns"]
    run_key, repeats = None, 0

    def flush():
        nonlocal repeats
        if repeats:
            out.append(_raw(EV.REPEAT, ep, ts, cgid=run_key[0], arg0=repeats))
            repeats = 0
    if ep["kind"] == "charge":
        out.append(_raw(EV.CHARGE_ENTER, ep, ts, cgid=ep["cgroup_id"], arg0=ep["gfp"], arg1=ep["nr_pages"],
                        counters=ep.get("entry")))
    elif ep["kind"] == "limit_write":
        value = ep.get("value", 0)
        out.append(_raw(EV.LIMIT_ENTER, ep, ts, cgid=ep["cgroup_id"], arg0=LIMIT_KIND.get(ep["file"], 1),
                        arg1=value, arg2=int("memsw" in ep["file"]), counters=ep.get("entry"),
                        data=ep.get("text", "")))
    else:
        return []
    for s in ep["steps"]:
        ts += 1
        k = s["kind"]
        if k == "oom":
            key = _oom_key(s)
            if key == run_key:
                repeats += 1
                continue
            flush()
            run_key = key
        else:
            flush()
            run_key = None
        if k == "counter_fail":
            out.append(_raw(EV.COUNTER_FAIL, ep, ts, cgid=s["cgroup_id"], arg0=int(s["counter"] == "memsw"),
                            arg1=s["nr_pages"], counters=s.get("at")))
        elif k == "reclaim":
            out.append(_raw(EV.RECLAIM, ep, ts, cgid=s["cgroup_id"], arg0=s["nr_pages"], arg1=s["gfp"],
                            arg2=s["options"], ret=s["freed"], caller=CALLER[s["caller"]],
                            counters=s.get("after")))
        elif k == "drain":
            out.append(_raw(EV.DRAIN, ep, ts, cgid=s["cgroup_id"] or 0))
        elif k == "oom":
            out.append(_raw(EV.OOM, ep, ts, cgid=s["cgroup_id"], arg0=s["gfp"], arg1=s["order"],
                            ret=int(s["result"]), counters=s.get("after")))
        elif k == "oom_kill":
            out.append(_raw(EV.OOM_KILL, ep, ts, cgid=s["cgroup_id"], arg0=s["victim_pid"]))
    ts += 1
    flush()
    if ep["kind"] == "charge":
        out.append(_raw(EV.CHARGE_EXIT, ep, ts, cgid=ep["cgroup_id"], arg0=ep["gfp"], arg1=ep["nr_pages"],
                        ret=ep["ret"], counters=ep.get("exit"), duration_ns=ep.get("duration_ns") or 0))
    else:
        out.append(_raw(EV.LIMIT_EXIT, ep, ts, cgid=ep["cgroup_id"], arg0=LIMIT_KIND.get(ep["file"], 1),
                        arg1=ep.get("value", 0), ret=ep["ret"], counters=ep.get("exit"),
                        flags=1 if ep.get("exit") else 0))
    return out


class _Resolver:
    """Every id resolves: the cost of a cached lookup, as for live cgroups."""

    def path(self, cgid):
        return f"/bench/{cgid}"

    def rescan(self):
        pass


class _Session:
    mode = "fentry"

    def aggregates(self):
        return Aggregates({}, [0])

    def status(self):
        return []

    def lost(self):
        return [0]


def ingest(count: int, short: bool = False) -> dict:
    results = {}
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        rec = load_recording(str(path))
        header = rec.header
        eps = [e for _, e in rec.episodes if e["kind"] in ("charge", "limit_write")
               and (not short or len(e["steps"]) <= 6)]
        streams = [to_raw_events(e) for e in eps]
        cg = rec.cgroup
        pipeline = CheckPipeline(profile_of(rec, None).profile, cg, rec.memsw, rec.visibility)
        daemon = Daemon(_Session(), watch=WatchList(_Resolver(), max_cgroups=1000),
                        reader=CgroupfsReader("/nonexistent", int(cg[1])), pipeline=pipeline, interval=1e9)
        registry = CollectorRegistry()
        registry.register(MemcgCollector(daemon))
        assembler = EpisodeAssembler(memsw=header["memsw"])
        # the recording's events as the ring buffer hands them over: POLL
        # records a poll (Session: decoded, then assembled in one call)
        records = [raw for stream in streams for raw in stream]
        polls = [records[k:k + POLL] for k in range(0, len(records), POLL)]
        done = 0
        start = time.process_time()
        i = 0
        while done < count:
            for ep in assembler.feed_all([decode_fields(raw) for raw in polls[i % len(polls)]]):
                daemon.handle(ep)
                done += 1
                if done % 10_000 == 0:
                    generate_latest(registry)
                if done == count:
                    break   # the same episodes as a baseline that feeds one at a time
            i += 1
        took = time.process_time() - start
        counts = daemon.check_counts()
        results[path.stem] = {"episodes": done, "seconds": took, "per_second": done / took,
                              "checks": sum(counts.checks.values()), "divergences": counts.total_divergences}
    return results


# --- before/after ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]

#: runs in a child: ingest() of the tree at argv[1], importing memcgscope
#: through the package links at argv[2] (never the editable install), over
#: the recordings in argv[3] (the same files for both trees)
_CHILD = r"""
import json, os, sys
from pathlib import Path
root, pkg, recordings, count, short = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:0] = [pkg, os.path.join(root, "tests", "bench")]
import bench_collector
import memcgscope.probes.assembly as asm
for mod in (bench_collector, asm):
    if not os.path.realpath(mod.__file__).startswith(os.path.realpath(root) + os.sep):
        raise SystemExit(f"{mod.__name__} came from {mod.__file__}, not {root}")
bench_collector.RECORDINGS = Path(recordings)
print(json.dumps(bench_collector.ingest(count, short)))
"""


def _package_links(tree: Path, where: Path) -> Path:
    """``where/memcgscope`` as the tree's pyproject maps it (package-dir):
    memcgscope.probes -> tree/probes, ...; → the directory to put on sys.path."""
    meta = tomllib.loads((tree / "pyproject.toml").read_text())
    dirs = meta["tool"]["setuptools"]["package-dir"]
    top = where / "memcgscope"
    top.mkdir(parents=True)
    (top / "__init__.py").symlink_to(tree / dirs.get("memcgscope", "memcgscope") / "__init__.py")
    for name, d in dirs.items():
        if name.count(".") == 1:
            (top / name.split(".", 1)[1]).symlink_to(tree / d, target_is_directory=True)
    return where


def _ingest_in_child(tree: Path, pkg: Path, recordings: Path, count: int, short: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(pkg), str(recordings), str(count),
                          "1" if short else "0"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_collector: ingest of {tree} failed (exit {out.returncode}):\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class BaselineTree:
    """A temporary worktree of ``ref`` (removed on exit)."""

    def __init__(self, ref: str):
        self.ref = ref
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
        self.path = self.tmp / "tree"

    def __enter__(self) -> Path:
        r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(self.path), self.ref],
                           capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise SystemExit(f"bench_collector: --baseline-ref {self.ref}: git worktree add failed: "
                             f"{r.stderr.strip()}; give a commit, branch or tag of {ROOT}")
        return self.path

    def __exit__(self, *exc) -> None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.path)],
                       capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


def compare(ref: str, count: int, short: bool, rounds: int = 3) -> dict:
    """{recording: {"before": r, "after": r}}: per recording (this tree's
    files, for both), ``rounds`` child runs of each tree back to back,
    alternating which goes first; the best of each (the machine's load
    only ever slows a run down)."""
    best: dict = {}
    with BaselineTree(ref) as base:
        links = Path(tempfile.mkdtemp(prefix="bench-links-"))
        try:
            sides = {"before": (base, _package_links(base, links / "before")),
                     "after": (ROOT, _package_links(ROOT, links / "after"))}
            for path in sorted(RECORDINGS.glob("*.jsonl")):
                one = links / "recordings" / path.stem
                one.mkdir(parents=True)
                (one / path.name).symlink_to(path)
                for i in range(rounds):
                    for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                        tree, pkg = sides[side]
                        for name, r in _ingest_in_child(tree, pkg, one, count, short).items():
                            cur = best.setdefault(name, {}).get(side)
                            if cur is None or r["per_second"] > cur["per_second"]:
                                best[name][side] = r
        finally:
            shutil.rmtree(links, ignore_errors=True)
    return best


def _print_compare(ref: str, best: dict) -> None:
    print(f"  {'':<22} {'before (' + ref + ')':>18} {'after':>12} {'ratio':>7}")
    tot = {"before": [0, 0.0], "after": [0, 0.0]}
    for name, sides in best.items():
        b, a = sides.get("before"), sides.get("after")
        for side, r in sides.items():
            tot[side][0] += r["episodes"]
            tot[side][1] += r["seconds"]
        if b is None or a is None:   # a recording one of the trees does not have
            print(f"  {name:<22} {'-' if b is None else format(b['per_second'], ',.0f'):>18} "
                  f"{'-' if a is None else format(a['per_second'], ',.0f'):>12}")
            continue
        same = "" if (a["checks"], a["divergences"]) == (b["checks"], b["divergences"]) else \
            f"  (checks/divergences differ: before {b['checks']}/{b['divergences']}, " \
            f"after {a['checks']}/{a['divergences']})"
        print(f"  {name:<22} {b['per_second']:>18,.0f} {a['per_second']:>12,.0f} "
              f"{a['per_second'] / b['per_second']:>6.2f}x  ({a['checks']} checks, {a['divergences']} divergences)"
              f"{same}")
    (be, bs), (ae, as_) = tot["before"], tot["after"]
    if bs and as_:
        print(f"  {'all':<22} {be / bs:>18,.0f} {ae / as_:>12,.0f} {(ae / as_) / (be / bs):>6.2f}x")


#: a BPF ring buffer record: the event and the ring's header (BPF_RINGBUF_HDR_SZ)
RING_RECORD = EVENT_SIZE + 8


def ring_bytes() -> dict:
    """recording -> (episodes, bytes per episode one record per step,
    bytes per episode with the OOM loop run-length encoded)."""
    out = {}
    for path in sorted((RECORDINGS / "matrix").glob("*.jsonl")):
        eps = [e for _, e in load_recording(str(path)).episodes]
        plain = encoded = 0
        for e in eps:
            if e["kind"] in ("charge", "limit_write"):
                plain += 2 + len(e["steps"])
                encoded += len(to_raw_events(e))
            else:   # over_high: entry and exit; the rest stand alone
                n = 2 if e["kind"] == "over_high" else 1
                plain += n
                encoded += n
        out[path.stem] = (len(eps), plain * RING_RECORD / len(eps), encoded * RING_RECORD / len(eps))
    return out


def live(seconds_idle: float = 10.0) -> dict:
    import psutil
    exe = os.path.join(os.path.dirname(sys.executable), "memcgscope")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.Popen([exe, "run", "--listen", f"127.0.0.1:{port}", "--divergence-log", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"memcgscope run exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        first_scrape = time.monotonic() - start
        p = psutil.Process(proc.pid)
        rss = p.memory_info().rss
        t0 = p.cpu_times()
        time.sleep(seconds_idle)
        t1 = p.cpu_times()
        idle_cpu = ((t1.user - t0.user) + (t1.system - t0.system)) / seconds_idle
        return {"first_scrape_s": first_scrape, "rss_mib": rss / 2**20, "idle_cpu_percent": idle_cpu * 100}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="episodes per recording")
    ap.add_argument("--baseline-ref", metavar="REF",
                    help="also measure the code of git REF, alternately, and print both and the ratio")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --baseline-ref: runs of each side per recording, alternating (the best counts)")
    ap.add_argument("--live", action="store_true", help="also start memcgscope run here (root)")
    args = ap.parse_args(argv)
    if args.count < 1 or args.rounds < 1:
        ap.error("--count and --rounds must be at least 1")
    for short, what in ((False, "as recorded (each v2 recording holds a memory.max OOM loop of ~450 steps)"),
                        (True, "short episodes only (<= 6 steps: > 95% of what the guests recorded)")):
        print(f"ingest, decode + assembly + label + cross-check + metrics, one core, {args.count} episodes "
              f"per recording, {what}:")
        if args.baseline_ref:
            _print_compare(args.baseline_ref, compare(args.baseline_ref, args.count, short, args.rounds))
            continue
        total_eps = total_s = 0.0
        for name, r in ingest(args.count, short).items():
            total_eps += r["episodes"]
            total_s += r["seconds"]
            print(f"  {name:<22} {r['per_second']:>10,.0f} episodes/s  ({r['checks']} checks, "
                  f"{r['divergences']} divergences)")
        print(f"  {'all':<22} {total_eps / total_s:>10,.0f} episodes/s")
    print(f"ring-buffer bytes per episode ({RING_RECORD} per record), the kernel matrix's recordings:")
    print(f"  {'recording':<28} {'episodes':>8} {'one per step':>13} {'OOM loop RLE':>13}")
    tot = [0, 0.0, 0.0]
    for name, (n, plain, encoded) in ring_bytes().items():
        print(f"  {name:<28} {n:>8} {plain:>13.0f} {encoded:>13.0f}")
        tot[0] += n
        tot[1] += plain * n
        tot[2] += encoded * n
    print(f"  {'all':<28} {tot[0]:>8} {tot[1] / tot[0]:>13.0f} {tot[2] / tot[0]:>13.0f}")
    if args.live:
        r = live()
        print(f"live: first scrape {r['first_scrape_s']:.2f} s after start, RSS {r['rss_mib']:.0f} MiB, "
              f"idle CPU {r['idle_cpu_percent']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
