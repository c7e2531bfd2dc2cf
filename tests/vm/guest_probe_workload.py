"""Runs inside a guest (tests/vm): opens a probe session in the given mode,
drives workloads in scratch cgroups, and writes what it saw to a JSON file
for the host-side test to check.

    python3 guest_probe_workload.py MODE OUT.json [--episodes FILE.jsonl]

Workloads:
  thp      touch 64M of anon with THP in a 32M cgroup: huge-page charges
           fail with -ENOMEM (no reclaim bits), small pages reclaim, OOM
  file     write 96M through the page cache of a 32M cgroup: reclaim frees
  v1       a 48M anon holder under a 64M limit, then a 16M limit write:
           mem_cgroup_resize_max returns -EBUSY
  v2       the same holder, then memory.max = 16M: reclaim loop, OOM kill
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memcgscope.collector.cgroupfs import CgroupfsReader  # noqa: E402
from memcgscope.collector.cgroups import resolver_for  # noqa: E402
from memcgscope.collector.daemon import Daemon, DivergenceLog, Facts  # noqa: E402
from memcgscope.collector.pipeline import CheckPipeline  # noqa: E402
from memcgscope.collector.scratch import ScratchCgroup, own_memory_cgroup_dir  # noqa: E402
from memcgscope.collector.watch import WatchList  # noqa: E402
from memcgscope.collector.run_cmd import resolution_for  # noqa: E402
from memcgscope.model.profiles import get_profile  # noqa: E402
from memcgscope.probes.session import Session  # noqa: E402

PY = sys.executable
TOUCH = """
import mmap, sys, time
n = int(sys.argv[1]) << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 4096):
    m[off] = 1
