"""Tracepoint mode on this host's 6.18 kernel: reclaim episodes from a
workload in a scratch cgroup, checked against an independent reading of the
same vmscan tracepoint through a tracefs instance and against cgroupfs;
and nothing of ours stays loaded after any exit path."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from memcgscope.collector.scratch import ScratchCgroup
from memcgscope.probes.detect import tracefs_mounted
from memcgscope.probes.episodes import SCHEMA
from memcgscope.probes.bpfsys import bpf_stats_enabled
from memcgscope.probes.session import Session, SessionError
from memcgscope.probes.sysroot import SysRoot
from promkit import bpf_prog_ids, new_programs_after_grace

PAGE = os.sysconf("SC_PAGE_SIZE")
MEMCGSCOPE = os.path.join(os.path.dirname(sys.executable), "memcgscope")
PAGE_COUNTER_MAX = (2**63 - 1) // PAGE


@pytest.fixture
def tracefs():
    with tracefs_mounted(SysRoot("/")):
        yield SysRoot("/").tracing_dir()


class TraceInstance:
    """A private tracefs instance recording one event, read independently
    of memcgscope's BPF programs."""

    def __init__(self, tracing: str, event: str):
        self.dir = os.path.join(tracing, "instances", f"memcgscope-test-{os.getpid()}")
        self.event = event

    def __enter__(self):
        os.mkdir(self.dir)
        with open(os.path.join(self.dir, "buffer_size_kb"), "w") as f:
            f.write("8192")
        with open(os.path.join(self.dir, "events", self.event, "enable"), "w") as f:
            f.write("1")
        return self

    def text(self) -> str:
        with open(os.path.join(self.dir, "trace")) as f:
            return f.read()

    def __exit__(self, *exc):
        with open(os.path.join(self.dir, "events", self.event, "enable"), "w") as f:
            f.write("0")
        os.rmdir(self.dir)


