"""The dashboard and the rules against real data: `memcgscope run` on this
host (tracepoint mode) scraped by a real Prometheus with
grafana/prometheus/rules.yml loaded, the scrape job taken from
grafana/prometheus/scrape.yml, a page-cache workload in a scratch cgroup;
then every panel query of grafana/dashboards/memcgscope.json, with Grafana's
variables substituted, evaluated through Prometheus's HTTP API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from memcgscope.collector.scratch import ScratchCgroup
from memcgscope.probes.sysroot import SysRoot
from promkit import api, query, run_collector, run_prometheus, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "memcgscope.json"
RULES = ROOT / "grafana" / "prometheus" / "rules.yml"
SCRAPE = ROOT / "grafana" / "prometheus" / "scrape.yml"

# Panels whose every query must return series on this host: what tracepoint
# mode sees (memcg reclaims, memcg:* tracepoints on 6.13+), cgroupfs of the
# workload's cgroup, and the exporter's own series.
NON_EMPTY = {"Build", "Probes attached", "Probes", "Events lost /s", "Reclaim calls /s by caller",
             "Pages reclaimed /s by caller", "Usage vs limit", "Usage / limit", "memcg events /s (6.13+)",
             "BPF CPU time by program", "Scrape duration", "Events lost /s by CPU"}


@pytest.fixture
def collector(workdir):
    """`memcgscope run` on a free loopback port; yields the port."""
    with run_collector(workdir, "--divergence-log", "") as (proc, port, stderr):
        yield port


def panel_queries(dashboard: dict):
    """(panel title, target expr, instant?) for every data panel's target."""
    for p in dashboard["panels"]:
        for panel in [p, *p.get("panels", [])]:
            for t in panel.get("targets", []):
                yield panel["title"], t["expr"], bool(t.get("instant"))


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation, for the variables the dashboard uses."""
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in out, out
    return out


def evaluate(base: str, path: str, **params) -> dict:
    """A query's data, or a test failure carrying Prometheus's error (a 400
    for a syntax error, 422 for an evaluation error)."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        pytest.fail(f"{params.get('query')}: HTTP {e.code}: {e.read().decode(errors='replace')}")
    assert body["status"] == "success", body
    return body["data"]


def promql_regex(text: str) -> str:
    """A literal as an RE2 regex inside a PromQL double-quoted string."""
    return re.escape(text).replace("\\", "\\\\")


def test_every_panel_query_evaluates(workdir, collector):
    port = collector
    instance = f"127.0.0.1:{port}"
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    job = {**job, "scrape_interval": "1s", "scrape_timeout": "1s", "static_configs": [{"targets": [instance]}]}
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(panel_queries(dashboard))
    assert NON_EMPTY <= {title for title, _, _ in queries}, "a panel this test expects data from was renamed"
    target_file = f"/var/tmp/memcgscope-grafana-host-{os.getpid()}.bin"

    with run_prometheus(workdir, [job], [str(RULES)]) as (base, prom, log):
        try:
            with ScratchCgroup("grafana", "32M") as cg:
                # 64 MiB of page cache through a 32 MiB limit: memcg reclaim
                dd = cg.popen(["dd", "if=/dev/zero", f"of={target_file}", "bs=1M", "count=64", "conv=fsync"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert dd.wait(timeout=120) == 0
                # the cgroup label: its path in the hierarchy (our own cgroup's path plus its name)
                own = SysRoot("/").proc_self_cgroup()["memory" if cg.version == "v1" else ""]
                path = os.path.join(own, cg.name)
                mine = {"job": "memcgscope", "instance": promql_regex(instance), "cgroup": promql_regex(path),
                        "__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
                everything = {**mine, "cgroup": ".*"}

                # the variables' queries find this job, instance and cgroup
                for var in dashboard["templating"]["list"]:
                    if var["type"] != "query":
                        continue
                    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
                    selector, label = substitute(m.group(1), mine), m.group(2)
                    want = {"job": "memcgscope", "instance": instance, "cgroup": path}[label]
                    wait_for(f"variable {var['name']} to offer {want}", prom, log,
                             lambda: want in evaluate(base, f"/api/v1/label/{label}/values", **{"match[]": selector}))

                # panels tied to what tracepoint mode sees: data for this cgroup
                for title, expr, _ in queries:
                    if title in NON_EMPTY:
                        q = substitute(expr, mine)
                        wait_for(f"{title!r}: {q}", prom, log, lambda: evaluate(base, "/api/v1/query", query=q)["result"])

                # every query, instant and over a range, evaluates without error
                now = time.time()
                for title, expr, instant in queries:
                    for values in (mine, everything):
                        q = substitute(expr, values)
                        assert evaluate(base, "/api/v1/query", query=q)["resultType"] in ("vector", "scalar"), title
                        if not instant:
                            evaluate(base, "/api/v1/query_range", query=q, start=now - 120, end=now, step=15)
                # the workload's limit made it into the usage/limit gauge
                (limit,) = query(base, substitute('memcgscope_cgroup_limit_bytes{job=~"$job",cgroup=~"$cgroup"}',
                                                  mine))
                assert float(limit["value"][1]) == 32 * 2**20
        finally:
            if os.path.exists(target_file):
                os.unlink(target_file)

        # the rule file is loaded and every rule evaluates cleanly
        groups = api(base, "/api/v1/rules")["groups"]
        assert {g["name"] for g in groups} == {"memcgscope-recording", "memcgscope-alerts"}
        assert sum(len(g["rules"]) for g in groups) == len(
            [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]])

        def all_evaluated():
            rules = [r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]]
            errors = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
            assert not errors, errors
            return all(r["health"] == "ok" for r in rules)
        wait_for("every rule to be evaluated", prom, log, all_evaluated)
        # the target is up and tracepoint mode has no charge-core probe: not even pending
        active = {a["labels"]["alertname"] for a in api(base, "/api/v1/alerts")["alerts"]}
        assert "MemcgscopeProbeDetached" not in active
        # a recording rule over this host's series produces data
        wait_for("a recorded series", prom, log,
                 lambda: query(base, f'memcgscope:bpf_cpu_fraction:rate5m{{instance="{instance}"}}'))
