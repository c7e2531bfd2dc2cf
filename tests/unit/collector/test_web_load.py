"""tests/bench/bench_web.py at a tiny size, so the load script the host
tier runs at full size (tests/host/test_web_load_host.py) cannot rot."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.unit
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import bench_web  # noqa: E402


def test_the_load_script_runs_and_the_server_holds():
    lines = []
    f = bench_web.run(scrapers=2, idle=4, seconds=0.5, cut_wait=5, request_timeout=0.2, out=lines.append)
    assert f["scrapes"] > 0 and f["errors"] == 0, f["error_kinds"]
    # each idle half request was cut (after request_timeout, with a 408), and replaced while the load ran
    assert f["idle_left"] == 0 and f["idle_cut"] >= 4 and f["idle_answered"] == f["idle_cut"]
    assert f["new_conn_probes"] > 0 and f["new_conn_failed"] == 0
    assert f["answers_after"] and f["exit_code"] == 0 and f["server_stderr"] == ""
    assert len(lines) == 1 and lines[0].startswith("bench_web: 2 scrapers, 4 idle half-request connections")
