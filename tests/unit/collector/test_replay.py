"""`memcgscope replay`: recordings of real kernels replay clean; divergent
episodes give exit 1 and a divergences file; malformed input gives one-line
errors with the line number and exit 2; a truncated last line is reported
and the rest still checked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from memcgscope.collector import replay_cmd

pytestmark = pytest.mark.unit

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"
ONE = sorted(RECORDINGS.glob("*.jsonl"))[0]


def replay(*argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    replay_cmd.add_parser(sub)
    args = ap.parse_args(["replay", *map(str, argv)])
    return args.func(args)


def lines_of(path):
    return path.read_text().splitlines()


def write(tmp_path, lines, name="rec.jsonl", newline=True):
    p = tmp_path / name
    p.write_text("\n".join(lines) + ("\n" if newline else ""))
    return p


def a_divergent_episode(lines):
    """An episode of the recording edited to break a rule: a 1-page charge
    returning -ENOMEM right after its first reclaim."""
    for line in lines:
        ep = json.loads(line)
        if ep.get("kind") == "charge" and ep["nr_pages"] == 1 and ep["gfp"] & 0x400:
            i = next(j for j, s in enumerate(ep["steps"]) if s["kind"] == "reclaim")
            ep["steps"] = ep["steps"][:i + 1]
            ep["steps"][-1]["freed"] = 0
            ep["ret"] = -12
            return json.dumps(ep)
    raise AssertionError("no 1-page charge in the recording")


@pytest.mark.parametrize("path", sorted(RECORDINGS.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recordings_replay_clean(path, capsys):
    assert replay(path) == 0
    out = capsys.readouterr().out
    assert "no divergence" in out and "charge       ok" in out


def test_json_summary(capsys):
    assert replay("--json", ONE) == 0
    s = json.loads(capsys.readouterr().out)
    n = sum(1 for x in lines_of(ONE) if json.loads(x).get("type") == "episode")
    assert s["episodes"] == n and s["divergences"] == 0 and s["profile"] in ("6.1", "6.12")
    assert sum(s["checks"].values()) >= n


def test_divergences_exit_1_and_file(tmp_path, capsys):
    lines = lines_of(ONE)
    bad = a_divergent_episode(lines[1:])
    p = write(tmp_path, lines[:3] + [bad] + lines[3:])
    div = tmp_path / "div.jsonl"
    assert replay("--divergences", div, p) == 1
    out = capsys.readouterr().out
    assert "1 divergences" in out and "charge/enomem_early: 1" in out
    (d,) = [json.loads(x) for x in div.read_text().splitlines()]
    assert d["line"] == 4 and d["reason"] == "enomem_early" and d["episode"]["ret"] == -12


def test_malformed_line_names_the_line(tmp_path, capsys):
    lines = lines_of(ONE)
    p = write(tmp_path, lines[:16] + ['{"type": "episode", "kind": "charge" "gfp": 1}'] + lines[16:])
    assert replay(p) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert f"{p}:17: not JSON (Expecting ',' delimiter" in err and "fix or drop the line" in err


def test_truncated_last_line_is_reported_and_rest_checked(tmp_path, capsys):
    lines = lines_of(ONE)
    body = [x for x in lines if json.loads(x).get("type") in ("header", "episode")]
    p = write(tmp_path, body + [body[-1][: len(body[-1]) // 2]], newline=False)
    assert replay("--json", p) == 0
    cap = capsys.readouterr()
    assert f"{p}:{len(body) + 1}: last line is truncated" in cap.err
    assert json.loads(cap.out)["episodes"] == len(body) - 1
    # the same line in the middle of the file is an error
    q = write(tmp_path, body[:5] + [body[-1][:40]] + body[5:], name="mid.jsonl")
    assert replay(q) == 2
    assert f"{q}:6: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("first,message", [
    ('{"type": "episode", "kind": "charge"}', "the first line must be the header"),
    ('{"type": "header", "schema": "other/9"}', "schema 'other/9'"),
    ('[1, 2]', "a JSON list, not an object"),
])
def test_bad_header(tmp_path, capsys, first, message):
    p = write(tmp_path, [first] + lines_of(ONE)[1:])
    assert replay(p) == 2
    err = capsys.readouterr().err
    assert f"{p}:1:" in err and message in err


def test_unknown_kernel_and_profile_override(tmp_path, capsys):
    lines = lines_of(ONE)
    h = json.loads(lines[0])
    h["kernel"] = "4.19.0-1-amd64"
    p = write(tmp_path, [json.dumps(h)] + lines[1:])
    assert replay(p) == 2
    err = capsys.readouterr().err
    assert "kernel '4.19.0-1-amd64'" in err and "pass --profile" in err
    assert replay("--profile", "6.1", p) == 0
    assert replay("--profile", "9.9", p) == 2
    assert "--profile '9.9'" in capsys.readouterr().err


def test_profile_override_changes_the_verdict(capsys):
    # 5.15 has a batch of 32 and no forced max event: the 6.1 recording's
    # batch attempts of 64 pages do not fit it
    assert replay("--profile", "5.15", ONE) == 1
    assert "counter_mismatch" in capsys.readouterr().out


def test_missing_file_and_empty_file(tmp_path, capsys):
    assert replay(tmp_path / "nope.jsonl") == 2
    assert "no such file" in capsys.readouterr().err
    p = write(tmp_path, [], newline=False)
    assert replay(p) == 2
    assert "no header line" in capsys.readouterr().err
    assert replay("--divergences", tmp_path / "no" / "dir.jsonl", ONE) == 2
    assert "--divergences" in capsys.readouterr().err


def test_unknown_line_type(tmp_path, capsys):
    lines = lines_of(ONE)
    p = write(tmp_path, lines[:2] + ['{"type": "gossip"}'] + lines[2:])
    assert replay(p) == 2
    assert f"{p}:3: unknown line type 'gossip'" in capsys.readouterr().err


def test_wired_into_cli(capsys):
    from memcgscope.collector import cli
    assert cli.main(["replay", str(ONE)]) == 0


def test_bench_runs_small():
    import importlib.util
    script = Path(__file__).resolve().parents[2] / "bench" / "bench_replay.py"
    spec = importlib.util.spec_from_file_location("bench_replay", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for short in (False, True):
        r = mod.run(300, short=short)
        assert r["episodes"] == 300 * len(r["files"]) and r["divergences"] == 0
        assert r["check_per_s"] > 0 and r["decode_check_per_s"] > 0
        # every shape is replayed once per checker, then cached
        assert 0 < r["full_replays"] < r["episodes"]


@pytest.mark.parametrize("stem,visible", [
    ("debian-6.1-v1-kprobe", False),    # only drain_all_stock.part.0, entered past the trylock
    ("debian-6.12-v2-fentry", False),   # attached, but calls straight to the .part.0 clone are missed
    ("debian-6.12-v2-kprobe", True),    # every clone kprobed
])
def test_drains_visible_from_header(stem, visible):
    from memcgscope.probes.episodes import Visibility
    header = json.loads(lines_of(RECORDINGS / f"{stem}.jsonl")[0])
    assert Visibility.from_header(header).drains is visible
