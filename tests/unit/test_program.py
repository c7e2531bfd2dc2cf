"""The BPF program builder over doctor reports of real kernels (captured
sysroots): which probes each mode builds, and why the others are off."""

from __future__ import annotations

import os

import pytest

from memcgscope.probes.capture import load_recorded_checks
from memcgscope.probes.detect import detect
from memcgscope.probes.program import ProgramError, build_program
from memcgscope.probes.sysroot import SysRoot

SYSROOTS = os.path.join(os.path.dirname(__file__), "data", "sysroots")


class FakeBTF:
    """Offsets and prototypes as a BTF would give them (values arbitrary)."""

    params = {"try_charge_memcg": 3, "__mem_cgroup_charge": 3, "try_to_free_mem_cgroup_pages": 4,
              "mem_cgroup_resize_max": 3, "memory_max_write": 4, "memory_high_write": 4,
              "mem_cgroup_out_of_memory": 3, "drain_all_stock": 1, "page_counter_try_charge": 3}

    def offsetof(self, struct, path):
        if (struct, path) == ("kernfs_node", "parent"):
            from memcgscope.probes.btf import BTFError
            raise BTFError("no parent")  # renamed __parent, as on 6.14+
        return 0 if path in ("css", "css.cgroup") else 8

    def enum_value(self, name):
        return 4

    def func_param_count(self, name):
        return self.params.get(name)

    def func_id(self, name):
        return 100 if name in self.params else None


def report(name):
    path = os.path.join(SYSROOTS, name)
    return detect(SysRoot(path), load_recorded_checks(path))


def test_kprobe_mode_on_612_probes_drain_and_its_clone():
    prog = build_program(report("debian-6.12-v2"), "kprobe", FakeBTF())
    symbols = [k[0] for k in prog.kprobes]
    assert "drain_all_stock" in symbols and "drain_all_stock.part.0" in symbols
    assert ("try_charge_memcg", "kp_charge_core_exit", True) in prog.kprobes
    off = {p.role: p.reason for p in prog.probes if not p.attached}
    assert "not in /proc/kallsyms" in off["resize_max"]  # no CONFIG_MEMCG_V1 on Debian 6.12
    assert off["count_memcg_events"] == "tracepoint absent on this kernel"
    assert "-DOFF_KN_PARENT=8" in prog.cflags and "-DMEMORY_CGRP_ID=4" in prog.cflags
    assert "-DHAVE_MEMSW=1" not in prog.cflags  # v2


def test_fentry_mode_kprobes_what_it_cannot_attach():
    checked = []
    prog = build_program(report("debian-6.1-v1"), "fentry", FakeBTF(),
                         fentry_check=lambda btf_id: (checked.append(btf_id) or True, ""))
    status = {p.role: p for p in prog.probes}
    # 6.1 has only drain_all_stock.part.0, which has no BTF entry: kprobed instead
    drain = status["drain_all_stock"]
    assert drain.attached and drain.kind == "kprobe" and drain.reason.startswith("kprobe instead of fentry: no BTF")
    assert ("drain_all_stock.part.0", "kp_drain_all_stock_enter", False) in prog.kprobes
    assert status["charge_core"].attached and "KFUNC_PROBE(try_charge_memcg)" in prog.text
    assert "KRETFUNC_PROBE(page_counter_try_charge)" in prog.text
    assert "MCS_ARG(ctx, 2, &a2)" in prog.text and "MCS_RET(ctx, 3, &ret)" in prog.text
    assert "-DHAVE_MEMSW=1" in prog.cflags  # v1 with swap accounting
    assert checked  # every fentry target was tried first


def test_fentry_plus_kprobe_sees_every_drain_on_612():
    prog = build_program(report("debian-6.12-v2"), "fentry", FakeBTF(), fentry_check=lambda i: (True, ""))
    drain = {p.role: p for p in prog.probes}["drain_all_stock"]
    assert drain.kind == "fentry+kprobe" and drain.reason == "" and drain.target == "drain_all_stock"
    assert ("drain_all_stock.part.0", "kp_drain_all_stock_enter0", False) in prog.kprobes
    from memcgscope.probes.episodes import visibility
    assert visibility("fentry", prog.probes).drains   # every call is seen, as with kprobes


