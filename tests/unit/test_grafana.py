"""grafana/ as files: the dashboard is well-formed and generated from
generate.py; every metric any dashboard or rule expression uses is one the
collector exports (collector/metrics.py); the rules pass promtool's checks
and unit tests; the scrape job is a valid Prometheus configuration."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "memcgscope.json"
RULES = GRAFANA / "prometheus" / "rules.yml"
RULES_TEST = GRAFANA / "prometheus" / "rules_test.yml"
SCRAPE = GRAFANA / "prometheus" / "scrape.yml"
PROMTOOL = "/usr/bin/promtool"
DS_UID = "${DS_PROMETHEUS}"

ALERTS = {"MemcgscopeModelDivergence", "MemcgscopeEventsLost", "MemcgscopeMapFull", "MemcgscopeProbeDetached",
          "MemcgscopeThrottledAtMemoryHigh",
          "MemcgscopeChargeFailures", "MemcgscopeOOMKills", "MemcgscopeReclaimStall"}
# series Prometheus itself adds to every scrape
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
             "scrape_series_added"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "Inf", "inf", "NaN", "nan"}


# --- helpers -----------------------------------------------------------------------


def exported_names() -> set[str]:
    """Sample names collector/metrics.py exports, from its *MetricFamily("name", ...) calls."""
    text = (ROOT / "collector" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)MetricFamily\(\s*"([a-z_:][a-z0-9_:]*)"', text):
        if kind == "Counter":
            names.add(name if name.endswith("_total") else name + "_total")
        elif kind == "Histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed)."""
    names = set()
    for alternatives in re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr):
        names |= set(alternatives.split("|"))
    e = re.sub(r"\$\{?\w+\}?", "", expr)                   # $cgroup, ${DS_PROMETHEUS}, $__rate_interval
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)               # label values
    e = re.sub(r"\{[^}]*\}", "", e)                         # matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1) not in KEYWORDS:   # a name not followed by "(" is not a function
            names.add(m.group(1))
    return names


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))    # collapsed rows keep their panels inside
    return out


def data_panels(d: dict) -> list[dict]:
    return [p for p in all_panels(d) if p["type"] != "row"]


def dashboard_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in data_panels(d) for t in p["targets"]]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            assert m, f"variable {v['name']}: {q}"
            exprs.append(m.group(1))
    return exprs


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert os.access(PROMTOOL, os.X_OK), f"{PROMTOOL} missing: apt-get install prometheus (scripts/setup-tests.sh)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- the helpers themselves ----------------------------------------------------------


def test_metric_name_parser():
    assert metric_names('sum by (cgroup, le) (rate(a_total{job=~"$job",x="y(z)"}[$__rate_interval]))') == {"a_total"}
    assert metric_names("x / on (job) (y < +Inf) or vector(0) unless z offset 10m") == {"x", "y", "z"}
    assert metric_names('{__name__=~"p|q",job="j"}') == {"p", "q"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 1e-9") == {"h_bucket"}


def test_exported_names_are_found():
    names = exported_names()
    assert len(names) >= 30
    assert {"memcgscope_charges_total", "memcgscope_build_info", "memcgscope_charge_latency_seconds_bucket",
            "memcgscope_cgroup_usage_bytes", "memcgscope_probe_attached"} <= names


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_is_generated_from_generate_py():
    spec = importlib.util.spec_from_file_location("generate", GRAFANA / "dashboards" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert DASHBOARD.read_text() == gen.render(), "run: python3 grafana/dashboards/generate.py"


def test_dashboard_header_and_variables():
    d = load_dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "cgroup"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == DS_UID
        # "All" must become a regex: panels match with =~
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"
    assert "memcgscope_charges_total" in json.dumps(variables["cgroup"]["query"])


def test_panels_ids_and_grid():
    d = load_dashboard()
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and all(isinstance(v, int) for v in g.values()), p["title"]
        assert 1 <= g["w"] <= 24 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["y"] >= 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    assert len(data_panels(d)) >= 30
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview", "Charges", "Reclaim", "Limits & OOM", "Model cross-check", "cgroupfs",
                    "Pressure and contents", "Exporter health"]


def test_every_target_has_an_expr_and_uses_the_datasource_variable():
    for p in data_panels(load_dashboard()):
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]


