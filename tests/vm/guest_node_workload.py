"""Runs inside a guest (tests/vm): the collector as a user runs it
(`memcgscope run`, its HTTP endpoint on loopback), and workloads whose
metrics a node's user looks at; scrapes and writes what it saw.

    python3 guest_node_workload.py OUT.json

Workloads (scratch cgroups below this process's own):
  high     v2: memory.high 16M under a 256M max; a task keeps charging just
           above it: throttled (penalty sleeps) and alive, no OOM
  victim   a parent with a 64M limit and two children: `a` holds 40M and
           sleeps, `b` charges 40M; the OOM runs for the parent (the
           trigger: b's charge) and kills a's task (the victim)
Between them the endpoint is scraped twice: throttled seconds must grow.
The collector's footprint is recorded after its first scrape and after both
workloads (they reclaim): resident memory and whether LLVM, clang or bcc
are mapped in it (the loader/collector split; tests/vm/test_loader_vm.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from memcgscope.collector.cgroups import find_memory_hierarchy  # noqa: E402
from memcgscope.collector.scratch import ScratchCgroup, own_memory_cgroup_dir  # noqa: E402

PY = sys.executable
MEMCGSCOPE = os.path.join(os.path.dirname(PY), "memcgscope")
LISTEN = "127.0.0.1:10064"
MiB = 1 << 20

# touch N MiB, say so, then sleep (a holder)
HOLD = """
import mmap, sys, time
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 4096):
    m[off] = 1
