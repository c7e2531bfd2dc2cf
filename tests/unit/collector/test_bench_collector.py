"""bench_collector.py's ingest runs (a tiny count, so the benchmark cannot
rot) and its raw events replay to the very episodes they came from."""

from __future__ import annotations

import json
import os
import sys

import pytest

from memcgscope.probes.assembly import EpisodeAssembler
from memcgscope.probes.episodes import decode_bytes

pytestmark = pytest.mark.unit
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import bench_collector  # noqa: E402


def test_ingest_runs_and_checks_everything():
    results = bench_collector.ingest(50)
    assert len(results) >= 6
    for name, r in results.items():
        assert r["episodes"] >= 50 and r["checks"] >= r["episodes"] and r["divergences"] == 0, name


def _entered_episodes(path):
    """(memsw, episode) of a recording's charges and limit writes."""
    lines = path.read_text().splitlines()
    memsw = json.loads(lines[0])["memsw"]
    for line in lines[1:]:
        ep = json.loads(line)
        if ep.get("type") == "episode" and ep["kind"] in ("charge", "limit_write"):
            yield memsw, ep


def test_raw_events_round_trip():
    path = next(iter(sorted(bench_collector.RECORDINGS.glob("*.jsonl"))))
    for memsw, ep in _entered_episodes(path):
        asm = EpisodeAssembler(memsw=memsw)
        out = [x for raw in bench_collector.to_raw_events(ep) for x in asm.feed(decode_bytes(raw))]
        assert len(out) == 1
        got = out[0].to_json()
        for key in ("kind", "cgroup_id", "ret", "pid", "comm"):
            assert got[key] == ep[key]
        assert [s["kind"] for s in got["steps"]] == [s["kind"] for s in ep["steps"]]


def test_baseline_ref_prints_both_sides_and_the_ratio(capsys):
    """--baseline-ref against this very commit: a temporary worktree, both
    trees measured in children, the table printed, the worktree gone."""
    import subprocess

    def worktrees():
        return subprocess.run(["git", "-C", str(bench_collector.ROOT), "worktree", "list", "--porcelain"],
                              capture_output=True, text=True, check=True).stdout.count("worktree ")

    before = worktrees()
    assert bench_collector.main(["--count", "20", "--baseline-ref", "HEAD", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("before (HEAD)") == 2
    ingest_tables = out.split("ring-buffer bytes per episode")[0]
    rows = [line.split() for line in ingest_tables.splitlines() if line.strip().startswith("debian-")]
    assert len(rows) == 2 * len(list(bench_collector.RECORDINGS.glob("*.jsonl")))
    for row in rows:
        b, a, ratio = float(row[1].replace(",", "")), float(row[2].replace(",", "")), float(row[3].rstrip("x"))
        assert b > 0 and a > 0 and abs(ratio - a / b) < 0.01 and "differ" not in " ".join(row)
    assert worktrees() == before


def test_baseline_ref_names_a_bad_ref():
    with pytest.raises(SystemExit, match="--baseline-ref no-such-ref-xyz: git worktree add failed"):
        bench_collector.main(["--count", "5", "--baseline-ref", "no-such-ref-xyz"])


def test_raw_events_encode_the_oom_loop_as_the_kernel_does():
    """The bench sends a recording's OOM loop as the BPF side does (identical
    passes as one EV_REPEAT); assembled back, every step is there, results
    and counters included."""
    from memcgscope.probes.episodes import EV
    repeats = 0
    for path in sorted(bench_collector.RECORDINGS.glob("*-v2-*.jsonl")):
        for memsw, ep in _entered_episodes(path):
            raws = bench_collector.to_raw_events(ep)
            repeats += sum(decode_bytes(r).type == EV.REPEAT for r in raws)
            asm = EpisodeAssembler(memsw=memsw)
            (got,) = [x for raw in raws for x in asm.feed(decode_bytes(raw))]
            want = [(s["kind"], s.get("result"), s.get("after")) for s in ep["steps"]]
            assert [(s["kind"], s.get("result"), s.get("after")) for s in got.to_json()["steps"]] == want
            assert len(raws) <= len(ep["steps"]) + 2
    assert repeats >= 4, repeats     # every v2 recording has a memory.max OOM loop


def test_ring_bytes_per_episode():
    r = bench_collector.ring_bytes()
    assert len(r) == 14, sorted(r)
    for name, (n, plain, encoded) in r.items():
        assert n > 0 and encoded <= plain and plain >= bench_collector.RING_RECORD, name
    assert any(encoded < plain / 2 for _, plain, encoded in r.values())   # the v2 OOM loops