def test_a_bool_argument_is_masked():
    class BoolBTF(FakeBTF):   # 5.10: try_to_free_mem_cgroup_pages(..., bool may_swap)
        def func_param_size(self, name, i):
            return 1 if (name, i) == ("try_to_free_mem_cgroup_pages", 3) else 8
    assert "-DRECLAIM_OPTS_MASK=0xff" in build_program(report("debian-6.1-v1"), "kprobe", BoolBTF()).cflags
    assert "-DRECLAIM_OPTS_MASK=0xffffffff" in build_program(report("debian-6.1-v1"), "kprobe", FakeBTF()).cflags


def test_fentry_arguments_without_bpf_get_func_arg():
    class OldBTF(FakeBTF):   # 5.10: enum bpf_func_id has no BPF_FUNC_get_func_arg
        def enum_value(self, name):
            return None if name == "BPF_FUNC_get_func_arg" else 4
    new = build_program(report("debian-6.12-v2"), "fentry", FakeBTF(), fentry_check=lambda i: (True, ""))
    old = build_program(report("debian-6.12-v2"), "fentry", OldBTF(), fentry_check=lambda i: (True, ""))
    assert "-DHAVE_GET_FUNC_ARG=1" in new.cflags and "-DHAVE_GET_FUNC_ARG=1" not in old.cflags


def test_fentry_refused_falls_back_to_kprobe_or_fails_without_it():
    prog = build_program(report("debian-6.12-v2"), "fentry", FakeBTF(), fentry_check=lambda i: (False, "EPERM"))
    core = {p.role: p for p in prog.probes}["charge_core"]
    assert core.attached and core.kind == "kprobe" and "EPERM" in core.reason
    with pytest.raises(ProgramError, match="cannot probe the charge core"):
        # the host: kprobes compiled out, fentry refused
        build_program(report("host-6.18-v1"), "fentry", FakeBTF(), fentry_check=lambda i: (False, "EPERM"))


def test_tracepoint_mode_on_the_host():
    prog = build_program(report("host-6.18-v1"), "tracepoint", FakeBTF())
    assert prog.kprobes == []
    assert "TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)" in prog.text
    assert "RAW_TRACEPOINT_PROBE(count_memcg_events)" in prog.text
    assert "if (item == HOT_EVENT_ITEM || item == HOT_EVENT_ITEM2) return 0;" in prog.text
    assert "-DHOT_EVENT_ITEM=4" in prog.cflags
    off = {p.target: p.reason for p in prog.probes if not p.attached}
    assert "--memcg-state" in off["memcg:mod_memcg_lruvec_state"]
    with_state = build_program(report("host-6.18-v1"), "tracepoint", FakeBTF(), memcg_state=True)
    assert "RAW_TRACEPOINT_PROBE(mod_memcg_lruvec_state)" in with_state.text
    assert "-DHOT_EVENT_ITEM=-1" in with_state.cflags  # everything counted
    assert "KFUNC_PROBE" not in prog.text.split("wrappers for mode")[1]


def test_unknown_mode():
    with pytest.raises(ProgramError, match="unknown mode"):
        build_program(report("host-6.18-v1"), "uprobe", FakeBTF())


def test_the_page_charge_is_probed_at_its_exit_only():
    """Three program runs per faulted page: the charge core's entry and exit
    and the page charge's exit (its memcg, size and gfp are the core's)."""
    for name, page in (("debian-6.12-v2", "__mem_cgroup_charge"), ("debian-5.10-v2", "mem_cgroup_charge")):
        fentry = build_program(report(name), "fentry", FakeBTF() if page != "mem_cgroup_charge" else _Btf510(),
                               fentry_check=lambda i: (True, ""))
        wrappers = fentry.text.split("wrappers for mode")[1]
        assert f"KRETFUNC_PROBE({page})" in wrappers and f"KFUNC_PROBE({page})" not in wrappers, name
        kprobe = build_program(report(name), "kprobe", FakeBTF())
        on_page = [k for k in kprobe.kprobes if k[0] == page]
        assert on_page == [(page, "kp_page_charge_exit", True)], on_page
        assert "on_page_charge_enter" not in kprobe.text


