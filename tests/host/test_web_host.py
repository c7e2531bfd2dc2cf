"""The exporter scraped by a real Prometheus (Debian's 2.42 at /usr/bin) over
TLS with basic auth, configured by an exporter-toolkit web config file.

Prometheus runs as our own child on 127.0.0.1 with a temporary TSDB; the
fixture stops it by its PID and removes the directory on every exit path.
The system prometheus service is never touched.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from memcgscope.collector.web import serve

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
USER, PASSWORD = "prometheus", "host-test-pw"
VALUE = 1234.5
DEADLINE = 60  # seconds for Prometheus to start and scrape both jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, headers=None, context=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def auth(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="memcgscope-web-host-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert not d.exists()


@pytest.fixture
def exporter(workdir):
    """Our server over TLS + basic auth; yields (server, cert path)."""
    cert, key = workdir / "server.pem", workdir / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=memcgscope-host-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode()
    web_yml = workdir / "web.yml"
    web_yml.write_text(f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
                       f"  min_version: TLS12\n"
                       f"http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
                       f"basic_auth_users:\n  {USER}: '{hashed}'\n")
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
    port = free_port()
    target = f"127.0.0.1:{server.port}"
    jobs = []
    for job, password in (("memcgscope", PASSWORD), ("memcgscope-badauth", "wrong-password")):
        jobs.append({"job_name": job, "scheme": "https", "scrape_interval": "1s", "scrape_timeout": "1s",
                     "tls_config": {"ca_file": str(cert)},
                     "basic_auth": {"username": USER, "password": password},
                     "static_configs": [{"targets": [target]}]})
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                  "scrape_configs": jobs}))  # JSON is YAML
    check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", proc, workdir / "prometheus.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, proc, logfile: Path, check):
    """Poll `check` until it returns something truthy, within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode} while waiting for {what}: "
                        f"{logfile.read_text()[-2000:]}")
        try:
            got = check()
        except (urllib.error.URLError, ConnectionError) as e:
            got, last = None, e
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"gave up after {DEADLINE}s waiting for {what} (last: {last}); "
                f"prometheus log: {logfile.read_text()[-2000:]}")


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
