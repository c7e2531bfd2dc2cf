"""Plumbing shared by the host tests that run a real Prometheus (Debian's
2.42 at /usr/bin) against our exporter: ports, HTTP, a TLS + basic-auth web
config, a Prometheus of our own on loopback, its HTTP API, and polling."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
USER, PASSWORD = "prometheus", "host-test-pw"
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



def write_tls_web_config(workdir: Path, user: str = USER, password: str = PASSWORD) -> tuple[Path, Path]:
    """A self-signed cert for 127.0.0.1 and an exporter-toolkit web config
    with TLS and one bcrypt-hashed user; returns (web.yml, cert)."""
    cert, key = workdir / "server.pem", workdir / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=memcgscope-host-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    web_yml = workdir / "web.yml"
    web_yml.write_text(f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
                       f"  min_version: TLS12\n"
                       f"http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
                       f"basic_auth_users:\n  {user}: '{hashed}'\n")
    return web_yml, cert


@contextlib.contextmanager
def run_prometheus(workdir: Path, jobs: list[dict], rule_files: list[str] | None = None):
    """Our own Prometheus on 127.0.0.1 with a temporary TSDB, scraping
    `jobs` (and evaluating `rule_files`); yields (base URL, process, log
    path); stopped by its PID."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                  "rule_files": rule_files or [], "scrape_configs": jobs}))  # JSON is YAML
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


def query(base: str, q: str):
    """An instant query's result list, or None when empty."""
    return api(base, "/api/v1/query", query=q)["result"] or None


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




MEMCGSCOPE = os.path.join(os.path.dirname(sys.executable), "memcgscope")


def bpf_prog_ids() -> set[int]:
    """Ids of the BPF programs loaded now (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


def new_programs_after_grace(before: set[int], grace: float = 5.0) -> set[int]:
    """Programs loaded since `before` that are still there after `grace`
    seconds: the kernel frees a detached program after an RCU grace period
    (raw tracepoints: tens of milliseconds), not at close()."""
    deadline = time.monotonic() + grace
    while True:
        left = bpf_prog_ids() - before
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@contextlib.contextmanager
def run_collector(workdir: Path, *args: str):
    """`memcgscope run` on a free loopback port with `args`; yields (process,
    port, stderr path) once it serves. On the way out: SIGTERM, and the
    checks every exit must pass: status 0 within 2 s and none of its BPF
    programs left loaded."""
    port = free_port()
    stderr_path = workdir / "run.stderr"
    before = bpf_prog_ids()
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([MEMCGSCOPE, "run", "--listen", f"127.0.0.1:{port}", "--interval", "1", *args],
                                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in stderr_path.read_text():
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "memcgscope run did not start serving in 60 s"
            time.sleep(0.2)
        yield proc, port, stderr_path
    finally:
        took = 0.0
        if proc.poll() is None:
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
                pytest.fail(f"memcgscope run ignored SIGTERM: {stderr_path.read_text()[-2000:]}")
            took = time.monotonic() - start
        assert proc.returncode == 0, stderr_path.read_text()[-2000:]
        assert took < 2.0, f"SIGTERM to exit took {took:.2f}s"
        assert new_programs_after_grace(before) == set()
