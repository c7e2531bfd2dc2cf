"""Runs inside a guest (tests/vm/test_loader_vm.py): what a collector that
dies leaves behind, in kprobe and fentry mode, where the kernel can attach
them (this host cannot).

    python3 guest_loader_workload.py OUT.json [MODE ...]   (default: kprobe fentry)

For each MODE, a collector (a Session in a child process) is opened and
then SIGKILLed; recorded each time: the BPF programs loaded beyond those
before, our lines in kprobe_events, whether the named kretprobe events left
are disabled and inert (their kprobe_profile hits do not move under a
charging workload), then what the next session's start sweeps, and the same
with MEMCGSCOPE_KRETPROBE_MAXACTIVE=0 (the kprobe PMU, no tracefs events).
Two session starts (two bcc compiles) per mode. The collector's resident
memory is recorded by the node step (guest_node_workload.py), which runs
`memcgscope run` anyway.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memcgscope.collector.scratch import ScratchCgroup  # noqa: E402
from memcgscope.probes import bpfsys  # noqa: E402
from memcgscope.probes.sysroot import SysRoot  # noqa: E402

PY = sys.executable
CHILD = """
import json, sys
from memcgscope.probes.session import Session
with Session(sys.argv[1]) as s:
    s.poll(10)
    mapped = [l for l in open("/proc/self/maps") if any(x in l for x in ("libLLVM", "libclang", "libbcc"))]
    print(json.dumps({"bcc_imported": "bcc" in sys.modules, "compiler_mapped": len(mapped),
                      "loader_pid": s.loader_pid, "attachments": s.attachments(),
                      "probes": [p.__dict__ for p in s.status()]}), flush=True)
    sys.stdin.read()
"""
TOUCH = "b = bytearray(24 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"


def prog_ids() -> set[int]:
    """Every loaded BPF program's id (BPF_PROG_GET_NEXT_ID)."""
    ids, start = set(), 0
    while True:
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("=I", attr, 0, start)
        ret, err = bpfsys._bpf(11, attr)
        if ret < 0:
            return ids
        start = struct.unpack_from("=I", attr, 4)[0]
        ids.add(start)


def tracing() -> str:
    return SysRoot("/").tracing_dir() or "/sys/kernel/tracing"


def ours() -> list[str]:
    try:
        with open(os.path.join(tracing(), "kprobe_events")) as f:
            text = f.read()
    except FileNotFoundError:    # no CONFIG_KPROBE_EVENTS (this file runs on such hosts too)
        return []
    return [line for line in text.splitlines() if "memcgscope/" in line or "_bcc_" in line]


def profile_hits(names: set[str]) -> dict[str, int]:
    """kprobe_profile hits of these events (by name, without the group)."""
    out = {}
    if not names:
        return out
    with open(os.path.join(tracing(), "kprobe_profile")) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in names:
                out[parts[0]] = int(parts[1])
    return out


def enabled(line: str) -> str:
    event = line.split()[0].split(":", 1)[1]          # memcgscope/<name>
    with open(os.path.join(tracing(), "events", event, "enable")) as f:
        return f.read().strip()


def gone_after_grace(before: set[int], grace: float = 10.0) -> list[int]:
    deadline = time.monotonic() + grace
    while True:
        left = prog_ids() - before
        if not left or time.monotonic() > deadline:
            return sorted(left)
        time.sleep(0.1)


def crash(mode: str, env: dict) -> dict:
    """Opens a session in a child, records what is attached, SIGKILLs it,
    records what is left."""
    before = prog_ids()
    t0 = time.monotonic()
    p = subprocess.Popen([PY, "-c", CHILD, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, **env))
    line = p.stdout.readline()
    if not line:
        p.wait()
        return {"error": f"the session child exited with {p.returncode}"}
    r = json.loads(line)
    r["open_seconds"] = round(time.monotonic() - t0, 1)
    r["loader_alive"] = os.path.exists(f"/proc/{r['loader_pid']}")
    r["programs_while_running"] = len(prog_ids() - before)
    r["kprobe_events_while_running"] = ours()
    r["pid"] = p.pid
    p.send_signal(signal.SIGKILL)
    p.wait()
    r["programs_left"] = gone_after_grace(before)
    left = ours()
    r["kprobe_events_left"] = left
    r["left_enabled"] = [enabled(line) for line in left if "memcgscope/" in line]
    names = {line.split()[0].split("/", 1)[1] for line in left}
    hits0 = profile_hits(names)
    with ScratchCgroup("loader-vm", "16M") as cg:      # charges and reclaims: the probed functions run
        for _ in range(3):
            cg.run([PY, "-c", TOUCH])
    hits1 = profile_hits(names)
    r["left_hits_moved"] = {k: hits1[k] - v for k, v in hits0.items() if hits1.get(k) != v}
    return r


def main() -> int:
    out_path = sys.argv[1]
    modes = sys.argv[2:] or ["kprobe", "fentry"]
    result = {}
    for mode in modes:
        r = result[mode] = {}
        # 1. the default (kretprobes with maxactive 512: named tracefs events)
        r["default"] = crash(mode, {})
        # 2. the next start sweeps what the first left, and with maxactive 0
        #    (the PMU) creates nothing in kprobe_events; killed as well
        #    (a bcc compile under TCG, ~35 s: skipped where the first run had
        #    no kretprobe, fentry mode on kernels where every role is fexit)
        kret = [a for a in r["default"].get("attachments", []) if a[0] == "kretprobe"]
        r["pmu"] = crash(mode, {"MEMCGSCOPE_KRETPROBE_MAXACTIVE": "0"}) if mode == "kprobe" or kret else None
        r["kprobe_events_at_end"] = ours()
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(r)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
