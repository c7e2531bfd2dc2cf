"""validate without a kernel: scenario plans and their errors, the field
comparison (each tolerance can fail), applicability, the 80-column table."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from memcgscope.collector.validate.compare import ModelRun, compare, default_tolerance, episode_rows, run_model
from memcgscope.collector.validate.plan import PlanError, load_plan
from memcgscope.collector.validate.report import format_table
from memcgscope.collector.validate.runner import KernelRun
from memcgscope.collector.validate.suite import Facts, ScenarioReport, builtin_scenarios, not_applicable
from memcgscope.model.profiles import get_profile

pytestmark = pytest.mark.unit

SCENARIOS = Path(__file__).resolve().parents[3] / "model" / "scenarios"


def plan(name):
    return load_plan((SCENARIOS / name).read_text(), name)


def kernel_like(model: ModelRun) -> KernelRun:
    """A kernel run that did exactly what the model did."""
    return KernelRun(results=list(model.results), tasks=dict(model.tasks), files=copy.deepcopy(model.files))


def test_builtin_suite_covers_the_paths():
    names = {Path(p).stem for p in builtin_scenarios()}
    assert {"v1-limit-writes", "v1-memsw", "anon-oom-v1", "anon-oom-v2", "file-reclaim-v1", "anon-and-file-v2",
            "thp-fallback-v2", "v2-max-shrink-oom", "high-throttle-v2", "hierarchy-v1", "hierarchy-v2",
            "memory-reclaim-v2", "swap-v2"} <= names


@pytest.mark.parametrize("path", builtin_scenarios(), ids=lambda p: Path(p).stem)
def test_every_builtin_scenario_plans_and_runs_in_the_model(path):
    p = load_plan(Path(path).read_text(), Path(path).name)
    m = run_model(p, get_profile("6.12"))
    assert len(m.results) == len(p.ops)
    rows = compare(p, kernel_like(m), m)
    assert rows and all(r.verdict == "agree" for r in rows), [r for r in rows if r.verdict != "agree"]


def test_each_tolerance_kind_can_fail():
    p = plan("anon-oom-v1.toml")
    m = run_model(p, get_profile("6.18"))
    k = kernel_like(m)
    k.results[0] = "done"                                               # exact: the outcome
    k.files["app"]["memory.failcnt"] = "0\n"                            # zero_iff: the model failed
    k.files["app"]["memory.usage_in_bytes"] = str(8 << 20) + "\n"       # abs 4M
    k.files["app"]["memory.oom_control"] = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"   # exact count
    bad = {r.field for r in compare(p, k, m) if r.verdict == "disagree"}
    assert bad == {"ops[0]", "app memory.failcnt", "app memory.usage_in_bytes", "app memory.oom_control oom_kill"}


def test_a_wrong_profile_disagrees():
    # memsw.failcnt: 6.18 tracks failures on the v1 memory counter only; 5.10 on every counter
    p = plan("v1-memsw.toml")
    as_618 = kernel_like(run_model(p, get_profile("6.18")))
    rows = compare(p, as_618, run_model(p, get_profile("5.10")), profile_name="5.10")
    assert [r.field for r in rows if r.verdict == "disagree"] == ["app memory.memsw.failcnt"]


def test_files_only_one_side_has_disagree():
    p = plan("anon-oom-v2.toml")
    m = run_model(p, get_profile("6.12"))
    k = kernel_like(m)
    k.files["app"]["memory.events"] += "sock_throttled 0\n"   # a key the profile does not print
    del k.files["app"]["memory.peak"]
    rows = {r.field: r for r in compare(p, k, m, profile_name="6.12")}
    assert rows["app memory.events keys"].verdict == "disagree"
    assert rows["app memory.events sock_throttled"].verdict == "disagree"
    assert "kernel does not" in rows["app memory.peak"].note


def test_read_ops_compare_field_by_field():
    p = plan("v2-max-shrink-oom.toml")
    m = run_model(p, get_profile("6.12"))
    k = kernel_like(m)
    # the write loops while its victim exits: many oom events, one kill
    k.results[2] = k.results[2].replace("oom 1", "oom 417")
    k.files["app"]["memory.events"] = k.files["app"]["memory.events"].replace("oom 1", "oom 417")
    rows = {r.field: r for r in compare(p, k, m)}
    assert rows["ops[2] app memory.events oom"].verdict == "agree"    # the scenario's bound: min 1
    assert rows["ops[2] app memory.events oom_kill"].verdict == "agree"
    k.results[2] = k.results[2].replace("oom_kill 1", "oom_kill 2")
    rows = {r.field: r for r in compare(p, k, m)}
    assert rows["ops[2] app memory.events oom_kill"].verdict == "disagree"


def test_episode_rules():
    p = plan("thp-fallback-v2.toml")
    huge_fail = {"kind": "charge", "nr_pages": 512, "ret": -12, "steps": [{"kind": "counter_fail"}]}
    small = {"kind": "charge", "nr_pages": 1, "ret": 0, "steps": [{"kind": "counter_fail"},
                                                                   {"kind": "reclaim", "cgroup_id": 7}]}
    rows = episode_rows(p, [huge_fail, small], charges_visible=True)
    assert [r.verdict for r in rows] == ["agree", "agree"]
    rows = episode_rows(p, [small], charges_visible=True)
    assert [r.verdict for r in rows] == ["disagree", "agree"]
    huge_reclaim = dict(small, nr_pages=512)
    assert [r.verdict for r in episode_rows(p, [huge_fail, huge_reclaim], charges_visible=True)] == \
        ["agree", "disagree"]
    # the claim is about faults: khugepaged's collapse charges 512 pages with
    # GFP_TRANSHUGE and reclaims (seen in a 6.1 guest), a fault's does not
    collapse = dict(huge_reclaim, comm="khugepaged", pid=36, gfp=0x1c24ca)
    assert [r.verdict for r in episode_rows(p, [huge_fail, collapse], charges_visible=True)] == \
        ["agree", "agree"]
    fault = dict(huge_reclaim, comm="python3", pid=265, gfp=0x1c20ca)
    rows = episode_rows(p, [huge_fail, fault, collapse], charges_visible=True)
    assert [r.verdict for r in rows] == ["agree", "disagree"]
    assert rows[1].kernel == 1 and "pid 265 python3 nr_pages=512" in rows[1].note, rows[1]
    assert "gfp=0x1c20ca steps=counter_fail,reclaim" in rows[1].note and "khugepaged" not in rows[1].note
    assert rows[0].note == ""
    assert {r.verdict for r in episode_rows(p, [], charges_visible=False)} == {"n/a"}
    h = plan("hierarchy-v2.toml")
    on_parent = {"kind": "charge", "steps": [{"kind": "reclaim", "cgroup_id": 10}]}
    ids = {"p": 10, "p/c": 11}
    assert [r.verdict for r in episode_rows(h, [on_parent], charges_visible=True, ids=ids)] == ["agree", "agree"]
    on_child = {"kind": "charge", "steps": [{"kind": "reclaim", "cgroup_id": 11}]}
    assert [r.verdict for r in episode_rows(h, [on_child], charges_visible=True, ids=ids)] == \
        ["disagree", "disagree"]


def test_episode_rule_conditions():
    from memcgscope.collector.validate.plan import _episode_rule
    r = _episode_rule("s", "w", "charge nr_pages!=1 comm=khugepaged", {"max": 0, "why": "t"})
    ep = {"kind": "charge", "nr_pages": 512, "comm": "khugepaged"}
    assert r.matches(ep)
    assert not r.matches(dict(ep, nr_pages=1)) and not r.matches(dict(ep, comm="python3"))
    assert _episode_rule("s", "w", "charge comm!=khugepaged", {"max": 0, "why": "t"}).matches(dict(ep, comm="python3"))
    for bad, says in (("charge steps>=a", "steps takes ="), ("charge comm>=x", "comm takes = or !="),
                      ("charge has!=reclaim", "has takes ="), ("charge nr_pages!=x", "is not an integer")):
        with pytest.raises(PlanError, match=re.escape(says)):
            _episode_rule("s", "w", bad, {"max": 0, "why": "t"})


def test_applicability():
    host = Facts("v1", swap=False, memsw=True, thp="madvise", has_memory_reclaim=True)
    assert not_applicable(plan("anon-oom-v1.toml"), host) is None
    assert "cgroup v2 scenario" in not_applicable(plan("anon-oom-v2.toml"), host)
    assert "huge pages 'always'" in not_applicable(plan("thp-fallback-v1.toml"), host)
    guest = Facts("v2", swap=False, memsw=False, thp="always", has_memory_reclaim=False)
    assert "needs swap" in not_applicable(plan("swap-v2.toml"), guest)
    assert "memory.reclaim" in not_applicable(plan("memory-reclaim-v2.toml"), guest)
    assert not_applicable(plan("v1-memsw.toml"), Facts("v1", False, False, "always", True)).startswith("needs v1 swap")
    text = (SCENARIOS / "anon-oom-v2.toml").read_text() + '\n[[ops]]\nop = "charge"\ncgroup = "app"\n'
    assert "runs only in the model" in not_applicable(load_plan(text, "x.toml"),
                                                     Facts("v2", False, False, "always", True))
    # a huge touch needs THP "always" (said or not) and a defrag that does not reclaim
    rejected = plan("thp-rejected-v2.toml")
    assert "thp=always" in rejected.requires
    assert not_applicable(rejected, guest) is None
    assert "huge pages 'always'" in not_applicable(rejected, Facts("v2", False, False, "madvise", True))
    assert "defrag" in not_applicable(rejected, Facts("v2", False, False, "always", True, thp_defrag="always"))


def test_worker_huge_touch():
    """The worker's `huge` command: THP allowed for the touch and restored after."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "memcgscope.collector.validate.worker"], text=True,
                       input="thp never\nhuge 600\nhuge 0\nexit\n", capture_output=True, timeout=60)
    assert r.stdout.split("\n")[:4] == ["ok thp never", "ok huge 600", "ok huge 0", "ok bye"], r


