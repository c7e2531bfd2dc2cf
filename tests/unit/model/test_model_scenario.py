"""Scenario files (model/scenario.py) and `memcgscope simulate`."""

import argparse
import json
import pathlib

import pytest

from memcgscope.collector import simulate
from memcgscope.model.scenario import ScenarioError, run_scenario

pytestmark = pytest.mark.unit

SCENARIOS = sorted((pathlib.Path(__file__).resolve().parents[3] / "model" / "scenarios")
                   .glob("*.toml"))

BASE = '''
kernel = "6.1"
cgroup = "v2"
[cgroups.a]
"memory.max" = "1M"
'''


def run_cli(argv):
    parser = argparse.ArgumentParser()
    simulate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", *argv])
    return args.func(args)


def test_examples_exist_and_meet_their_expectations():
    assert len(SCENARIOS) >= 3
    for path in SCENARIOS:
        results = run_scenario(path.read_text(), path.name)
        assert results and all(r.ok for r in results), path.name
        assert any(r.expect is not None for r in results), path.name


def test_v1_resize_example_is_ebusy_after_five_reclaims():
    path = next(p for p in SCENARIOS if "resize" in p.name)
    write = [r for r in run_scenario(path.read_text(), path.name) if r.op == "write"][0]
    assert write.ret == -16 and len([s for s in write.steps if s.kind == "reclaim"]) == 5


def test_charge_op_with_flags_reclaim_list_and_changed_files():
    text = BASE + '''
[[ops]]
op = "charge"
cgroup = "a"
pages = 256
[[ops]]
op = "charge"
cgroup = "a"
pages = 1
gfp = "KERNEL|NORETRY"
reclaim = [0, 0]
expect = "-ENOMEM"
[[ops]]
op = "charge"
cgroup = "a"
flags = ["PF_MEMALLOC"]
expect = 0
'''
    r = run_scenario(text)
    assert [x.ret for x in r] == [0, -12, 0] and all(x.ok for x in r)
    assert r[0].changed["/a"]["memory.current"] == ["0\n", f"{256 * 4096}\n"]
    assert "max 2" in r[1].changed["/a"]["memory.events"][1]
    assert "max 3" in r[2].changed["/a"]["memory.events"][1]  # 6.1: the forced charge counts


@pytest.mark.parametrize("body,message", [
    ('[[ops]]\nop = "charge"\ncgroup = "a"\ngfp = "KERNAL"\n',
     "scenario.toml: ops[0].gfp: unknown gfp 'KERNAL'; use one of KERNEL, NOWAIT"),
    ('[[ops]]\nop = "charge"\ncgroup = "zz"\n',
     "scenario.toml: ops[0].cgroup: no cgroup 'zz'; declare it under [cgroups]"),
    ('[[ops]]\nop = "chrage"\n', "scenario.toml: ops[0].op: unknown op 'chrage'; use one of"),
    ('[[ops]]\nop = "charge"\ncgroup = "a"\npagez = 3\n',
     "scenario.toml: ops[0].pagez: not a key of op 'charge'"),
    ('[[ops]]\nop = "touch"\ntask = "nobody"\n', "scenario.toml: ops[0].task: no task 'nobody'"),
    ('[[ops]]\nop = "write"\ncgroup = "a"\nfile = "memory.max"\nvalue = "1M"\nreclaim = 3\n',
     "scenario.toml: ops[0].reclaim: expected a list of pages freed"),
    ('[[ops]]\nop = "charge"\ncgroup = "a"\npages = "lots"\n',
     "scenario.toml: ops[0].pages: bad size 'lots'"),
    ('[[ops]]\nop = "charge"\ncgroup = "a"\ncpu = 4\n',
     "scenario.toml: ops[0].cpu: 4: use a CPU number 0..0"),
    # after [cgroups.a] a key is a control file of /a
    ('"memory.colour" = "red"\n', 'scenario.toml: cgroups.a."memory.colour": write of'),
])
def test_bad_scenarios_get_one_line_errors(body, message):
    with pytest.raises(ScenarioError) as e:
        run_scenario(BASE + body)
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text


def test_bad_header_values():
    with pytest.raises(ScenarioError, match=r"^s.toml: colour: unknown key; use one of"):
        run_scenario('colour = "red"\nkernel = "6.1"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"^s.toml: hz: 'fast': use CONFIG_HZ"):
        run_scenario('kernel = "6.1"\nhz = "fast"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"^s.toml: swap_account: 'yes': use true or false"):
        run_scenario('kernel = "6.1"\nswap_account = "yes"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"^s.toml: kernel: missing; set kernel = one of"):
        run_scenario('cgroup = "v1"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"^s.toml: kernel: unknown kernel profile '4.19'"):
        run_scenario('kernel = "4.19"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"^s.toml: cgroup: 'v3' is not a cgroup version"):
        run_scenario('kernel = "6.1"\ncgroup = "v3"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r'cgroups.a."memory.limit_in_bytes": write of'):
        run_scenario('kernel = "6.1"\n[cgroups.a]\n"memory.limit_in_bytes" = "1M"\n', "s.toml")


def test_toml_syntax_error_names_line_and_column():
    with pytest.raises(ScenarioError) as e:
        run_scenario('kernel = "6.1"\ncgroup = \n', "bad.toml")
    assert str(e.value).startswith("bad.toml: TOML syntax error:")
    assert "line 2" in str(e.value) and "column" in str(e.value)


def test_cli_text_json_and_exit_codes(tmp_path, capsys):
    path = SCENARIOS[0]
    assert run_cli([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] ")
    assert run_cli(["--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["ops"][0]["steps"]
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '[[ops]]\nop = "charge"\ncgroup = "a"\ngfp = "KERNAL"\n')
    assert run_cli([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ops[0].gfp: unknown gfp 'KERNAL'" in err
    assert run_cli([str(tmp_path / "missing.toml")]) == 2
    assert "No such file" in capsys.readouterr().err
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(BASE + '[[ops]]\nop = "charge"\ncgroup = "a"\nexpect = "-ENOMEM"\n')
    assert run_cli([str(wrong)]) == 1


def test_flags_op_for_later_charges_and_for_a_task():
    text = BASE + '''
[tasks]
t = "a"
[[ops]]
op = "charge"
cgroup = "a"
pages = 256
[[ops]]
op = "flags"
flags = ["PF_MEMALLOC"]
[[ops]]
op = "charge"
cgroup = "a"
expect = 0
[[ops]]
op = "flags"
task = "t"
flags = ["DYING"]
[[ops]]
op = "touch"
task = "t"
anon = 1
expect = "dying"
'''
    r = run_scenario(text)
    assert [s.kind for s in r[2].steps if s.kind == "force"] == ["force"]
    assert r[4].ok, r[4].summary
