"""The loader's handover (probes/loader.py) without root or bcc: stand-in
loader children speak the protocol over the real socketpair and pass real
fds (pipes) with SCM_RIGHTS; the collector's side must take exactly what a
complete handover sends, and on every failure (an error, a death mid-way,
a foreign object, a short count) close whatever it received and say so in
one line. Also: program kinds by name, and the stale-kprobe sweep over a
stand-in tracefs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from memcgscope.probes import attach, loader
from memcgscope.probes.loader import LoadError, LoadParams, program_kind

pytestmark = pytest.mark.unit

CHILD = textwrap.dedent("""
    import os, pickle, signal, socket, sys
    from memcgscope.probes import loader
    how, sock_fd = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(fileno=sock_fd)
    params = pickle.loads(sock.recv(1 << 20)[1:])
    assert params.mode == "tracepoint", params
    n = int(os.environ.get("FAKE_FDS", "3"))
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    meta = {"report": None, "mode": "tracepoint", "program": None, "item_names": {"events": {1: "PGFAULT"}},
            "maps": {"m": (0, None, None)}, "progs": {f"p{i}": (i, "kprobe", None) for i in range(1, n)}}
    if how == "ok":
        loader._send_handover(sock, meta, fds)
    elif how == "error":
        loader._send(sock, b"E", b"compiling or loading the tracepoint program failed: error: boom")
        os._exit(1)
    elif how == "die-mid":
        loader._send(sock, b"F", b"\\0\\0\\0\\0", fds[:2])
        os._exit(0)
    elif how == "kill-self":
        loader._send(sock, b"F", b"\\0\\0\\0\\0", fds[:2])
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "foreign":
        meta["report"] = os.system
        loader._send_handover(sock, meta, fds)
    elif how == "short":
        loader._send_handover(sock, meta, fds[:-1])
    os._exit(0)
""")


def run_load(how: str, **env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return loader.load(LoadParams(mode="tracepoint"), command=[sys.executable, "-c", CHILD, how])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def test_a_complete_handover_gives_every_fd_by_name():
    before = open_fds()
    h = run_load("ok")
    try:
        assert h.mode == "tracepoint" and h.item_names == {"events": {1: "PGFAULT"}}
        assert set(h.maps) == {"m"} and set(h.progs) == {"p1", "p2"}
        fds = h.fds()
        assert len(set(fds)) == 3 and all(os.fstat(fd) for fd in fds)
        assert h.progs["p1"][1:] == ("kprobe", None)
        assert not os.path.exists(f"/proc/{h.loader_pid}"), "the loader exited and was reaped"
    finally:
        h.close()
    assert open_fds() == before


def test_more_fds_than_one_message_carries_arrive_in_order():
    h = run_load("ok", FAKE_FDS="600")
    try:
        assert len(h.progs) == 599 and len(set(h.fds())) == 600
    finally:
        h.close()


@pytest.mark.parametrize("how, message", [
    ("error", r"^compiling or loading the tracepoint program failed: error: boom$"),
    ("die-mid", r"^the BPF loader \(pid \d+\) exited with status 0 before handing over its programs; "
                r"nothing was attached"),
    ("kill-self", r"^the BPF loader \(pid \d+\) was killed by SIGKILL before handing over"),
    ("foreign", r"^the BPF loader's description could not be read \(the loader sent a posix.system, "
                r"which is not allowed\); nothing was attached$"),
    ("short", r"^the BPF loader described fd 2 but sent only 2; nothing was attached$"),
])
def test_a_failed_handover_is_one_line_and_leaves_no_fd_behind(how, message):
    before = open_fds()
    with pytest.raises(LoadError, match=message) as e:
        run_load(how)
    assert "\n" not in str(e.value)
    assert open_fds() == before


def test_a_loader_that_cannot_start_is_one_line():
    with pytest.raises(LoadError, match=r"cannot start the BPF loader \(/nonexistent/python\)"):
        loader.load(LoadParams(mode="tracepoint"), command=["/nonexistent/python"])


def test_program_kinds_follow_bcc_and_program_py_names():
    assert program_kind("kfunc__try_charge_memcg") == ("fentry", "try_charge_memcg")
    assert program_kind("kretfunc__try_charge_memcg") == ("fexit", "try_charge_memcg")
    assert program_kind("raw_tracepoint__count_memcg_events") == ("raw_tracepoint", "count_memcg_events")
    assert program_kind("tracepoint__vmscan__mm_vmscan_memcg_reclaim_end") == \
        ("tracepoint", "vmscan:mm_vmscan_memcg_reclaim_end")
    assert program_kind("kp_charge_core_exit") == ("kprobe", None)
    with pytest.raises(LoadError, match="program uprobe__x: not a kind memcgscope attaches"):
        program_kind("uprobe__x")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_the_sweep_removes_only_events_of_dead_collectors(tmp_path):
    live = os.getppid()
    dead = dead_pid()
    own = os.getpid()
    events = tmp_path / "kprobe_events"
    events.write_text(f"r512:memcgscope/r{live}_0_try_charge_memcg try_charge_memcg\n"
                      f"r512:memcgscope/r{dead}_3_try_charge_memcg try_charge_memcg\n"
                      f"r512:memcgscope/r{own}_1_mem_cgroup_out_of_memory mem_cgroup_out_of_memory\n"
                      f"r512:kprobes/r_try_charge_memcg_bcc_{dead} try_charge_memcg\n"
                      f"p:memcgscope/p{dead}_x x\n")
    removed = attach.sweep_stale(str(tmp_path))
    assert removed == [f"memcgscope/r{dead}_3_try_charge_memcg", f"memcgscope/r{own}_1_mem_cgroup_out_of_memory"]
    # a regular file stands in for tracefs: the removals were appended
    tail = events.read_text().splitlines()[5:]
    assert tail == [f"-:{e}" for e in removed]
    assert attach.sweep_stale(None) == []


def test_event_names_carry_the_pid_and_fit_tracefs():
    name = attach._event_name("drain_all_stock.part.0", 4242)
    assert name.startswith("r4242_") and name.endswith("_drain_all_stock_part_0")
    assert len(attach._event_name("x" * 200, 4242)) == attach.MAX_EVENT_NAME
    assert attach._event_name("a", 1) != attach._event_name("a", 1)   # two sessions, one symbol


def test_the_kprobe_pmu_is_read_from_sysfs(tmp_path):
    assert attach.kprobe_pmu(str(tmp_path)) is None
    (tmp_path / "format").mkdir()
    (tmp_path / "type").write_text("8\n")
    (tmp_path / "format" / "retprobe").write_text("config:0\n")
    assert attach.kprobe_pmu(str(tmp_path)) == (8, 0)