def test_huge_touch_discriminates_7_3(tmp_path):
    """thp-rejected-v2: the model's max event for the rejected huge charge
    is 7.3.4's (rejected_charge_raises_max); an older profile predicts none."""
    p = plan("thp-rejected-v2.toml")
    new, old = run_model(p, get_profile("7.3")), run_model(p, get_profile("7.2"))
    assert "max 1" in new.files["app"]["memory.events"] and "max 0" in old.files["app"]["memory.events"]


@pytest.mark.parametrize("extra,message", [
    ('[validate]\n"app memory.current" = { abs = "4M" }\n', "why: missing"),
    ('[validate]\n"app memory.current" = { ratio = 2, why = "x" }\n', "use one of exact"),
    ('[validate]\n"app memory.current" = { abs = "4Q", why = "x" }\n', "bad size"),
    ('[validate.episodes]\n"charge nr_pages=abc" = { min = 1, why = "x" }\n', "not an integer"),
    ('[validate.episodes]\n"charge nr_pages~3" = { min = 1, why = "x" }\n', "use field=V"),
    ('[validate.episodes]\n"charge" = { exact = true, why = "x" }\n', "takes min and/or max"),
])
def test_plan_errors_name_the_place(extra, message):
    text = (SCENARIOS / "anon-oom-v2.toml").read_text() + "\n" + extra
    with pytest.raises(PlanError) as e:
        load_plan(text, "x.toml")
    assert message in str(e.value) and str(e.value).startswith("x.toml: ") and "\n" not in str(e.value)