print("touched", flush=True)
time.sleep(600)
"""

# charge until memory.current is just above memory.high, then one new page
# every few ms for SECONDS: each return to user space owes pages over high
ABOVE_HIGH = """
import mmap, sys, time
cg, seconds = sys.argv[1], float(sys.argv[2])
high = int(open(cg + "/memory.high").read())
m = mmap.mmap(-1, 512 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
off = 0
while int(open(cg + "/memory.current").read()) < high + (2 << 20):
    m[off] = 1; off += 4096
print("above", off >> 12, flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    m[off] = 1; off += 4096
    time.sleep(0.002)
print("done", off >> 12, flush=True)
"""


def scrape() -> dict:
    """{(name, frozenset(labels)): value} of one /metrics scrape."""
    with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(found) if found else None


def wait_endpoint(proc, timeout=600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"memcgscope run exited {proc.returncode} before serving")
        try:
            scrape()
            return time.monotonic() - start
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"memcgscope run did not serve {LISTEN} in {timeout}s")


def footprint(pid: int) -> tuple[int, int]:
    """(VmRSS in bytes, LLVM/clang/bcc lines in /proc/PID/maps)."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/maps") as f:
        mapped = sum(1 for line in f if any(x in line for x in ("libLLVM", "libclang", "libbcc")))
    return rss, mapped


def label_of(cg: ScratchCgroup, mount: str) -> str:
    return "/" + os.path.relpath(cg.path, mount)


def settle(seconds=3.0):
    # the collector reads cgroupfs every --interval (1 s): give it a few
    time.sleep(seconds)


def high_workload(mount: str, version: str, out: dict) -> None:
    if version != "v2":
        out["high"] = {"not_applicable": "memory.high is a cgroup v2 file"}
        return
    with ScratchCgroup("high", "256M") as cg:
        cg.write("memory.high", "16M")
        label = label_of(cg, mount)
        p = cg.popen([PY, "-c", ABOVE_HIGH, cg.path, "6"], stdout=subprocess.PIPE, text=True)
        first = p.stdout.readline().split()
        settle()
        s1 = scrape()
        rest = p.stdout.read().split()
        p.wait(timeout=120)
        settle()
        s2 = scrape()
        events = dict(line.split() for line in cg.read("memory.events").splitlines())
        out["high"] = {
            "cgroup": label, "returncode": p.returncode, "above": first, "done": rest,
            "events": events, "stat": cg.read("memory.stat"), "pressure": cg.read("memory.pressure"),
            "throttled_1": value(s1, "memcgscope_high_throttled_seconds_total", cgroup=label),
            "throttled_2": value(s2, "memcgscope_high_throttled_seconds_total", cgroup=label),
            "handler_calls": value(s2, "memcgscope_high_handler_calls_total", cgroup=label),
            "sleeps": value(s2, "memcgscope_high_throttle_seconds_count", cgroup=label),
            "high_reclaims": value(s2, "memcgscope_reclaim_calls_total", cgroup=label, caller="high"),
            "oom_kills": value(s2, "memcgscope_oom_kills_total", cgroup=label),
            "pressure_some": value(s2, "memcgscope_cgroup_pressure_seconds_total", cgroup=label, kind="some"),
            "pressure_full": value(s2, "memcgscope_cgroup_pressure_seconds_total", cgroup=label, kind="full"),
            "stat_anon": value(s1, "memcgscope_cgroup_memory_stat_bytes", cgroup=label, item="anon"),  # while it runs
            "stat_file": value(s1, "memcgscope_cgroup_memory_stat_bytes", cgroup=label, item="file"),
            "threshold_high": value(s2, "memcgscope_cgroup_memory_threshold_bytes", cgroup=label, file="memory.high"),
            "info": [dict(ls) for (n, ls), _ in s2.items() if n == "memcgscope_cgroup_info"
                     and ("cgroup", label) in ls],
        }


def victim_workload(mount: str, version: str, out: dict) -> None:
    with ScratchCgroup("oomparent", "64M") as parent:
        if version == "v2":
            parent.write("cgroup.subtree_control", "+memory")
        else:
            # 5.10's v1 root is not hierarchical (use_hierarchy 0; 5.11 made it
            # always 1): ask for it before the children exist
            try:
                parent.write("memory.use_hierarchy", "1")
            except OSError:
                pass
        with ScratchCgroup("a", "1G", parent=parent.path, version=version) as a, \
                ScratchCgroup("b", "1G", parent=parent.path, version=version) as b:
            holder = a.popen([PY, "-c", HOLD, "40"], stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "touched"
            charger = b.popen([PY, "-c", HOLD, "40"], stdout=subprocess.PIPE, text=True)
            charger_line = charger.stdout.readline().strip()
            holder.wait(timeout=60)
            settle()
            s = scrape()
            charger.kill()
            charger.wait()
            labels = {k: label_of(c, mount) for k, c in (("parent", parent), ("a", a), ("b", b))}
            out["victim"] = {
                "cgroups": labels, "holder_returncode": holder.returncode, "charger_line": charger_line,
                "kills": {k: value(s, "memcgscope_oom_kills_total", cgroup=v) for k, v in labels.items()},
                "victims": {k: value(s, "memcgscope_oom_victims_total", cgroup=v) for k, v in labels.items()},
                "oom_calls": {k: value(s, "memcgscope_oom_invocations_total", cgroup=v)
                              for k, v in labels.items()},
            }
            if version == "v2":
                out["victim"]["events"] = {
                    k: dict(line.split() for line in c.read("memory.events.local").splitlines())
                    for k, c in (("parent", parent), ("a", a), ("b", b))}


def main() -> int:
    out_path = sys.argv[1]
    out_dir = os.path.dirname(os.path.abspath(out_path))
    _, version = own_memory_cgroup_dir()
    mount = find_memory_hierarchy().mountpoint
    out: dict = {"version": version}
    log = open(os.path.join(out_dir, "node-run.log"), "w")
    t0 = time.monotonic()
    run = subprocess.Popen([MEMCGSCOPE, "run", "--listen", LISTEN, "--interval", "1", "--divergence-log",
                            os.path.join(out_dir, "node-divergences.jsonl")], stdout=log, stderr=log)
    try:
        out["serving_after_seconds"] = round(wait_endpoint(run), 1)
        c = out["collector"] = {}
        c["rss_start"], c["compiler_mapped_start"] = footprint(run.pid)
        high_workload(mount, version, out)
        victim_workload(mount, version, out)
        s = scrape()
        c["rss_after"], c["compiler_mapped_after"] = footprint(run.pid)
        c["episodes"] = sum(v for (n, _ls), v in s.items() if n == "memcgscope_episodes_total")
        c["lost"] = sum(v for (n, _ls), v in s.items() if n == "memcgscope_events_lost_total")
        out["divergences"] = {f"{dict(ls).get('check')}:{dict(ls).get('reason')}": v for (n, ls), v in s.items()
                              if n == "memcgscope_divergences_total" and v}
        out["mode"] = [dict(ls).get("mode") for (n, ls), _ in s.items() if n == "memcgscope_build_info"]
        with open(os.path.join(out_dir, "node-metrics.txt"), "w") as f:
            with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=10) as r:
                f.write(r.read().decode())
    finally:
        run.send_signal(signal.SIGINT)
        try:
            out["run_returncode"] = run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            out["run_returncode"] = run.wait()
        log.close()
        out["seconds"] = round(time.monotonic() - t0, 1)
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
    print(f"node workload: {json.dumps({k: v for k, v in out.items() if k not in ('high', 'victim')})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
