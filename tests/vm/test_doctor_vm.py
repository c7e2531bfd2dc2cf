"""doctor inside real Debian guest kernels: kprobe and fentry usable, and
the probed functions present or absent as those builds have them."""

from __future__ import annotations

import json
import os
import shutil

ARTIFACTS = os.environ.get("MEMCGSCOPE_ARTIFACTS", "/tmp/memcgscope-artifacts")


def test_doctor_in_guest(guest):
    out = guest.tmp_path
    r = guest.run(f".venv/bin/memcgscope doctor --capture {out}/capture > {out}/table.txt; "
                  f"echo table=$?; .venv/bin/memcgscope doctor --json > {out}/doctor.json; echo json=$?",
                  timeout=300)
    assert r.returncode == 0, str(r)
    table = (out / "table.txt").read_text()
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, f"doctor-{guest.guest.name}.txt"), "w") as f:
        f.write(table)
    # the capture is what tests/unit/data/sysroots/<guest> was made from
    shutil.copytree(out / "capture", os.path.join(ARTIFACTS, f"capture-{guest.guest.name}"), dirs_exist_ok=True)
    assert "table=0" in r.stdout and "json=0" in r.stdout, str(r)
    report = json.loads((out / "doctor.json").read_text())

    assert report["kernel"].startswith(guest.guest.series + "."), report["kernel"]
    assert report["checks"]["kprobes"]["state"] == "ok", report["checks"]["kprobes"]
    assert report["checks"]["fentry"]["state"] == "ok", report["checks"]["fentry"]
    assert report["modes"]["kprobe"]["usable"] and report["modes"]["fentry"]["usable"], report["modes"]
    assert report["mode"] == "fentry"
    assert report["checks"]["headers"]["detail"].startswith("matching")

    functions = {f["role"]: f for f in report["functions"]}
    assert functions["charge_core"]["symbol"] == "try_charge_memcg"
    assert functions["charge_core"]["probeable"] is True
    assert functions["page_charge"]["symbol"] == "__mem_cgroup_charge"
    assert functions["memcg_reclaim"]["probeable"] is True
    assert functions["memory_max_write"]["probeable"] is True
    # Debian's 6.12 is built without CONFIG_MEMCG_V1; 6.1 always has v1.
    if guest.guest.series == "6.1":
        assert functions["resize_max"]["symbol"] == "mem_cgroup_resize_max"
    else:
        assert functions["resize_max"]["symbol"] is None
        assert functions["charge_memcg"]["symbol"] is None  # inlined on 6.12 builds

    cg = report["cgroups"]
    if guest.guest.cgroup == "v1":
        assert cg["v1_memory"] == "/run/memcg-v1"
        assert cg["swap_accounting"] is True
    else:
        assert cg["v1_memory"] is None and cg["v2_memory"] is True
    assert "run will use: fentry" in table
