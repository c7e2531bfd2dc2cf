"""`memcgscope run` on this host (tracepoint mode), scraped by a real
Prometheus over TLS with basic auth: a workload in a scratch cgroup shows up
in PromQL results for that cgroup; credentials are enforced; SIGTERM
detaches everything, restores kernel.bpf_stats_enabled and exits 0 fast."""

from __future__ import annotations

import os
import ssl
import subprocess

import pytest

from memcgscope.collector.scratch import ScratchCgroup
from promkit import (PASSWORD, USER, auth, http_get, query, run_collector, run_prometheus, wait_for,
                     write_tls_web_config)

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


@pytest.fixture
def collector(workdir):
    """`memcgscope run` with TLS + basic auth; yields (process, port, cert,
    stderr path); kernel.bpf_stats_enabled must be as it was afterwards."""
    web_yml, cert = write_tls_web_config(workdir)
    with open(BPF_STATS) as f:
        stats_before = f.read().strip()
    with run_collector(workdir, "--web.config.file", str(web_yml),
                       "--divergence-log", str(workdir / "divergences.jsonl")) as (proc, port, stderr):
        yield proc, port, cert, stderr
    with open(BPF_STATS) as f:
        assert f.read().strip() == stats_before


def test_prometheus_sees_the_workload_cgroup(workdir, collector):
    proc, port, cert, stderr = collector
    text = stderr.read_text()
    assert "mode tracepoint" in text and f"https://127.0.0.1:{port}/metrics" in text
    ctx = ssl.create_default_context(cafile=str(cert))
    # without credentials: refused; with them: metrics
    assert http_get(f"https://127.0.0.1:{port}/metrics", context=ctx)[0] == 401
    status, body = http_get(f"https://127.0.0.1:{port}/metrics", auth(USER, PASSWORD), context=ctx)
    assert status == 200 and b"memcgscope_build_info" in body
    assert http_get(f"https://127.0.0.1:{port}/-/healthy", auth(USER, PASSWORD), context=ctx)[0] == 200

    jobs = [{"job_name": "memcgscope", "scheme": "https", "scrape_interval": "1s", "scrape_timeout": "1s",
             "tls_config": {"ca_file": str(cert)}, "basic_auth": {"username": USER, "password": PASSWORD},
             "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
            {"job_name": "memcgscope-noauth", "scheme": "https", "scrape_interval": "1s", "scrape_timeout": "1s",
             "tls_config": {"ca_file": str(cert)}, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]
    target_file = "/var/tmp/memcgscope-run-host.bin"
    with run_prometheus(workdir, jobs) as (base, prom, log):
        try:
            with ScratchCgroup("prom", "32M") as cg:
                dd = cg.popen(["dd", "if=/dev/zero", f"of={target_file}", "bs=1M", "count=96", "conv=fsync"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert dd.wait(timeout=120) == 0
                path = cg.path[len("/sys/fs/cgroup/memory"):]
                sel = f'cgroup="{path}",job="memcgscope"'
                (reclaims,) = wait_for("reclaim calls of the workload cgroup", prom, log,
                                       lambda: query(base, f"memcgscope_reclaim_calls_total{{{sel}}} > 0"))
                assert reclaims["metric"]["caller"] == "unknown"  # tracepoint mode cannot see the caller
                (freed,) = wait_for("pages reclaimed", prom, log,
                                    lambda: query(base, f"memcgscope_reclaimed_pages_total{{{sel}}} > 0"))
                (episodes,) = wait_for("reclaim episodes", prom, log,
                                       lambda: query(base, f'memcgscope_episodes_total{{{sel},kind="reclaim"}} > 0'))
                assert float(episodes["value"][1]) == float(reclaims["value"][1])
                (limit,) = wait_for("the cgroup's limit gauge", prom, log,
                                    lambda: query(base, f"memcgscope_cgroup_limit_bytes{{{sel}}}"))
                assert float(limit["value"][1]) == 32 * 2**20
                (failcnt,) = wait_for("failcnt", prom, log,
                                      lambda: query(base, f'memcgscope_cgroup_failcnt_total{{{sel},counter="memory"}} > 0'))
                # PGSTEAL_DIRECT from memcg:count_memcg_events agrees with the vmscan count
                (steal,) = wait_for("memcg events", prom, log, lambda: query(
                    base, f'memcgscope_memcg_events_total{{{sel},item="PGSTEAL_DIRECT"}}'))
                assert float(steal["value"][1]) == float(freed["value"][1])
        finally:
            if os.path.exists(target_file):
                os.unlink(target_file)
        (info,) = query(base, 'memcgscope_build_info{job="memcgscope"}')
        assert info["metric"]["mode"] == "tracepoint" and info["metric"]["profile"] == "6.18.36"   # 6.18.44: round-robin stock eviction (6.18.36+)
        assert query(base, 'memcgscope_probe_attached{job="memcgscope",target="vmscan:mm_vmscan_memcg_reclaim_end"} == 1')
        (up,) = wait_for("the no-auth job's state", prom, log, lambda: query(base, 'up{job="memcgscope-noauth"}'))
        assert up["value"][1] == "0"
        assert query(base, 'memcgscope_bpf_runs_total{job="memcgscope"} > 0'), "kernel.bpf_stats_enabled is on while running"
