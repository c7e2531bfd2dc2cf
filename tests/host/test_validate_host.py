"""`memcgscope validate` on this host (tracepoint mode, cgroup v1): the
built-in suite agrees, a wrong profile disagrees and names the field, the
command form reports an OOM and a clean run, and SIGINT in the middle of a
scenario leaves no scratch cgroup and no BPF program behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from promkit import bpf_prog_ids, new_programs_after_grace

from memcgscope.collector.scratch import own_memory_cgroup_dir

MEMCGSCOPE = os.path.join(os.path.dirname(sys.executable), "memcgscope")
ARTIFACTS = os.environ.get("MEMCGSCOPE_ARTIFACTS", "/tmp/memcgscope-artifacts")
TOUCH = "import mmap, sys; n = int(sys.argv[1]) << 20; m = mmap.mmap(-1, n)\nfor o in range(0, n, 4096): m[o] = 1"


def validate(*args, timeout=900):
    return subprocess.run([MEMCGSCOPE, "validate", *args], capture_output=True, text=True, timeout=timeout)


def leftovers() -> list[str]:
    """validate's scratch cgroups (memcgscope-validate-*, memcgscope-cmd-*)
    in our own cgroup; another tool's (a benchmark run beside the tests:
    memcgscope-bench-*) are not validate's to remove."""
    parent, _ = own_memory_cgroup_dir()
    return [n for n in os.listdir(parent) if n.startswith(("memcgscope-validate-", "memcgscope-cmd-"))]


def test_builtin_suite_agrees_on_this_kernel():
    before = bpf_prog_ids()
    r = validate("--json")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["mode"] == "tracepoint" and d["profile"] == "6.18.36" and d["agree"] is True
    verdicts = {s["scenario"]: s["verdict"] for s in d["scenarios"]}
    assert sum(v == "agree" for v in verdicts.values()) >= 6, verdicts
    assert set(verdicts.values()) <= {"agree", "n/a"}
    for s in d["scenarios"]:
        if s["verdict"] == "n/a":
            assert s["not_applicable"], s["scenario"]
        else:
            # the probes saw the scenario: every OOM kill, and reclaims wherever the model reclaims
            assert any(r["field"] == "episodes divergent" and r["kernel"] == 0 for r in s["rows"]), s["scenario"]
    oom = next(s for s in d["scenarios"] if s["scenario"] == "anon-oom-v1.toml")
    assert oom["episodes_by_kind"].get("oom_kill") == 1 and oom["episodes_by_kind"].get("reclaim", 0) > 0
    os.makedirs(ARTIFACTS, exist_ok=True)
    table = validate()
    with open(os.path.join(ARTIFACTS, "validate-host.txt"), "w") as f:
        f.write(table.stdout)
    assert table.returncode == 0 and all(len(line) <= 80 for line in table.stdout.splitlines())
    assert leftovers() == [] and new_programs_after_grace(before) == set()


def test_a_wrong_profile_disagrees_and_names_the_field():
    r = validate("--json", "--profile", "5.10", "model/scenarios/v1-memsw.toml")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr
    (s,) = json.loads(r.stdout)["scenarios"]
    bad = [row["field"] for row in s["rows"] if row["verdict"] == "disagree"]
    assert "app memory.memsw.failcnt" in bad, bad
    text = validate("--profile", "5.10", "model/scenarios/v1-memsw.toml")
    assert text.returncode == 1 and "app memory.memsw.failcnt: kernel 0, model 19" in " ".join(text.stdout.split())


def test_command_form_oom_and_clean():
    oom = validate("--json", "--memory-max", "30M", "--", sys.executable, "-c", TOUCH, "100")
    assert oom.returncode == 0, oom.stdout[-3000:] + oom.stderr
    d = json.loads(oom.stdout)
    assert d["exit_status"] == -signal.SIGKILL and d["episodes_by_kind"].get("oom_kill") == 1
    assert "oom_kill 1" in d["end_state"]["memory.oom_control"] and d["divergences"] == []
    clean = validate("--json", "--memory-max", "64M", "--", sys.executable, "-c", TOUCH, "16")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr
    d = json.loads(clean.stdout)
    assert d["exit_status"] == 0 and "oom_kill" not in d["episodes_by_kind"]
    assert "oom_kill 0" in d["end_state"]["memory.oom_control"]
    assert leftovers() == []


def test_sigint_mid_scenario_leaves_nothing_behind(tmp_path):
    scenario = tmp_path / "long.toml"
    scenario.write_text('description = "a long page-cache stream"\nkernel = "6.18"\ncgroup = "v1"\n'
                        '[cgroups.app]\n"memory.limit_in_bytes" = "32M"\n[tasks]\nw = "app"\n'
                        '[[ops]]\nop = "touch"\ntask = "w"\nfile = "4G"\n')
    before = bpf_prog_ids()
    proc = subprocess.Popen([MEMCGSCOPE, "validate", str(scenario)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith("memcgscope-validate-long") for n in leftovers()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)   # in the middle of the touch
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped; scratch cgroups removed" in err
    assert leftovers() == []
    assert new_programs_after_grace(before) == set()
    assert not [f for f in os.listdir("/var/tmp") if f.startswith("memcgscope-validate-long")]
