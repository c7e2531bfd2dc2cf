"""`memcgscope validate` in every guest of harness.GUESTS, run as
`validate --vm` runs it (collector/validate/vm.py guest_command: zram swap,
page cache on an ext4 RAM disk, the guest's root cgroup as the parent):
every built-in scenario of the guest's cgroup version applies and agrees
with the model of the profile the kernel resolves to."""

from __future__ import annotations

import tomllib
from pathlib import Path

from memcgscope.collector.validate.suite import builtin_scenarios


def test_validate_in_guest(suite):
    st = suite.steps.get("validate") or {}
    doc = suite.json("validate.json") if (suite.out / "validate.json").exists() else None
    assert doc is not None, f"validate wrote no report\n{suite}"
    scen = {s["scenario"]: s for s in doc["scenarios"]}
    table = "\n".join(f"{n}: {s['verdict']} {s['not_applicable'] or s['error'] or ''} "
                      f"{[r for r in s['rows'] if r['verdict'] == 'disagree']} {s['divergences'][:3]}"
                      for n, s in scen.items())
    assert st.get("returncode") == 0 and doc["agree"], table
    assert doc["profile"] == suite.guest.profile, doc.get("profile")
    version = suite.guest.cgroup
    wanted = {n.rsplit("/", 1)[-1].removesuffix(".toml") for n in builtin_scenarios()}
    # a scenario's version is its own `cgroup` key, not a guess from its name
    # (v2-max-shrink-oom ends in -oom)
    versions = {n.rsplit("/", 1)[-1]: tomllib.loads(Path(n).read_text()).get("cgroup", "v2")
                for n in builtin_scenarios()}
    assert {n.removesuffix(".toml") for n in scen} == wanted, sorted(scen)
    for name, s in scen.items():
        mine = versions[name] == version
        if not mine:
            assert s["verdict"] == "n/a" and "scenario" in s["not_applicable"], (name, s)
        elif name.startswith("memory-reclaim") and suite.guest.profile == "5.10":
            assert s["verdict"] == "n/a" and "5.19+" in s["not_applicable"], (name, s)
        else:
            # swap (zram), THP "always" and memsw are there: nothing of this version is left out
            assert s["verdict"] == "agree", (name, s)
            assert s["episodes"] > 0 or name.startswith("v1-limit"), (name, s)


def test_validate_alone_in_a_delegated_cgroup(one_guest_suite):
    """v2, in one guest (conftest.ONE_GUEST): validate started alone in a
    cgroup whose children lack the memory controller makes itself a leaf,
    runs, and leaves the cgroup as it was; beside another process it
    refuses with the fix."""
    suite = one_guest_suite
    suite.step("delegated")
    d = suite.json("delegated.json")
    alone, shared = d["alone"], d["shared"]
    assert alone["returncode"] == 0 and alone["agree"] and alone["verdicts"] == ["agree"], alone
    assert alone["before"]["subtree_control"] == [] and alone["after"] == {**alone["before"], "procs": []}, alone
    assert shared["returncode"] == 2 and "other process(es) share this cgroup" in shared["stderr"], shared
    assert "systemd-run --scope -p Delegate=yes" in shared["stderr"]
    assert shared["after"]["children"] == [] and shared["after"]["subtree_control"] == [], shared


def test_validate_a_command_in_a_guest(one_guest_suite):
    """`validate -- CMD` in one guest (conftest.ONE_GUEST): a command that
    OOMs in its limit, and one that fits; both agree with the model."""
    suite = one_guest_suite
    suite.step("command")
    d = suite.json("command.json")
    for name in ("oom", "fits"):
        assert d[name]["returncode"] == 0 and d[name]["report"], (name, d[name])
    oom, fits = d["oom"]["report"], d["fits"]["report"]
    assert oom["exit_status"] == -9 and oom["episodes_by_kind"].get("charge", 0) > 0, oom
    assert "oom_kill 1" in oom["end_state"]["memory.events"] and oom["divergences"] == [], oom
    assert fits["exit_status"] == 0 and "oom_kill" not in fits["episodes_by_kind"], fits
    assert "oom_kill 0" in fits["end_state"]["memory.events"] and fits["divergences"] == [], fits