print("touched", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
"""


DAEMON = None  # the collector's own loop body, fed every episode (the live cross-check)
EPISODES: list = []  # main's episode list (watch() pumps into it)


def pump(session, episodes, seconds=0.0, until=None):
    deadline = time.monotonic() + seconds
    while True:
        if session is None:   # no session (superseded() without the break): wait
            time.sleep(0.05)
            new = []
        else:
            new = session.poll(timeout_ms=50)
        episodes.extend(new)
        if DAEMON is not None:
            for ep in new:
                DAEMON.handle(ep)
        if until is not None and until():
            break
        if until is None and time.monotonic() >= deadline:
            break


def run_polling(session, episodes, cg, argv, timeout=300):
    """Runs argv in cg while consuming events, as the collector does: a
    ring buffer left unread fills and drops events."""
    proc = cg.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    pump(session, episodes, until=lambda: proc.poll() is not None or time.monotonic() > deadline)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return proc


def read_int(cg, name):
    try:
        return int(cg.read(name).split()[0])
    except (OSError, ValueError):
        return None


def events(cg):
    try:
        return dict(line.split() for line in cg.read("memory.events").splitlines())
    except OSError:
        return {}


def disk_backed_dir() -> str:
    """The guest's filesystems are tmpfs and 9p without a page cache: give
    the file workload an ext4 on zram, whose clean pages reclaim can drop
    (zram's own memory is not charged to the workload's cgroup)."""
    mnt = "/run/memcgscope-ext4"
    if os.path.ismount(mnt):
        return mnt
    subprocess.run(["modprobe", "zram"], check=True)
    with open("/sys/block/zram0/disksize", "w") as f:
        f.write("256M")
    subprocess.run(["mkfs.ext4", "-q", "-F", "/dev/zram0"], check=True)
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "/dev/zram0", mnt], check=True)
    return mnt


CGROUPS: dict = {}   # id -> path relative to the mount, for the recording's cgroup lines


def watch(cg):
    """Makes the collector watch a new scratch cgroup and take its cgroupfs
    baseline, so the next tick checks the workload's deltas."""
    CGROUPS[str(cg.inode)] = "/" + os.path.relpath(cg.path, DAEMON.watch.resolver.mountpoint)
    DAEMON.watch.resolver.rescan()
    DAEMON.watch.observe(cg.inode)
    # hand out the memory.max write that made the cgroup first: with its
    # episode still in the ring buffer the tick would hold the cgroup's
    # window (Session.in_flight) and take no baseline
    pump(DAEMON.session, EPISODES, 0.2)
    DAEMON.tick()


# another writer: memory.max = 64M again and again, as fast as it can (a
# gap longer than the 16M write's 16 reclaim passes, tens of ms in TCG, would
# let its OOM come first), until told to stop or for 1 s (without the break
# the 16M write loops from its first landing to the signal: ~10k OOM steps a
# second under TCG, and an episode keeps 65536: probes/assembly.py MAX_STEPS)
COMPETE = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
n = 0
end = None
while not os.path.exists(stop) and (end is None or time.monotonic() < end):
    with open(path, "w") as f:
        f.write("64M")
    n += 1
    if n == 1:
        print("ready", flush=True)
        end = time.monotonic() + 1
print(n, flush=True)
"""


def superseded(s, episodes) -> dict:
    """v2: memory.max = 16M below a 48M holder while another writer keeps
    setting 64M. Kernels with "mm: memcg: stop reclaim when a limit update
    is superseded" (6.1.188, 6.12.109, 6.18.50, 7.2.4, 7.3) stop the 16M
    write's reclaim loop once the limit changed under it, and the holder
    lives (an OOM pass may come first when the other write lands just
    before it: it finds margin and kills nothing). Older ones go on: if their OOM comes before the other write it
    kills the holder; after it, mem_cgroup_out_of_memory finds margin under
    the new limit and returns true without a kill, pass after pass (the
    livelock the break fixes), until a signal ends the write: the workload
    sends one (SIGUSR1 to the writing thread) half a second after the other
    writer stopped.

    ``s`` None (kernels without the break): that loop traces 300k-600k OOM
    steps a second (5.10.262 and 6.18.15 guests, TCG), more than any ring
    buffer holds until the OOM retry loop is run-length encoded in the BPF
    side; the workload runs after the session closed (pause/resume cannot
    serve: 5.10.262 refuses to attach an fentry program again,
    bpf_tracing_prog_attach's -ENOENT) and memory.events tells the kernel's
    side."""
    import signal
    import threading
    probed = s is not None
    with ScratchCgroup("superseded", "64M") as cg:
        if probed:
            watch(cg)
        holder = cg.popen([PY, "-c", TOUCH, "48", "600"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "touched"
        stop = f"/run/memcgscope-supersede-stop-{os.getpid()}"
        other = subprocess.Popen([PY, "-c", COMPETE, os.path.join(cg.path, "memory.max"), stop],
                                 stdout=subprocess.PIPE, text=True)
        # a Python start-up takes seconds in a TCG guest: wait for its first write
        assert other.stdout.readline().strip() == "ready"
        errno_seen = []

        def write():
            try:
                cg.write("memory.max", "16M")
                errno_seen.append(0)
            except OSError as e:
                errno_seen.append(e.errno)
        # a signal that ends a kernel loop (signal_pending), not the process
        previous = signal.signal(signal.SIGUSR1, lambda *_: None)
        t = threading.Thread(target=write)
        t.start()
        # read the ring buffer while it writes
        pump(s, episodes, until=lambda: not t.is_alive() or other.poll() is not None)
        grace = time.monotonic() + 0.5
        pump(s, episodes, until=lambda: not t.is_alive() or time.monotonic() > grace)
        signalled = t.is_alive()
        if signalled:
            signal.pthread_kill(t.ident, signal.SIGUSR1)
            pump(s, episodes, until=lambda: not t.is_alive())
        t.join()
        signal.signal(signal.SIGUSR1, previous)
        open(stop, "w").close()
        writes = int(other.stdout.read().split()[-1])
        other.wait()
        os.unlink(stop)
        time.sleep(0.2)
        alive = holder.poll() is None
        pump(s, episodes, 0.5)
        out = {"cgroup_id": cg.inode, "errno": errno_seen[0], "holder_alive": alive,
               "holder_returncode": holder.returncode, "competing_writes": writes, "writer_signalled": signalled,
               "probed": probed,
               "events": events(cg),
               "max_after": cg.read("memory.max").strip()}
        holder.kill()
        holder.wait()
        if probed:
            pump(s, episodes, 0.5)
            DAEMON.tick()
        return out


def main() -> int:
    global DAEMON, EPISODES
    mode, out_path = sys.argv[1], sys.argv[2]
    jsonl = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--episodes" else None
    with open("/sys/kernel/mm/transparent_hugepage/enabled", "w") as f:
        f.write("always")
    _, version = own_memory_cgroup_dir()
    result = {"mode_requested": mode, "version": version, "workloads": {}}
    episodes: list = []
    EPISODES = episodes
    t0 = time.monotonic()
    with Session(mode) as s:
        result["open_seconds"] = round(time.monotonic() - t0, 1)
        result["mode"] = s.mode
        result["probes"] = [p.__dict__ for p in s.status()]
        hierarchy, resolver = resolver_for()
        # the one resolver run uses (uname -v carries Debian 5.10's real version)
        resolution = resolution_for(s.report)
        profile = resolution.profile.name
        cgroup = f"v{hierarchy.version}"
        div_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "divergences.jsonl")
        DAEMON = Daemon(s, watch=WatchList(resolver), reader=CgroupfsReader(resolver.mountpoint, hierarchy.version),
                        pipeline=CheckPipeline(resolution.profile, cgroup, s.assembler.memsw, s.visibility(),
                                               ancestors=resolver.ancestors),
                        divergence_log=DivergenceLog(div_path), interval=1e9,
                        facts=Facts(kernel=s.report.kernel, upstream=resolution.upstream, profile=profile,
                                    profile_exact=resolution.exact, cgroup_version=hierarchy.version))
        result["profile"] = profile
        result["profile_reason"] = resolution.reason
        result["kernel"] = s.report.kernel
        result["kernel_version"] = s.report.kernel_version
        result["upstream"] = resolution.upstream

        # thp: anon beyond the limit, huge pages first
        with ScratchCgroup("thp", "32M") as cg:
            watch(cg)
            fail0 = read_int(cg, "memory.failcnt") if version == "v1" else None
            r = run_polling(s, episodes, cg, [PY, "-c", TOUCH, "64"])
            pump(s, episodes, 0.5)
            agg = s.aggregates().cgroups.get(cg.inode)
            result["workloads"]["thp"] = {
                "cgroup_id": cg.inode, "returncode": r.returncode,
                "failcnt_delta": (read_int(cg, "memory.failcnt") - fail0) if version == "v1" else None,
                "events": events(cg) if version == "v2" else None,
                "counter_failures": agg.counter_failures if agg else {},
                "charges": agg.charges if agg else {}, "page_charges": agg.page_charges if agg else {},
                "oom": agg.oom if agg else {}}
            DAEMON.tick()

        # file: page cache that reclaim can free
        target = os.path.join(disk_backed_dir(), "memcgscope-vm-file.bin")
        with ScratchCgroup("file", "32M") as cg:
            watch(cg)
            # oflag=dsync: each 1M written back before the next, so reclaim finds
            # clean pages (as validate's worker does); with one fsync at the end
            # a 6.18 guest's 32M cgroup fills with dirty ext4 folios and OOMs
            r = run_polling(s, episodes, cg, ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=96",
                                              "oflag=dsync"])
            pump(s, episodes, 0.5)
            os.unlink(target)
            DAEMON.tick()
            agg = s.aggregates().cgroups.get(cg.inode)
            result["workloads"]["file"] = {"cgroup_id": cg.inode, "returncode": r.returncode,
                                           "reclaim": agg.reclaim if agg else {}}

        # a limit write below what the holder cannot give back
        with ScratchCgroup("limit", "64M") as cg:
            watch(cg)
            holder = cg.popen([PY, "-c", TOUCH, "48", "600"], stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "touched"
            pump(s, episodes, 0.5)
            if version == "v1":
                usage_before = read_int(cg, "memory.usage_in_bytes")
                errno_seen = 0
                try:
                    cg.write("memory.limit_in_bytes", "16M")
                except OSError as e:
                    errno_seen = e.errno
                pump(s, episodes, 0.5)
                result["workloads"]["v1_limit"] = {
                    "cgroup_id": cg.inode, "errno": errno_seen, "usage_before": usage_before,
                    "usage_after": read_int(cg, "memory.usage_in_bytes"),
                    "limit_after": read_int(cg, "memory.limit_in_bytes")}
            else:
                usage_before = read_int(cg, "memory.current")
                errno_seen = 0
                try:
                    cg.write("memory.max", "16M")
                except OSError as e:
                    errno_seen = e.errno
                holder.wait(timeout=60)
                pump(s, episodes, 0.5)
                result["workloads"]["v2_max"] = {
                    "cgroup_id": cg.inode, "errno": errno_seen, "usage_before": usage_before,
                    "holder_returncode": holder.returncode, "events": events(cg)}
            holder.kill()
            holder.wait()
            pump(s, episodes, 0.5)
            DAEMON.tick()

        brk = get_profile(profile).limit_superseded_break
        if version == "v2" and brk:
            result["workloads"]["superseded"] = superseded(s, episodes)
        for ep in s.finish():
            episodes.append(ep)
            DAEMON.handle(ep)
        DAEMON.divergence_log.close()
        c = DAEMON.check_counts()
        result["crosscheck"] = {
            "episodes": DAEMON.total_episodes(), "unresolved": DAEMON.unresolved(),
            "checks": {f"{check}:{verdict}": n for (check, verdict), n in c.checks.items()},
            "divergences": {f"{check}:{reason}": n for (check, reason), n in c.divergences.items()},
            "records": [json.loads(line) for line in open(div_path)][:20] if os.path.exists(div_path) else []}
        result["lost"] = s.lost()
        result["orphans"] = s.assembler.orphans
    if version == "v2" and not brk:
        # after the session: nothing attached (see superseded)
        result["workloads"]["superseded"] = superseded(None, episodes)
    result["episodes"] = [e.to_json() for e in episodes]
    result["cgroups"] = CGROUPS
    if jsonl:
        with open(jsonl, "w") as f:
            for e in result["episodes"]:
                f.write(json.dumps(e) + "\n")
    with open(out_path, "w") as f:
        json.dump(result, f)
    print(f"guest workload: mode {result['mode']}, {len(episodes)} episodes, lost {sum(result['lost'])}, "
          f"checks {result['crosscheck']['checks']}, divergences {result['crosscheck']['divergences']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
