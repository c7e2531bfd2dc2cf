"""`memcgscope trace`'s columns over real recorded episodes: every line fits
80 columns and says what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcgscope.collector import trace_cmd
from memcgscope.collector.trace_cmd import HEADER, describe, line

pytestmark = pytest.mark.unit

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"


def episodes():
    for path in sorted(RECORDINGS.glob("*.jsonl")):
        for text in path.read_text().splitlines():
            d = json.loads(text)
            if d.get("type") == "episode":
                yield d


def test_every_line_fits_80_columns():
    assert len(line(HEADER)) <= 80
    n = 0
    for ep in episodes():
        c = describe(ep)
        row = line(("10:00:00", ep["comm"], ep["pid"], "/kubepods.slice/very/long/cgroup/path", c["kind"],
                    c["pages"], f"{c['reclaims']}/{c['freed']}", c["result"], f"{c['ms']:.1f}"))
        assert len(row) <= 80, row
        n += 1
    assert n > 100


def test_columns_say_what_happened():
    eps = list(episodes())
    oom = next(e for e in eps if e["kind"] == "charge" and any(s["kind"] == "oom_kill" for s in e["steps"]))
    c = describe(oom)
    assert c["kind"] == "charge" and c["result"].startswith("oom:") and c["reclaims"] >= 16
    huge = next(e for e in eps if e["kind"] == "charge" and e["nr_pages"] == 512 and e["ret"] == -12)
    assert describe(huge)["result"] == "-ENOMEM" and describe(huge)["reclaims"] == 0
    ebusy = next(e for e in eps if e["kind"] == "limit_write" and e["ret"] == -16)
    assert describe(ebusy)["kind"] == "limit" and describe(ebusy)["result"] == "-EBUSY"


def test_help_has_examples(capsys):
    import argparse
    ap = argparse.ArgumentParser()
    trace_cmd.add_parser(ap.add_subparsers())
    with pytest.raises(SystemExit):
        ap.parse_args(["trace", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--pod" in out and "--json" in out
