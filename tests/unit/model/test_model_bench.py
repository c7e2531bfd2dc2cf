"""The benchmark script still runs (tiny counts; no timing asserted)."""

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.unit

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "bench_model.py"


@pytest.mark.parametrize("profile,cgroup", [("6.1", "v2"), ("5.15", "v1"), ("6.18", "v1")])
def test_bench_runs(profile, cgroup, capsys):
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.run(count=300, profile=profile, cgroup=cgroup)
    assert set(figures) >= {"stock_hits_per_s", "stock_misses_per_s", "slow_paths_per_s"}
    assert all(figures[k] > 0 for k in ("stock_hits_per_s", "stock_misses_per_s",
                                         "slow_paths_per_s"))
    assert bench.main(["--count", "200", "--profile", profile, "--cgroup", cgroup]) == 0
    assert "stock hits" in capsys.readouterr().out
