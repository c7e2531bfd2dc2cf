"""Runs inside a guest (tests/vm): every guest-side step of the VM tier in
one boot, each a subprocess with its own timeout, so a step that fails or
hangs still lets the others report. The host-side tests read the files.

    python3 guest_suite.py OUTDIR [STEP ...]

Steps (default: DEFAULT, in this order):
  doctor   doctor --capture OUTDIR/capture, doctor.txt and doctor.json
  kprobe   guest_probe_workload.py kprobe -> probes-kprobe.json, episodes-kprobe.jsonl
  fentry   guest_probe_workload.py fentry -> probes-fentry.json, episodes-fentry.jsonl
  node     guest_node_workload.py (memcgscope run, scraped) -> node.json
  delegated  guest_delegated.py (validate alone in a v2 cgroup) -> delegated.json
  command  guest_command.py (validate -- CMD: one OOMs, one fits) -> command.json
  loader   guest_loader_workload.py (a killed collector leaves nothing, kprobe and fentry) -> loader.json
OUTDIR/steps.json: each step's exit status and seconds; OUTDIR/STEP.dmesg
the kernel's messages during the step. `validate` runs
after this script (collector/validate/vm.py's guest_command: it turns swap
on, which the steps here must not have).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
BIN = os.path.dirname(PY)

STEPS = {
    "doctor": (lambda o: f"{BIN}/memcgscope doctor --capture {o}/capture > {o}/doctor.txt 2> {o}/doctor.err; "
                         f"echo table=$? >> {o}/doctor.rc; "
                         f"{BIN}/memcgscope doctor --json > {o}/doctor.json 2>> {o}/doctor.err; "
                         f"echo json=$? >> {o}/doctor.rc", 300),
    "kprobe": (lambda o: f"{PY} {HERE}/guest_probe_workload.py kprobe {o}/probes-kprobe.json "
                         f"--episodes {o}/episodes-kprobe.jsonl", 900),
    "fentry": (lambda o: f"{PY} {HERE}/guest_probe_workload.py fentry {o}/probes-fentry.json "
                         f"--episodes {o}/episodes-fentry.jsonl", 900),
    "node": (lambda o: f"{PY} {HERE}/guest_node_workload.py {o}/node.json", 600),
    "delegated": (lambda o: f"{PY} {HERE}/guest_delegated.py {o}/delegated.json", 300),
    "command": (lambda o: f"{PY} {HERE}/guest_command.py {o}/command.json", 600),
    "loader": (lambda o: f"{PY} {HERE}/guest_loader_workload.py {o}/loader.json", 900),
}
#: the steps run when none are named (`delegated` and `command` run where
#: conftest.py's ONE_GUEST asks)
DEFAULT = ("doctor", "kprobe", "fentry", "node")


def main() -> int:
    out = os.path.abspath(sys.argv[1])
    wanted = sys.argv[2:] or list(DEFAULT)
    os.makedirs(out, exist_ok=True)
    done = {}
    for name in wanted:
        cmd, timeout = STEPS[name]
        start = time.monotonic()
        with open(f"{out}/{name}.log", "w") as log:
            proc = subprocess.Popen(["sh", "-c", cmd(out)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # the whole step: its shell and the workload it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        done[name] = {"returncode": rc, "seconds": round(time.monotonic() - start, 1)}
        # the kernel's messages during the step (OOM reports, BPF warnings): read
        # and cleared, so each file holds one step's; this guest is ours
        with open(f"{out}/{name}.dmesg", "w") as f:
            subprocess.run(["dmesg", "-c"], stdout=f, stderr=subprocess.STDOUT)
        print(f"memcgscope vm step {name}: {done[name]}", file=sys.stderr, flush=True)
        with open(f"{out}/steps.json", "w") as f:
            json.dump(done, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
