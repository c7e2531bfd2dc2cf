"""doctor's logic over /proc and /sys captured from real kernels:
this host (6.18, v1) and Debian 5.10 (v1), 6.1 (v1, v2), 6.12 (v2) and 7.3
(v2) guests."""

from __future__ import annotations

import json
import os

import pytest

from memcgscope.collector import cli
from memcgscope.collector.doctor_cmd import format_table, profile_section
from memcgscope.probes.capture import load_recorded_checks
from memcgscope.probes.detect import detect
from memcgscope.probes.sysroot import SysRoot

SYSROOTS = os.path.join(os.path.dirname(__file__), "data", "sysroots")


def report_for(name: str):
    path = os.path.join(SYSROOTS, name)
    return detect(SysRoot(path), load_recorded_checks(path))


def test_host_uses_tracepoint_mode():
    r = report_for("host-6.18-v1")
    assert r.kernel == "6.18.44-fc-v657"
    assert r.mode == "tracepoint"
    assert r.checks["kprobes"].state == "absent"
    assert r.checks["fentry"].state == "refused"
    assert r.checks["headers"].ok and r.checks["headers"].detail.startswith("fallback")
    assert not r.modes["fentry"].usable and "fentry refused" in r.modes["fentry"].reason
    assert not r.modes["kprobe"].usable and "kprobes absent" in r.modes["kprobe"].reason
    assert r.cgroups.v1_memory == "/sys/fs/cgroup/memory"
    assert r.cgroups.v2_mount == "/sys/fs/cgroup/unified" and not r.cgroups.v2_memory
    assert r.cgroups.swap_accounting is True and r.cgroups.swap_devices == []
    # available_filter_functions is not readable here: probe-ability unknown
    assert r.function("try_charge_memcg").symbol == "try_charge_memcg"
    assert r.function("try_charge_memcg").probeable is None
    assert r.function("mem_cgroup_resize_max").present
    assert any(f.startswith("kprobes: rebuild the kernel") for f in r.fixes)


@pytest.mark.parametrize("name,series,cgroup", [
    ("debian-6.1-v1", "6.1", "v1"),
    ("debian-6.1-v2", "6.1", "v2"),
    ("debian-6.12-v2", "6.12", "v2"),
])
def test_guests_use_fentry(name, series, cgroup):
    r = report_for(name)
    assert r.kernel.startswith(series + ".")
    assert r.mode == "fentry"
    assert r.modes["kprobe"].usable and r.modes["tracepoint"].usable
    assert r.checks["kprobes"].ok and r.checks["fentry"].ok
    assert r.function("try_charge_memcg").probeable is True
    assert r.function("__mem_cgroup_charge").probeable is True
    if series == "6.1":
        assert r.function("mem_cgroup_resize_max").symbol == "mem_cgroup_resize_max"
        assert r.function("charge_memcg").present
    else:
        assert not r.function("mem_cgroup_resize_max").present
        assert r.function("mem_cgroup_resize_max").probeable is False
        assert not r.function("charge_memcg").present
    # the memcg:* tracepoints arrived in 6.13
    assert r.tracepoints["memcg:count_memcg_events"] is False
    assert r.tracepoints["vmscan:mm_vmscan_memcg_reclaim_end"] is True
    if cgroup == "v1":
        assert r.cgroups.v1_memory and r.cgroups.swap_accounting is True
    else:
        assert r.cgroups.v1_memory is None and r.cgroups.v2_memory


#: what each Debian build has, by the captures doctor --capture took in the
#: VM tier's guests (tests/unit/data/import_vm.py brings them in)
BUILDS = {
    # 5.10: try_charge (try_charge_memcg is 5.15+); no bpf_get_func_arg (5.17+)
    "debian-5.10-v1": dict(series="5.10", charge_core="try_charge", page_charge="mem_cgroup_charge",
                           resize_max=True, args="trampoline frame", memcg_tracepoints=False),
    "debian-7.3-v2": dict(series="7.3", charge_core="try_charge_memcg", page_charge="__mem_cgroup_charge",
                          resize_max=False, args="bpf_get_func_arg", memcg_tracepoints=True),
}


