"""Runs inside a v2 guest (tests/vm): `memcgscope validate` started alone
in a cgroup whose children lack the memory controller (what `systemd-run
--scope -p Delegate=yes memcgscope validate` gives on a systemd host): it
moves itself into a leaf, enables the controller, runs, and leaves the
cgroup as it found it. Started beside another process it refuses (exit 2).

    python3 guest_delegated.py OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = "/sys/fs/cgroup"
BIN = os.path.dirname(sys.executable)
SCENARIO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "model", "scenarios", "anon-oom-v2.toml")


def state(cg: str) -> dict:
    return {"children": sorted(d for d in os.listdir(cg) if os.path.isdir(os.path.join(cg, d))),
            "subtree_control": open(os.path.join(cg, "cgroup.subtree_control")).read().split(),
            "procs": open(os.path.join(cg, "cgroup.procs")).read().split()}


def run_in(cg: str, script: str) -> subprocess.CompletedProcess:
    # the shell moves itself in, then becomes (or starts) memcgscope
    # (braces: "a && b & c" would run a && b in the background, outside)
    return subprocess.run(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && {{ {script}; }}"], capture_output=True,
                          text=True, timeout=300)


def main() -> int:
    out: dict = {}
    if not os.path.exists(os.path.join(ROOT, "cgroup.subtree_control")) or \
            "memory" not in open(os.path.join(ROOT, "cgroup.subtree_control")).read():
        out["not_applicable"] = "no cgroup v2 memory controller here"
    else:
        validate = (f"{BIN}/memcgscope validate --no-probes --workdir /run/memcgscope-ext4 --json {SCENARIO}")
        for name, script in (("alone", f"exec {validate}"), ("shared", f"sleep 60 & exec {validate}")):
            cg = os.path.join(ROOT, f"memcgscope-deleg-{name}")
            os.mkdir(cg)
            try:
                before = state(cg)
                r = run_in(cg, script)
                for pid in open(os.path.join(cg, "cgroup.procs")).read().split():
                    os.kill(int(pid), 9)   # the shared case's sleep
                after = state(cg)
                try:
                    report = json.loads(r.stdout)
                except ValueError:
                    report = None
                out[name] = {"returncode": r.returncode, "stderr": r.stderr[-2000:], "before": before,
                             "after": after, "agree": report and report.get("agree"),
                             "verdicts": [s["verdict"] for s in report["scenarios"]] if report else None}
            finally:
                for _ in range(50):
                    try:
                        os.rmdir(cg)
                        break
                    except OSError:
                        import time
                        time.sleep(0.1)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    print(f"delegated: { {k: v.get('returncode') if isinstance(v, dict) else v for k, v in out.items()} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