def test_defaults_say_why():
    for name in ("ops[0]", "task t", "app memory.events oom_kill", "app memory.events max", "app memory.current",
                 "app memory.failcnt", "app memory.peak", "app memory.max", "app memory.events keys"):
        assert default_tolerance(name).why


def test_table_fits_80_columns():
    p = plan("v1-limit-writes.toml")
    m = run_model(p, get_profile("6.18"))
    k = kernel_like(m)
    k.results[7] = 0
    rep = ScenarioReport(p.name, p.description, rows=compare(p, k, m))
    na = ScenarioReport("swap-v2.toml", "", not_applicable="needs swap; no swap device is on")
    text = format_table([rep, na], "header")
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "1 disagree, 1 n/a" in text and "not applicable: needs swap" in text and "ops[7]" in text


def test_recheck_a_report_under_other_profiles(tmp_path, capsys):
    """validate --recheck: a report's kernel side against another profile's
    model; here a kernel side that behaves as 7.3.4 (the model's own run)."""
    import json

    from memcgscope.collector.cli import main
    from memcgscope.collector.validate.compare import recheck
    p = plan("thp-rejected-v2.toml")
    seven_three = run_model(p, get_profile("7.3"))
    side = {"results": seven_three.results, "tasks": seven_three.tasks, "files": seven_three.files}
    assert {r.verdict for r in recheck(p, side, get_profile("7.3"))} == {"agree"}
    bad = [r for r in recheck(p, side, get_profile("7.2")) if r.verdict == "disagree"]
    assert [r.field for r in bad] == ["app memory.events max", "app memory.events.local max"]
    assert {(r.kernel, r.model) for r in bad} == {(1, 0)}
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"kernel": "7.3.4+deb13-amd64", "profile": "7.3", "scenarios": [
        {"scenario": p.name, "source": p.text, "kernel_side": side},
        {"scenario": "v1-memsw.toml", "not_applicable": "a cgroup v1 scenario", "kernel_side": None}]}))
    assert main(["validate", "--recheck", str(report)]) == 0
    capsys.readouterr()
    assert main(["validate", "--recheck", str(report), "--profile", "7.2", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"] == "7.2" and doc["recorded_profile"] == "7.3" and not doc["agree"]
    assert [s["verdict"] for s in doc["scenarios"]] == ["disagree", "n/a"]
    assert main(["validate", "--recheck", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_own_leaf_when_alone_and_refusal_when_shared(tmp_path):
    """v2 without the memory controller for the children of our cgroup:
    alone, validate moves into a leaf and enables it (then undoes both);
    beside other processes it refuses with the fix. (A plain directory
    stands in for cgroupfs: the writes land in files.)"""
    import os

    from memcgscope.collector.validate.setup import SetupError, _leave_leaf, _own_leaf
    own = tmp_path / "own"
    own.mkdir()
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (own / "cgroup.subtree_control").write_text("")
    leaf = _own_leaf(str(own))
    assert os.path.isdir(leaf) and (own / "cgroup.subtree_control").read_text() == "+memory"
    assert open(os.path.join(leaf, "cgroup.procs")).read() == "0"
    os.unlink(os.path.join(leaf, "cgroup.procs"))   # cgroupfs would take rmdir with its files
    _leave_leaf(str(own), leaf)
    assert not os.path.exists(leaf) and (own / "cgroup.subtree_control").read_text() == "-memory"
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    with pytest.raises(SetupError, match=r"1 other process\(es\) share this cgroup.*Delegate=yes"):
        _own_leaf(str(own))
    assert sorted(os.listdir(own)) == ["cgroup.procs", "cgroup.subtree_control"]


def test_a_command_needs_no_page_cache_workdir(tmp_path, monkeypatch):
    """--workdir is where the scenarios' file ops write page cache: the
    scenario suite refuses one on tmpfs; `validate -- CMD` (the command does
    its own I/O) does not look at it (a guest's /var/tmp is tmpfs)."""
    from argparse import Namespace

    from memcgscope.collector.validate import setup
    from memcgscope.probes.sysroot import SysRoot
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "mounts").write_text("tmpfs / tmpfs rw 0 0\n")

    class Reached(Exception):
        pass

    def detect(_sysroot):
        raise Reached   # past the workdir check

    monkeypatch.setattr("memcgscope.probes.detect.detect", detect)
    args = Namespace(workdir=str(tmp_path), no_probes=True, command=None)
    with pytest.raises(setup.SetupError, match="is on tmpfs"):
        next(setup._environment(args, SysRoot(str(root)), None, None, "v2", "/", "/"))
    args.command = ["true"]
    with pytest.raises(Reached):
        next(setup._environment(args, SysRoot(str(root)), None, None, "v2", "/", "/"))
