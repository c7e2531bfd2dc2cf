"""bench_rss.py's parts that need no root, so the benchmark cannot rot: the
baseline tree imports memcgscope from itself (not from this checkout), the
/metrics sums and the report. tests/host runs the whole benchmark at a
tiny size."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import bench_rss  # noqa: E402


def test_the_baseline_tree_imports_from_itself(tmp_path):
    head = subprocess.run(["git", "-C", bench_rss.REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    path = bench_rss.baseline_tree(head, str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import memcgscope.probes.session as s, memcgscope.collector.cli as c, "
                                              "memcgscope.model as m; print(s.__file__, c.__file__, m.__file__)"],
                       env=dict(os.environ, PYTHONPATH=path), cwd="/", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert len(files) == 3 and all(f.startswith(str(tmp_path)) for f in files), files


def test_metric_sums_take_every_label_set_and_no_other_metric():
    body = ("# TYPE memcgscope_episodes_total counter\n"
            'memcgscope_episodes_total{kind="charge"} 12.0\n'
            'memcgscope_episodes_total{kind="reclaim"} 3.0\n'
            "memcgscope_episodes_totally_else 100.0\n"
            'memcgscope_events_lost_total{cpu="0"} 0.0\n')
    assert bench_rss.metric_sum(body, "memcgscope_episodes_total") == 15.0
    assert bench_rss.metric_sum(body, "memcgscope_events_lost_total") == 0.0


def test_the_report_prints_both_collectors_and_their_ratio():
    mib = 2 ** 20
    a = bench_rss.Collector("main", [], {}, "/", startup_s=1.0, rss_start=200 * mib, rss_end=210 * mib,
                            rss_peak=211 * mib, compiler=True, episodes=10, lost=0)
    b = bench_rss.Collector("this checkout", [], {}, "/", startup_s=2.0, rss_start=32 * mib, rss_end=35 * mib,
                            rss_peak=36 * mib, compiler=False, episodes=10, lost=0)
    out = io.StringIO()
    bench_rss.report({"collectors": [a, b], "workload_runs": 3, "seconds": 60, "mode": "tracepoint"}, out)
    text = out.getvalue()
    assert "main" in text and "this checkout" in text and "200.0Mi" in text and "32.0Mi" in text
    assert "RSS at start 6.2x, at the end 6.0x; start-up 0.50x" in text
    assert bench_rss.rss_bytes(os.getpid()) > 0
