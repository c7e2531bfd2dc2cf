"""doctor inside real Debian guest kernels: kprobe and fentry usable, the
mode it picks, the headers it finds, and the probed functions present or
absent as those builds have them."""

from __future__ import annotations

import json

# What each Debian build has, by the profile series of the guest table
# (read from the kallsyms and BTF of the Debian binaries
# 5.10.262-1, 6.12.117, 6.18.15-1~bpo13+1, 7.3.4-1~bpo13+1; 6.1 from the
# captures in tests/unit/data/sysroots). `charge_memcg` None: inlined or absent.
FACTS = {
    # 5.10: no bpf_get_func_arg (5.17+): fentry reads arguments from the
    # trampoline frame, and doctor test-loads that way of reading
    "5.10": dict(charge_core="try_charge", page_charge="mem_cgroup_charge", charge_memcg=None,
                 resize_max="mem_cgroup_resize_max", mode="fentry", headers="matching",
                 args="trampoline frame"),
    "6.1": dict(charge_core="try_charge_memcg", page_charge="__mem_cgroup_charge", charge_memcg="charge_memcg",
                resize_max="mem_cgroup_resize_max", mode="fentry", headers="matching", args="bpf_get_func_arg"),
    # 6.12+: no CONFIG_MEMCG_V1, so no mem_cgroup_resize_max
    "6.12": dict(charge_core="try_charge_memcg", page_charge="__mem_cgroup_charge", charge_memcg=None,
                 resize_max=None, mode="fentry", headers="matching", args="bpf_get_func_arg"),
    # 6.18: Debian ships no headers at all: the nearest, merged in the cache
    "6.18": dict(charge_core="try_charge_memcg", page_charge="__mem_cgroup_charge", charge_memcg="charge_memcg",
                 resize_max=None, mode="fentry", headers="fallback", args="bpf_get_func_arg"),
    "7.3": dict(charge_core="try_charge_memcg", page_charge="__mem_cgroup_charge", charge_memcg="charge_memcg",
                resize_max=None, mode="fentry", headers="matching", args="bpf_get_func_arg"),
}


def test_doctor_in_guest(suite):
    facts = FACTS[suite.guest.profile]
    suite.step("doctor")
    out = suite.out
    table = (out / "doctor.txt").read_text()
    rc = (out / "doctor.rc").read_text()
    assert "table=0" in rc and "json=0" in rc, (rc, (out / "doctor.err").read_text())
    report = json.loads((out / "doctor.json").read_text())

    assert report["kernel"] == suite.kernel and report["kernel"].startswith(suite.guest.profile + "."), report["kernel"]
    assert report["checks"]["kprobes"]["state"] == "ok", report["checks"]["kprobes"]
    assert report["checks"]["fentry"]["state"] == "ok", report["checks"]["fentry"]
    assert facts["args"] in report["checks"]["fentry"]["detail"], report["checks"]["fentry"]
    # the one resolver: Debian 5.10 and 6.1 carry the sublevel in uname -v only
    prof = report["profile"]
    assert prof["upstream"] and prof["upstream"].startswith(suite.guest.profile), prof
    assert prof["profile"] == suite.guest.profile and not prof["warning"], prof

    headers = report["checks"]["headers"]
    assert headers["state"] == "ok", headers
    assert headers["detail"].startswith(facts["headers"]), headers
    if facts["headers"] == "fallback":
        # the tree collector/kernels.py merged from the nearest Debian headers
        assert f"/kheaders/{suite.kernel}" in headers["detail"] and "nearest" in headers["detail"], headers

    functions = {f["role"]: f for f in report["functions"]}
    assert functions["charge_core"]["symbol"] == facts["charge_core"], functions["charge_core"]
    assert functions["charge_core"]["probeable"] is True, functions["charge_core"]
    assert functions["page_charge"]["symbol"] == facts["page_charge"], functions["page_charge"]
    assert functions["charge_memcg"]["symbol"] == facts["charge_memcg"], functions["charge_memcg"]
    assert functions["resize_max"]["symbol"] == facts["resize_max"], functions["resize_max"]
    assert functions["memcg_reclaim"]["probeable"] is True, functions["memcg_reclaim"]
    assert functions["memory_max_write"]["probeable"] is True, functions["memory_max_write"]

    cg = report["cgroups"]
    if suite.guest.cgroup == "v1":
        assert cg["v1_memory"] == "/run/memcg-v1"
        assert cg["swap_accounting"] is True
    else:
        assert cg["v1_memory"] is None and cg["v2_memory"] is True

    # last, so a wrong choice (5.10: fentry, which cannot load there) still had every fact above checked
    assert report["modes"]["kprobe"]["usable"], report["modes"]
    assert report["modes"]["fentry"]["usable"] == (facts["mode"] == "fentry"), report["modes"]
    assert report["mode"] == facts["mode"], (report["mode"], report["modes"])
    assert f"run will use: {facts['mode']}" in table