def test_panels_have_units_and_descriptions():
    for p in data_panels(load_dashboard()):
        assert p.get("description"), p["title"]
        if p["type"] in ("timeseries", "stat"):
            assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        if p["type"] == "heatmap":
            assert p["options"]["yAxis"]["unit"] == "s" and p["targets"][0]["format"] == "heatmap", p["title"]
            assert "_bucket" in p["targets"][0]["expr"]


def test_selectors_use_the_variables():
    # every selector of a memcgscope series filters by job and instance
    # (and cgroup where it has one); the "All" value is a regex, so =~
    for p in data_panels(load_dashboard()):
        for t in p["targets"]:
            for sel in re.findall(r"\b(memcgscope_\w+|scrape_duration_seconds)(\{[^}]*\})?", t["expr"]):
                assert sel[1], f"{p['title']}: {sel[0]} has no selector"
                assert 'job=~"$job"' in sel[1] and 'instance=~"$instance"' in sel[1], p["title"]


# --- metric names ---------------------------------------------------------------------


def test_dashboard_metrics_exist():
    exported = exported_names()
    used = set()
    for expr in dashboard_exprs(load_dashboard()):
        names = metric_names(expr)
        assert names, expr
        unknown = names - exported - SYNTHETIC
        assert not unknown, f"{unknown} in {expr}"
        used |= names
    # the dashboard covers what the collector exports (not the _sum/_count of histograms)
    missing = {n for n in exported if not n.endswith(("_sum", "_count"))} - used
    assert missing <= {"memcgscope_memcg_state_updates_total"}, missing


def test_rule_metrics_exist():
    exported = exported_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    for r in rules():
        names = metric_names(r["expr"])
        assert names, r
        assert not names - exported - SYNTHETIC - recorded, (names - exported - SYNTHETIC - recorded, r["expr"])


def test_rate_and_increase_only_over_counters():
    exprs = dashboard_exprs(load_dashboard()) + [r["expr"] for r in rules()]
    seen = 0
    for expr in exprs:
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
            seen += 1
            assert name.endswith(("_total", "_bucket")), f"rate/increase over non-counter {name}: {expr}"
        # and a histogram_quantile always over _bucket with le kept
        for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
            assert "_bucket" in inner and re.search(r"by \([^)]*\ble\b", inner), expr
    assert seen >= 30


# --- rules ---------------------------------------------------------------------------


def test_alerts_are_the_documented_set_with_annotations():
    alerts = [r for r in rules() if "alert" in r]
    assert {r["alert"] for r in alerts} == ALERTS
    for r in alerts:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_every_alert_is_tested_firing_and_silent():
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in mine), f"{alert} is never expected to fire"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert} is never expected to stay silent"


def test_promtool_check_rules():
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_promtool_test_rules():
    r = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_check_config_with_scrape_job_and_rules(tmp_path):
    scrape = yaml.safe_load(SCRAPE.read_text())
    jobs = scrape["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["memcgscope"]   # rules.yml's up{job="memcgscope"}
    assert jobs[0]["static_configs"][0]["targets"] == ["127.0.0.1:10064"]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}, "rule_files": [str(RULES)],
                                      "scrape_configs": jobs}))
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout   # the rule file was read and checked too
    # the file as shipped is itself a valid configuration
    r = promtool("check", "config", str(SCRAPE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_commented_tls_variant_is_valid(tmp_path):
    # the commented https job, uncommented, must be valid too
    lines = SCRAPE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# - job_name: memcgscope")
    block = [re.sub(r"^  # ?", "  ", line) for line in lines[start:] if line.startswith("  #")]
    job = yaml.safe_load("\n".join(block))
    assert job[0]["scheme"] == "https" and "basic_auth" in job[0]
    for f in ("memcgscope-ca.pem", "memcgscope.password"):
        (tmp_path / f).write_text("x\n")
    job[0]["tls_config"]["ca_file"] = str(tmp_path / "memcgscope-ca.pem")
    job[0]["basic_auth"]["password_file"] = str(tmp_path / "memcgscope.password")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": job}))
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr


# --- provisioning and README -------------------------------------------------------------


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "memcgscope.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus" and ds["datasources"][0]["url"]
    dash = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "memcgscope.yml").read_text())
    (provider,) = dash["providers"]
    assert dash["apiVersion"] == 1 and provider["type"] == "file" and provider["options"]["path"]


def test_readme_lists_every_panel_and_alert():
    readme = (GRAFANA / "README.md").read_text()
    for p in data_panels(load_dashboard()):
        assert f"**{p['title']}**" in readme, p["title"]
    for alert in ALERTS:
        assert alert in readme