class _Btf510(FakeBTF):
    params = dict(FakeBTF.params, try_charge=3, mem_cgroup_charge=3)


def test_latency_sample_is_a_flag_with_bounds():
    assert "-DLAT_SAMPLE=64" in build_program(report("debian-6.12-v2"), "kprobe", FakeBTF()).cflags
    assert "-DLAT_SAMPLE=1" in build_program(report("debian-6.12-v2"), "kprobe", FakeBTF(), latency_sample=1).cflags
    for bad in (0, -3, 1 << 21, 2.5, True):
        with pytest.raises(ProgramError, match="latency sample"):
            build_program(report("debian-6.12-v2"), "kprobe", FakeBTF(), latency_sample=bad)


def test_run_refuses_a_latency_sample_out_of_range(capsys):
    from memcgscope.collector.cli import main
    assert main(["run", "--latency-sample", "0"]) == 2
    err = capsys.readouterr().err
    assert "--latency-sample 0" in err and "from 1" in err and len(err.strip().splitlines()) == 1


def test_no_probe_leaves_the_per_page_probes_out():
    """--no-probe page_charge --no-probe count_memcg_events: a faulted page
    runs the charge core's entry and exit only (two programs); the probes
    left out say why, and everything else is as before."""
    full = build_program(report("debian-6.12-v2"), "kprobe", FakeBTF())
    lean = build_program(report("debian-6.12-v2"), "kprobe", FakeBTF(),
                         without=("page_charge", "count_memcg_events"))
    assert [k for k in lean.kprobes if k[0] == "__mem_cgroup_charge"] == []
    assert [k for k in full.kprobes if k[0] == "__mem_cgroup_charge"] != []
    assert set(full.kprobes) - set(lean.kprobes) == {("__mem_cgroup_charge", "kp_page_charge_exit", True)}
    off = {p.role: p.reason for p in lean.probes if not p.attached}
    assert off["page_charge"] == "left out by --no-probe page_charge"
    fentry = build_program(report("debian-6.12-v2"), "fentry", FakeBTF(), fentry_check=lambda i: (True, ""),
                           without=("page_charge",))
    assert "KRETFUNC_PROBE(__mem_cgroup_charge)" not in fentry.text.split("wrappers for mode")[1]
    host = build_program(report("host-6.18-v1"), "tracepoint", FakeBTF(), without=["count_memcg_events"])
    assert "RAW_TRACEPOINT_PROBE(count_memcg_events)" not in host.text
    assert "RAW_TRACEPOINT_PROBE(mod_memcg_state)" in host.text
    assert {p.target: p.reason for p in host.probes if not p.attached}["memcg:count_memcg_events"] \
        == "left out by --no-probe count_memcg_events"


def test_no_probe_refuses_the_probes_episodes_are_made_of():
    for name, says in (("charge_core", "--mode tracepoint"), ("memcg_reclaim", "not a probe that can be left out"),
                       ("page_counter_try_charge", "page_charge, count_memcg_events, mod_memcg_state")):
        with pytest.raises(ProgramError, match=f"--no-probe {name}: .*{says}"):
            build_program(report("debian-6.12-v2"), "kprobe", FakeBTF(), without=(name,))


def test_run_and_record_refuse_an_unknown_no_probe(capsys):
    from memcgscope.collector.cli import main
    for cmd in (["run"], ["record", "--out", "/tmp/x.jsonl"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd + ["--no-probe", "memcg_oom"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "--no-probe: invalid choice: 'memcg_oom'" in err[-1] and "page_charge" in err[-1], err
