"""bench_probes.py's empty-program baseline text, without root: one empty
program per (kind, target) the session attached, named so the loader's
program_kind reads back the same kind and target."""

from __future__ import annotations

import os
import sys

import pytest

from memcgscope.probes.loader import program_kind

pytestmark = pytest.mark.unit
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import bench_probes  # noqa: E402


def test_one_empty_program_per_kind_and_target():
    attached = [("fentry", "try_charge_memcg", "kfunc__try_charge_memcg"),
                ("fexit", "try_charge_memcg", "kretfunc__try_charge_memcg"),
                ("kprobe", "__mem_cgroup_charge", "kp_page_charge_enter"),
                ("kretprobe", "__mem_cgroup_charge", "kp_page_charge_exit"),
                ("kprobe", "try_charge_memcg.isra.0", "kp_charge_core_enter1"),
                ("raw_tracepoint", "mod_memcg_state", "raw_tracepoint__mod_memcg_state"),
                ("tracepoint", "vmscan:mm_vmscan_memcg_reclaim_begin", "tracepoint__vmscan__x"),
                ("fentry", "try_charge_memcg", "kfunc__try_charge_memcg"),      # twice: one empty
                ("fentry", "page_counter_try_charge.cold", "kfunc__x")]          # a clone: not nameable
    text, names = bench_probes.empty_program_text(attached)
    assert len(names) == 7, names
    assert len({(k, t) for k, t in names.values()}) == 7
    for name, (kind, target) in names.items():
        assert (name if kind in ("kprobe", "kretprobe", "tracepoint") else f"({target})") in text
        k, t = program_kind(name)
        if kind in ("kprobe", "kretprobe"):
            assert k == "kprobe" and t is None       # kprobe targets come with the attachment
        else:
            assert (k, t) == (kind, target), name
    assert "isra" not in "".join(n for n, (k, _) in names.items() if k == "fentry")
    assert ("kretprobe", "__mem_cgroup_charge") in names.values()


def test_the_vm_bench_measures_both_trees_in_one_boot():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "vm"))
    import bench_probes_vm
    one = bench_probes_vm.guest_command("--modes kprobe --rounds 1 --iters 2")
    assert one.count("bench_probes.py") == 1 and "PYTHONPATH" not in one
    both = bench_probes_vm.guest_command("--modes kprobe --rounds 1 --iters 2", "/repo/.b/pkg", "87adc53")
    assert both.count("bench_probes.py --modes kprobe --rounds 1 --iters 2") == 2
    assert "PYTHONPATH=/repo/.b/pkg" in both and "=== 87adc53 ===" in both
    with pytest.raises(SystemExit):
        bench_probes_vm.main(["--guests", "no-such-guest"])


def test_lean_measures_each_probe_mode_again_without_the_per_page_probes():
    assert bench_probes.configs(["tracepoint", "fentry"], []) == [("tracepoint", "tracepoint", ()),
                                                                  ("fentry", "fentry", ())]
    lean = bench_probes.configs(["tracepoint", "kprobe"], list(bench_probes.LEAN))
    assert lean[-1] == ("kprobe lean", "kprobe", ("page_charge", "count_memcg_events"))
    assert [c[0] for c in lean] == ["tracepoint", "kprobe", "tracepoint lean", "kprobe lean"]
    # what --lean leaves out is what run --no-probe can
    from memcgscope.probes.program import optional_probes
    assert set(bench_probes.LEAN) <= set(optional_probes())