def dd_workload(cg: ScratchCgroup, path: str, mib: int) -> subprocess.Popen:
    return cg.popen(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_reclaim_episodes_match_the_vmscan_tracepoint(tracefs, tmp_path):
    target = "/var/tmp/memcgscope-host-test.bin"
    try:
        with TraceInstance(tracefs, "vmscan/mm_vmscan_memcg_reclaim_end") as trace, \
                Session("tracepoint") as s, ScratchCgroup("probes", "32M") as cg:
            assert s.mode == "tracepoint"
            proc = dd_workload(cg, target, 128)
            episodes = []
            while proc.poll() is None:
                episodes += s.poll(100)
            episodes += s.finish()
            assert proc.returncode == 0
            failcnt = int(cg.read("memory.failcnt"))
            usage_now = int(cg.read("memory.usage_in_bytes")) // PAGE
            agg = s.aggregates().cgroups[cg.inode]
            trace_text = trace.text()
    finally:
        if os.path.exists(target):
            os.unlink(target)

    mine = [e for e in episodes if e.kind == "reclaim" and e.cgroup_id == cg.inode]
    assert len(mine) >= 5, f"expected reclaim episodes for cgroup {cg.inode}, got {len(mine)} of {len(episodes)}"
    assert all(e.comm == "dd" and e.pid == proc.pid for e in mine)

    # the same tracepoint read by the kernel's own tracer, for the dd task
    theirs = [int(m.group(2)) for m in re.finditer(r"-(\d+)\s+\[\d+\].*mm_vmscan_memcg_reclaim_end: nr_reclaimed=(\d+)",
                                                   trace_text) if int(m.group(1)) == proc.pid]
    assert len(theirs) == len(mine)
    assert sum(theirs) == sum(e.ret for e in mine) > 0
    assert agg.reclaim["unknown"]["calls"] == len(mine)
    assert agg.reclaim["unknown"]["freed"] == sum(theirs)

    # struct reads at BTF offsets against cgroupfs: the limit exactly, memsw
    # unlimited, usage never above the limit and near what cgroupfs shows
    for e in mine:
        assert e.exit["max"] == 32 * 2**20 // PAGE
        assert e.exit["memsw_max"] == PAGE_COUNTER_MAX
        assert 0 < e.exit["usage"] <= e.exit["max"]
    assert abs(mine[-1].exit["usage"] - usage_now) <= 1024  # dd keeps charging after the last reclaim
    # every reclaim followed a failed charge of this cgroup's counter
    assert failcnt >= len(mine)


def test_session_detaches_on_exception():
    before = bpf_prog_ids()
    with pytest.raises(RuntimeError):
        with Session("tracepoint"):
            assert bpf_prog_ids() - before, "programs should be loaded while the session is open"
            raise RuntimeError("boom")
    assert new_programs_after_grace(before) == set()


def test_unusable_mode_is_a_one_line_error():
    with pytest.raises(SessionError) as e:
        Session("kprobe").open()
    msg = str(e.value)
    assert "\n" not in msg
    assert "--mode kprobe is not usable here (kprobes absent" in msg and "memcgscope doctor" in msg


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_record_writes_episodes_and_detaches_on_signal(tmp_path, sig):
    before = bpf_prog_ids()
    out = tmp_path / "episodes.jsonl"
    target = f"/var/tmp/memcgscope-host-rec-{sig}.bin"
    rec = subprocess.Popen([MEMCGSCOPE, "record", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        # wait until the header is written: the probes are attached then
        for _ in range(300):
            if out.exists() and out.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        with ScratchCgroup("record", "32M") as cg:
            assert dd_workload(cg, target, 96).wait(timeout=120) == 0
            time.sleep(0.5)
        rec.send_signal(sig)
        assert rec.wait(timeout=10) == 0, rec.stderr.read()
    finally:
        if rec.poll() is None:
            rec.kill()
        if os.path.exists(target):
            os.unlink(target)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["schema"] == SCHEMA
    assert lines[0]["mode"] == "tracepoint"
    assert lines[-1]["type"] == "trailer"
    eps = [ln for ln in lines if ln["type"] == "episode"]
    assert lines[-1]["episodes"] == len(eps)
    assert any(e["kind"] == "reclaim" and e["cgroup_id"] == cg.inode for e in eps)
    # the scratch cgroup is named, by its path below the memory mount, before its first episode
    mount = lines[0]["cgroup_names"]["relative_to"]
    named = [i for i, ln in enumerate(lines) if ln["type"] == "cgroup" and ln["id"] == cg.inode]
    assert len(named) == 1 and lines[named[0]]["path"] == cg.path[len(mount):]
    assert named[0] < min(i for i, ln in enumerate(lines) if ln.get("cgroup_id") == cg.inode)
    assert lines[-1]["cgroups"] == sum(1 for ln in lines if ln["type"] == "cgroup")
    assert new_programs_after_grace(before) == set()


def test_pause_detaches_every_program(tmp_path):
    """Review bug: Session.pause() (the benchmarks' "bare" rounds) left the
    memcg:* raw tracepoints attached, so bare rounds still ran BPF on every
    page fault and the overhead was understated. Paused, no program of ours
    runs while a workload faults; resumed, they run again."""
    with bpf_stats_enabled() as on:
        assert on
        with Session("tracepoint") as s, ScratchCgroup("pause", "64M") as cg:
            assert any(p.kind == "tracepoint" and p.target.startswith("memcg:") and p.attached
                       for p in s.status()), "this host's kernel has the memcg:* tracepoints (6.13+)"
            touch = [sys.executable, "-c", "b = bytearray(32 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"]

            def runs() -> int:
                return sum(count for _ns, count in s.program_stats().values())

            s.pause()
            r0 = runs()
            assert cg.run(touch).returncode == 0
            assert runs() == r0, "a paused session still ran BPF programs"
            s.resume()
            r1 = runs()
            assert cg.run(touch).returncode == 0
            assert runs() > r1
