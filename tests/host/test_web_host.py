"""The exporter scraped by a real Prometheus (Debian's 2.42 at /usr/bin) over
TLS with basic auth, configured by an exporter-toolkit web config file.

Prometheus runs as our own child on 127.0.0.1 with a temporary TSDB; the
fixture stops it by its PID and removes the directory on every exit path.
The system prometheus service is never touched.
"""

from __future__ import annotations

import ssl
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Gauge

from memcgscope.collector.web import serve
from promkit import PASSWORD, PROMTOOL, USER, api, auth, http_get, run_prometheus, wait_for, write_tls_web_config

VALUE = 1234.5

@pytest.fixture
def exporter(workdir):
    """Our server over TLS + basic auth; yields (server, cert path)."""
    web_yml, cert = write_tls_web_config(workdir)
    # the toolkit's own validator accepts the file we parse
    check = subprocess.run([PROMTOOL, "check", "web-config", str(web_yml)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    registry = CollectorRegistry()
    Gauge("memcgscope_host_test_value", "A value set by the host test.", registry=registry).set(VALUE)
    server = serve("127.0.0.1:0", registry, web_config=str(web_yml), facts={"mode": "host test"})
    try:
        yield server, cert
    finally:
        server.shutdown()


@pytest.fixture
def prometheus(workdir, exporter):
    """A Prometheus of our own scraping the exporter with good and bad credentials."""
    server, cert = exporter
    target = f"127.0.0.1:{server.port}"
    jobs = []
    for job, password in (("memcgscope", PASSWORD), ("memcgscope-badauth", "wrong-password")):
        jobs.append({"job_name": job, "scheme": "https", "scrape_interval": "1s", "scrape_timeout": "1s",
                     "tls_config": {"ca_file": str(cert)},
                     "basic_auth": {"username": USER, "password": password},
                     "static_configs": [{"targets": [target]}]})
    with run_prometheus(workdir, jobs) as running:
        yield running


def test_prometheus_scrapes_over_tls_with_basic_auth(exporter, prometheus):
    server, cert = exporter
    base, proc, logfile = prometheus

    def targets():
        found = {t["labels"]["job"]: t for t in api(base, "/api/v1/targets")["activeTargets"]}
        good, bad = found.get("memcgscope"), found.get("memcgscope-badauth")
        if good and bad and good["health"] == "up" and bad["health"] == "down":
            return good, bad
        return None

    good, bad = wait_for("both targets to be scraped", proc, logfile, targets)
    assert good["scrapeUrl"] == f"https://127.0.0.1:{server.port}/metrics" and good["lastError"] == ""
    assert "401" in bad["lastError"], bad["lastError"]

    def query(q):
        result = api(base, "/api/v1/query", query=q)["result"]
        return result or None

    (sample,) = wait_for("the test gauge", proc, logfile, lambda: query('memcgscope_host_test_value{job="memcgscope"}'))
    assert float(sample["value"][1]) == VALUE
    (up,) = query('up{job="memcgscope-badauth"}')
    assert up["value"][1] == "0"
    # the self-metric has a sample from the second scrape on
    (took,) = wait_for("the scrape duration", proc, logfile,
                       lambda: query('memcgscope_scrape_duration_seconds{job="memcgscope"}'))
    assert 0 < float(took["value"][1]) < 1


def test_credentials_and_exposition_checked_without_prometheus(exporter):
    server, cert = exporter
    ctx = ssl.create_default_context(cafile=str(cert))
    assert http_get(server.url + "/metrics", context=ctx)[0] == 401
    assert http_get(server.url + "/metrics", auth(USER, "nope"), context=ctx)[0] == 401
    status, body = http_get(server.url + "/metrics", auth(USER, PASSWORD), context=ctx)
    assert status == 200 and f"memcgscope_host_test_value {VALUE}".encode() in body
    # promtool's linter accepts what we expose
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    status, page = http_get(server.url + "/", auth(USER, PASSWORD), context=ctx)
    assert status == 200 and b"<td>host test</td>" in page
