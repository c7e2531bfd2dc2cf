"""The loader/collector split on this host (tracepoint mode): the collector
process never maps LLVM, clang or bcc and stays within its memory bound
after start and after a reclaiming workload; a killed collector leaves no
program attached; a loader that dies mid-handover or cannot compile is a
one-line error with nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from memcgscope.collector.scratch import ScratchCgroup
from memcgscope.probes.session import Session, SessionError
from memcgscope.probes.sysroot import SysRoot
from promkit import bpf_prog_ids, new_programs_after_grace, run_collector

RSS_BOUND = 64 << 20          # issue 12: ≤ 64 MB resident after start and after an hour
COMPILER_LIBS = ("libLLVM", "libclang-cpp", "libbcc")


def compiler_libraries(pid: int) -> set[str]:
    """The LLVM / clang / bcc shared objects mapped into `pid`."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if any(lib in os.path.basename(path) for lib in COMPILER_LIBS):
                out.add(os.path.basename(path))
    return out


def test_the_check_sees_bcc_where_it_is_imported():
    """The mapping check itself, on a process that imports bcc (what the
    collector did before the split)."""
    p = subprocess.Popen([sys.executable, "-c", "import bcc, sys; print('in', flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "in"
        libs = compiler_libraries(p.pid)
        assert {"libbcc.so.0.26.0"} <= libs and any(lib.startswith("libLLVM") for lib in libs), libs
    finally:
        p.kill()
        p.wait()


def dd(cg: ScratchCgroup, path: str, mib: int) -> subprocess.Popen:
    return cg.popen(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read()


def test_the_collector_maps_no_compiler_and_stays_within_64_mb(workdir):
    target = "/var/tmp/memcgscope-host-rss.bin"
    with run_collector(workdir, "--divergence-log", "") as (proc, port, _stderr):
        scrape(port)
        assert compiler_libraries(proc.pid) == set()
        rss_start = psutil.Process(proc.pid).memory_info().rss
        try:
            with ScratchCgroup("rss", "32M") as cg:
                for _ in range(3):       # reclaim episodes through the whole pipeline
                    assert dd(cg, target, 96).wait(timeout=120) == 0
                time.sleep(2.5)          # two ticks while the cgroup exists: aggregates, cgroupfs, publish
                body = scrape(port)
        finally:
            if os.path.exists(target):
                os.unlink(target)
        assert b'memcgscope_events_lost_total{cpu="0"} 0.0' in body
        assert re.search(rb'memcgscope_episodes_total\{cgroup="[^"]*rss[^"]*",kind="reclaim"\} [1-9]', body), \
            [line for line in body.splitlines() if b"episodes_total" in line]
        rss_after = psutil.Process(proc.pid).memory_info().rss
        assert compiler_libraries(proc.pid) == set()
        print(f"collector RSS: {rss_start / 2**20:.1f} MiB after start, {rss_after / 2**20:.1f} MiB after the workload")
        assert rss_start <= RSS_BOUND and rss_after <= RSS_BOUND, (rss_start, rss_after)


SESSION_CHILD = """
import sys, time
from memcgscope.probes.session import Session
with Session("tracepoint") as s:
    s.poll(10)
    mapped = [l for l in open("/proc/self/maps") if any(x in l for x in ("libLLVM", "libclang", "libbcc"))]
    print("bcc" in sys.modules, len(mapped), s.loader_pid, flush=True)
    sys.stdin.read()
"""


def test_a_killed_collector_leaves_no_program_attached():
    """Every attachment is an fd of the collector: SIGKILL (no cleanup of
    ours runs) detaches them all, and the loader is long gone."""
    before = bpf_prog_ids()
    p = subprocess.Popen([sys.executable, "-c", SESSION_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        imported, mapped, loader_pid = p.stdout.readline().split()
        assert (imported, mapped) == ("False", "0"), "the session's process must not import or map bcc"
        assert not psutil.pid_exists(int(loader_pid)), "the loader exits after the handover"
        assert len(bpf_prog_ids() - before) >= 5, "programs are attached while it runs"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert new_programs_after_grace(before) == set()
    tracing = SysRoot("/").tracing_dir()
    if tracing and os.path.exists(os.path.join(tracing, "kprobe_events")):
        with open(os.path.join(tracing, "kprobe_events")) as f:
            assert "memcgscope/" not in f.read()


def loader_with(patch: str) -> list[str]:
    """The real loader with `patch` applied first (Session.loader_command)."""
    return [sys.executable, "-c", "import os, sys\nfrom memcgscope.probes import loader\n" + patch +
            "\nsys.exit(loader.child_main())"]


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def test_a_loader_that_dies_mid_handover_leaves_nothing(tmp_path):
    """It sends every fd, then dies before saying it is done: the session
    closes what it got, says so in one line, and no program stays."""
    before, fds_before = bpf_prog_ids(), open_fds()
    s = Session("tracepoint")
    s.loader_command = loader_with(
        "def die(sock, meta, fds):\n"
        "    for i in range(0, len(fds), 250):\n"
        "        loader._send(sock, b'F', b'\\0\\0\\0\\0', fds[i:i + 250])\n"
        "    os._exit(0)\n"
        "loader._send_handover = die")
    with pytest.raises(SessionError, match=r"^the BPF loader \(pid \d+\) exited with status 0 before handing over "
                                           r"its programs; nothing was attached") as e:
        s.open()
    assert "\n" not in str(e.value)
    assert not s.is_open
    assert new_programs_after_grace(before) == set()
    assert open_fds() == fds_before


def test_a_compile_error_is_one_line_naming_it():
    s = Session("tracepoint")
    s.loader_command = loader_with(
        "real = loader.prepare\n"
        "def broken(params):\n"
        "    p = real(params)\n"
        "    p.program.text += '\\nint memcgscope_broken( { return 0; }\\n'\n"
        "    return p\n"
        "loader.prepare = broken")
    before = bpf_prog_ids()
    with pytest.raises(SessionError) as e:
        s.open()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("compiling or loading the tracepoint program failed: ") and "error:" in msg, msg
    assert msg.endswith("(MEMCGSCOPE_DEBUG_BPF=1 shows everything)")
    assert new_programs_after_grace(before) == set()


def test_the_rss_benchmark_runs_at_a_tiny_size():
    """tests/bench/bench_rss.py end to end for a few seconds against the
    last main before the split: that collector maps the compiler, this one
    does not."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_rss
    r = bench_rss.measure(4, ref=bench_rss.BEFORE_SPLIT, sample_every=1)
    main, mine = r["collectors"]
    assert main.name == bench_rss.BEFORE_SPLIT[:12] and mine.name == "this checkout"
    assert main.compiler and not mine.compiler
    assert all(c.startup_s > 0 and c.rss_start > 0 and c.rss_end > 0 and c.scrapes >= 3 for c in (main, mine))
    assert mine.rss_end <= RSS_BOUND


def test_bench_probes_runs_with_its_empty_baseline():
    """tests/bench/bench_probes.py for one tiny round in tracepoint mode (the
    mode this host loads): every program it attached ran, and each has an
    empty program of its attach type on its target measured beside it."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_probes
    r = bench_probes.measure(["tracepoint"], rounds=1, iters=4, memcg_state=True)["tracepoint"]
    ran = [p for p in r["programs"] if p["runs_per_page"]]
    assert ran and r["runs_per_page"] >= 1, r
    for p in ran:
        assert p["ns_per_run"] and p["empty_ns_per_run"], p


def test_bench_probes_lean_leaves_the_per_page_tracepoint_out():
    """bench_probes --lean beside the default set, one tiny round: without
    count_memcg_events (6.13+: every faulted page counts PGFAULT through
    it) a fault runs about one program less, and that program is gone."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_probes
    r = bench_probes.measure(["tracepoint"], rounds=1, iters=4, without=bench_probes.LEAN, empties=False)
    full, lean = r["tracepoint"], r["tracepoint lean"]
    on = {p["target"] for p in full["programs"] if p["runs_per_page"]}
    assert "count_memcg_events" in on, full["programs"]
    assert "count_memcg_events" not in {p["target"] for p in lean["programs"]}, lean["programs"]
    assert lean["runs_per_page"] < full["runs_per_page"] - 0.9, (full["runs_per_page"], lean["runs_per_page"])