@pytest.mark.parametrize("name", [n for n in BUILDS if os.path.isdir(os.path.join(SYSROOTS, n))])
def test_guest_builds(name):
    b = BUILDS[name]
    r = report_for(name)
    assert r.kernel.startswith(b["series"] + "."), r.kernel
    assert r.mode == "fentry" and r.modes["kprobe"].usable
    assert b["args"] in r.checks["fentry"].detail, r.checks["fentry"].detail
    assert r.function("try_charge_memcg").symbol == b["charge_core"]
    assert r.function("try_charge_memcg").probeable is True
    assert r.function("__mem_cgroup_charge").symbol == b["page_charge"]
    assert r.function("mem_cgroup_resize_max").present is b["resize_max"]
    # the memcg:* tracepoints arrived in 6.13
    assert r.tracepoints["memcg:count_memcg_events"] is b["memcg_tracepoints"]
    # the profile from uname -v (Debian 5.10's release says only 5.10.0)
    assert profile_section(r)["profile"] == b["series"], profile_section(r)


def test_guest_builds_are_told_apart():
    """The table above can fail: each capture read with another's facts
    disagrees on at least one of them."""
    names = [n for n in BUILDS if os.path.isdir(os.path.join(SYSROOTS, n))]
    assert len(names) >= 2
    for name in names:
        for other in names:
            if other != name:
                with pytest.raises(AssertionError):
                    BUILDS[name], saved = BUILDS[other], BUILDS[name]
                    try:
                        test_guest_builds(name)
                    finally:
                        BUILDS[name] = saved


def test_clone_suffixes_are_found(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "kallsyms").write_text(
        "0 t drain_all_stock.part.0\n0 t try_charge_memcg\n0 T mem_cgroup_charge_skmem\n"
        "0 t mem_cgroup_out_of_memory.constprop.0\n0 d try_to_free_mem_cgroup_pages\n")
    (tmp_path / "sys/kernel/tracing").mkdir(parents=True)
    (tmp_path / "sys/kernel/tracing/events").mkdir()
    (tmp_path / "sys/kernel/tracing/available_filter_functions").write_text(
        "try_charge_memcg\ndrain_all_stock.part.0\n")
    sysroot = SysRoot(str(tmp_path))
    from memcgscope.probes.detect import Finding, RecordedChecks
    r = detect(sysroot, RecordedChecks(Finding("ok", "bcc"), Finding("ok", "fentry")))
    assert r.function("drain_all_stock").symbol == "drain_all_stock.part.0"
    assert r.function("drain_all_stock").probeable is True
    assert r.function("mem_cgroup_out_of_memory").symbol == "mem_cgroup_out_of_memory.constprop.0"
    assert r.function("mem_cgroup_out_of_memory").probeable is False  # not in the filter list
    # a prefix match is not the function; a data symbol is not a function
    assert not r.function("mem_cgroup_charge").present
    assert not r.function("try_to_free_mem_cgroup_pages").present


def test_nothing_usable_exits_1_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "version").write_text("Linux version 4.19.0-bare (x) #1\n")
    rc = cli.main(["doctor", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "kernel 4.19.0-bare" in out
    assert "run cannot start: no mode is usable" in out
    assert "Traceback" not in out


def test_json_and_exit_status(capsys):
    rc = cli.main(["doctor", "--json", "--root", os.path.join(SYSROOTS, "host-6.18-v1")])
    d = json.loads(capsys.readouterr().out)
    # replayed without live answers (bcc "not checked"), so no mode is usable
    assert rc == 1 and d["mode"] is None
    assert d["kernel"] == "6.18.44-fc-v657"
    assert {f["role"] for f in d["functions"]} >= {"charge_core", "resize_max", "page_counter_try_charge"}


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["doctor", "--no-such-flag"])
    assert e.value.code == 2
    rc = cli.main(["doctor", "--root", "/no/such/dir"])
    assert rc == 2
    assert "--root /no/such/dir: not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["host-6.18-v1", "debian-6.1-v1", "debian-6.12-v2"])
def test_table_fits_80_columns(name):
    table = format_table(report_for(name))
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "run will use:" in table


def test_bcc_check_does_not_load_bcc(monkeypatch):
    """doctor asks whether bcc is there without importing it (the import
    maps libbcc and LLVM: seconds in a TCG guest)."""
    import subprocess
    import sys
    code = ("import sys; from memcgscope.probes.detect import LiveChecks; f = LiveChecks().bcc(); "
            "print(f.state, 'bcc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out[1] == "False" and out[0] in ("ok", "absent")
    import importlib.util

    from memcgscope.probes.detect import LiveChecks
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    f = LiveChecks().bcc()
    assert f.state == "absent" and "python3-bpfcc" in f.fix
