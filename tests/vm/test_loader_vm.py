"""The loader/collector split on real guest kernels, where kprobe and
fentry attach: a SIGKILLed collector leaves no program attached; the named
kretprobe events a maxactive needs stay only as disabled, inert definitions
until the next start removes them; with MEMCGSCOPE_KRETPROBE_MAXACTIVE=0
(the kprobe PMU) nothing at all appears in kprobe_events. The workload runs
in the guest (guest_loader_workload.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

ARTIFACTS = os.environ.get("MEMCGSCOPE_ARTIFACTS", "/tmp/memcgscope-artifacts")


@pytest.mark.parametrize("mode", ["kprobe", "fentry"])
def test_a_killed_collector_leaves_nothing_attached(guest, mode):
    out = guest.tmp_path / "loader.json"
    r = guest.run(f".venv/bin/python tests/vm/guest_loader_workload.py {mode} {out}", timeout=1800)
    assert r.returncode == 0, str(r)
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copy(out, os.path.join(ARTIFACTS, f"loader-{guest.guest.name}-{mode}.json"))
    res = json.loads(out.read_text())
    d, pmu = res["default"], res["pmu"]
    for run in (d, pmu):
        assert "error" not in run, run
        assert not run["bcc_imported"] and run["compiler_mapped"] == 0
        assert not run["loader_alive"]
        assert run["programs_while_running"] >= 5
        assert run["programs_left"] == [], "a killed collector detaches every program"
        assert not any("_bcc_" in line for line in run["kprobe_events_while_running"])
    kinds = {k for k, _target, _prog in d["attachments"]}
    if mode == "fentry":
        assert {"fentry", "fexit"} <= kinds, kinds
    else:
        assert {"kprobe", "kretprobe"} <= kinds and not kinds & {"fentry", "fexit"}, kinds
    # maxactive 512: one named event per kretprobe, ours by pid; left after
    # the kill, disabled and not hit while the probed functions run
    kret = sorted(t for k, t, _p in d["attachments"] if k == "kretprobe")
    named = d["kprobe_events_while_running"]
    assert len(named) == len(kret)
    assert all(re.match(rf"^r512:memcgscope/r{d['pid']}_\d+_\w+ \S+$", line) for line in named), named
    assert sorted(line.split()[-1] for line in named) == kret
    assert d["kprobe_events_left"] == named
    assert d["left_enabled"] == ["0"] * len(named) and d["left_hits_moved"] == {}
    # the next start swept them; the PMU kretprobes leave nothing
    assert pmu["kprobe_events_while_running"] == [] and pmu["kprobe_events_left"] == []
    assert {k for k, _t, _p in pmu["attachments"]} == kinds
    assert res["kprobe_events_at_end"] == []
