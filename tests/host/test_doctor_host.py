"""doctor on this host's real 6.18 kernel: tracepoint mode, no kprobes,
fentry refused, cgroup v1 memory with swap accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ARTIFACTS = os.environ.get("MEMCGSCOPE_ARTIFACTS", "/tmp/memcgscope-artifacts")
MEMCGSCOPE = os.path.join(os.path.dirname(sys.executable), "memcgscope")


def _tracefs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[2] == "tracefs" for line in f if len(line.split()) > 2)


def test_doctor_reports_this_host():
    mounted_before = _tracefs_mounted()
    table = subprocess.run([MEMCGSCOPE, "doctor"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "doctor-host.txt"), "w") as f:
        f.write(table.stdout)
    r = subprocess.run([MEMCGSCOPE, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)

    assert report["mode"] == "tracepoint"
    assert report["checks"]["kprobes"]["state"] == "absent"
    assert "CONFIG_KPROBES" in report["checks"]["kprobes"]["detail"]
    assert report["checks"]["fentry"]["state"] == "refused"
    assert "refused by the kernel or a security policy" in report["checks"]["fentry"]["detail"]
    assert report["checks"]["btf"]["state"] == "ok"
    cg = report["cgroups"]
    assert cg["v1_memory"] == "/sys/fs/cgroup/memory"
    assert cg["swap_accounting"] is True
    assert cg["v2_memory"] is False
    assert all(report["tracepoints"][t] for t in ("vmscan:mm_vmscan_memcg_reclaim_begin",
                                                  "vmscan:mm_vmscan_memcg_reclaim_end",
                                                  "memcg:count_memcg_events", "oom:mark_victim"))
    functions = {f["role"]: f for f in report["functions"]}
    assert functions["charge_core"]["symbol"] == "try_charge_memcg"
    assert functions["resize_max"]["symbol"] == "mem_cgroup_resize_max"
    # tracefs is mounted for the check and unmounted again when doctor mounted it
    assert _tracefs_mounted() == mounted_before
    assert "run will use: tracepoint" in table.stdout
    assert "kprobes: rebuild the kernel with CONFIG_KPROBES=y" in table.stdout
