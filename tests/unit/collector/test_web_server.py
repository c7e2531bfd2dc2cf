"""The exporter's HTTP server on 127.0.0.1, port 0, spoken to with urllib."""

from __future__ import annotations

import base64
import gzip
import http.client
import socket
import ssl
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from memcgscope import __version__
from memcgscope.collector.web import auth as web_auth
from memcgscope.collector.web import ListenError, parse_web_config, serve

pytestmark = pytest.mark.unit


@pytest.fixture
def registry():
    r = CollectorRegistry()
    Gauge("memcgscope_test_value", "A value for the tests.", registry=r).set(42)
    return r


@pytest.fixture
def start(registry):
    servers = []

    def _start(listen="127.0.0.1:0", reg=None, **kwargs):
        s = serve(listen, reg if reg is not None else registry, **kwargs)
        servers.append(s)
        return s

    yield _start
    for s in servers:
        s.shutdown()


def get(url, method="GET", headers=None, context=None, data=None):
    """(status, headers, body) for any status, errors included."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_metrics_in_text_format_with_the_scrape_duration(start):
    s = start()
    assert s.url == f"http://127.0.0.1:{s.port}" and s.port > 0
    status, headers, body = get(s.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "memcgscope_test_value 42.0" in text
    # no sample before a render has been timed
    assert "# TYPE memcgscope_scrape_duration_seconds gauge" in text
    assert "\nmemcgscope_scrape_duration_seconds " not in text
    _, _, body = get(s.url + "/metrics")
    line = next(ln for ln in body.decode().splitlines() if ln.startswith("memcgscope_scrape_duration_seconds "))
    assert 0 < float(line.split()[1]) < 5


def test_openmetrics_when_asked_and_gzip_when_accepted(start):
    s = start()
    status, headers, body = get(s.url + "/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    status, headers, body = get(s.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert "memcgscope_test_value 42.0" in gzip.decompress(body).decode()


def test_head_has_the_headers_and_no_body(start):
    s = start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("HEAD", "/metrics")
    r = conn.getresponse()
    assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    conn.close()


def test_landing_page(start):
    s = start(facts={"mode": "tracepoint", "probes": ["charge", "reclaim"], "profile": "<6.18>"})
    status, headers, body = get(s.url + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<title>memcgscope</title>" in page and f"Version {__version__}" in page
    assert "<tr><th>mode</th><td>tracepoint</td></tr>" in page
    assert "<tr><th>probes</th><td>charge, reclaim</td></tr>" in page
    assert "<td>&lt;6.18&gt;</td>" in page  # facts are escaped
    assert '<a href="/metrics">' in page and '<a href="/-/healthy">' in page


def test_health(start):
    state = {"reason": None}
    s = start(health=lambda: state["reason"])
    assert get(s.url + "/-/healthy")[::2] == (200, b"OK\n")
    state["reason"] = "ring buffer lost 12 events"
    assert get(s.url + "/-/healthy")[::2] == (503, b"Unhealthy: ring buffer lost 12 events\n")

    def broken():
        raise RuntimeError("probe table gone")
    s2 = start(health=broken)
    assert get(s2.url + "/-/healthy")[::2] == (503, b"Unhealthy: health check raised RuntimeError: probe table gone\n")
    s3 = start()  # no health callable: healthy while serving
    assert get(s3.url + "/-/healthy")[0] == 200


@pytest.mark.parametrize("path", ["/metricsx", "/metrics/", "/-/ready", "/favicon.ico", "/../etc/passwd", "/-/", "/-/healthy/x"])
def test_other_paths_are_404(start, path):
    s = start()
    assert get(s.url + path)[::2] == (404, b"Not Found\n")


def test_query_strings_do_not_change_the_route(start):
    s = start()
    assert get(s.url + "/metrics?x=1")[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_other_methods_are_405(start, method):
    s = start()
    status, headers, _ = get(s.url + "/metrics", method=method, data=b"x" if method in ("POST", "PUT") else None)
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_a_broken_collector_gives_500_and_the_server_survives(start):
    class Broken:
        def collect(self):
            raise RuntimeError("map read failed")
    reg = CollectorRegistry()
    reg.register(Broken())
    s = start(reg=reg)
    status, _, body = get(s.url + "/metrics")
    assert status == 500 and b"map read failed" in body
    assert get(s.url + "/")[0] == 200


def test_shutdown_is_quick_frees_the_port_and_cuts_kept_alive_connections(start, registry):
    s = start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    conn.request("GET", "/metrics")
    assert conn.getresponse().read()
    t = time.monotonic()
    s.shutdown()
    assert time.monotonic() - t < 1.0
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse()
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.port), timeout=2)
    # the self-metric was unregistered, so the registry can be served again
    s2 = start(f"127.0.0.1:{s.port}")
    assert get(s2.url + "/metrics")[0] == 200


def test_all_interfaces_and_ipv6(start):
    s = start(":0")
    assert get(f"http://127.0.0.1:{s.port}/-/healthy")[0] == 200
    assert get(f"http://[::1]:{s.port}/-/healthy")[0] == 200
    s6 = start("[::1]:0")
    assert s6.url == f"http://[::1]:{s6.port}"
    assert get(s6.url + "/-/healthy")[0] == 200


def test_a_busy_port_is_a_one_line_error(start):
    s = start()
    with pytest.raises(ListenError) as e:
        serve(f"127.0.0.1:{s.port}", CollectorRegistry())
    assert str(e.value) == (f"--listen '127.0.0.1:{s.port}': cannot listen (Address already in use); "
                            "pick a free port or an address of this host")


def test_configured_headers_on_every_response(start):
    config = parse_web_config("http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
                              "    X-Content-Type-Options: nosniff\n")
    s = start(web_config=config)
    for path, status in (("/metrics", 200), ("/nope", 404)):
        got, headers, _ = get(s.url + path)
        assert got == status and headers["X-Frame-Options"] == "deny"
        assert headers["X-Content-Type-Options"] == "nosniff"


# --- basic auth -------------------------------------------------------------

def test_basic_auth(start, user_hash, monkeypatch):
    user, password, hashed = user_hash
    s = start(web_config=parse_web_config(f"basic_auth_users:\n  {user}: '{hashed}'\n"))
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(web_auth.bcrypt, "checkpw", lambda pw, h: calls.append(h) or real(pw, h))

    for headers in ({}, basic(user, "wrong"), basic("nobody", password), {"Authorization": "Basic !!notbase64"},
                    {"Authorization": "Bearer abc"}, {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}):
        status, got, body = get(s.url + "/metrics", headers=headers)
        assert (status, got["WWW-Authenticate"], body) == (401, "Basic", b"Unauthorized\n"), headers
    # auth guards every path and comes before method checks, as in the toolkit
    assert get(s.url + "/", headers={})[0] == 401
    assert get(s.url + "/metrics", method="DELETE")[0] == 401
    # a wrong password costs one bcrypt; an unknown user one too (against a
    # decoy), so timing does not reveal user names; malformed headers none
    assert len(calls) == 2 and calls[0] == hashed.encode() and calls[1] != hashed.encode()

    calls.clear()
    for _ in range(3):
        status, _, body = get(s.url + "/metrics", headers=basic(user, password))
        assert status == 200 and b"memcgscope_test_value 42.0" in body
    assert len(calls) == 1  # the success is cached: later scrapes skip bcrypt
    assert get(s.url + "/metrics", headers=basic(user, password + "x"))[0] == 401
    assert len(calls) == 2  # failures are never cached
    assert get(s.url + "/metrics", method="POST", headers=basic(user, password), data=b"")[0] == 405


# --- TLS ----------------------------------------------------------------------

def tls_config(certs, extra=""):
    return parse_web_config(f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
                            f"  key_file: {certs.server_key}\n{extra}")


def client_context(certs, cert=False, max_version=None):
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def test_tls(start, certs):
    s = start(web_config=tls_config(certs))
    assert s.url == f"https://127.0.0.1:{s.port}"
    status, _, body = get(s.url + "/metrics", context=client_context(certs))
    assert status == 200 and b"memcgscope_test_value 42.0" in body
    # plain HTTP to the TLS port does not get metrics
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        get(f"http://127.0.0.1:{s.port}/metrics")
    # a failed handshake does not take the server down
    assert get(s.url + "/-/healthy", context=client_context(certs))[0] == 200


def test_tls_min_version(start, certs):
    s = start(web_config=tls_config(certs, "  min_version: TLS13\n"))
    assert get(s.url + "/-/healthy", context=client_context(certs))[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError)):
        get(s.url + "/-/healthy", context=client_context(certs, max_version=ssl.TLSVersion.TLSv1_2))


def test_tls_client_certificates(start, certs):
    required = start(web_config=tls_config(
        certs, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {certs.ca}\n"))
    assert get(required.url + "/-/healthy", context=client_context(certs, cert=True))[0] == 200
    # TLS 1.3 reports a missing client certificate after the handshake, on the first read
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, http.client.HTTPException)):
        get(required.url + "/-/healthy", context=client_context(certs))

    optional = start(web_config=tls_config(
        certs, f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {certs.ca}\n"))
    assert get(optional.url + "/-/healthy", context=client_context(certs))[0] == 200
    assert get(optional.url + "/-/healthy", context=client_context(certs, cert=True))[0] == 200


def test_tls_with_basic_auth_from_a_file(start, certs, user_hash, tmp_path):
    user, password, hashed = user_hash
    path = tmp_path / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: {certs.server_cert}\n  key_file: {certs.server_key}\n"
                    f"basic_auth_users:\n  {user}: '{hashed}'\n")
    s = start(web_config=str(path))
    ctx = client_context(certs)
    assert get(s.url + "/metrics", context=ctx)[0] == 401
    assert get(s.url + "/metrics", context=ctx, headers=basic(user, password))[0] == 200


def test_two_servers_share_one_registry_and_its_self_metric(start, registry):
    a, b = start(), start()
    for s in (a, b):
        body = get(s.url + "/metrics")[2].decode()
        assert body.count("# TYPE memcgscope_scrape_duration_seconds gauge") == 1
    a.shutdown()
    assert "memcgscope_scrape_duration_seconds" in get(b.url + "/metrics")[2].decode()
    b.shutdown()
    assert [m.name for m in registry.collect()] == ["memcgscope_test_value"]


def test_an_unread_request_body_closes_the_connection(start):
    # Were the connection kept, the body "GET /x ..." would be answered as a
    # second request.
    s = start()
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
        smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        c.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 405 ") and b"Connection: close" in data
    assert data.count(b"HTTP/1.1 ") == 1


def test_basic_auth_scheme_is_case_insensitive(start, user_hash):
    user, password, hashed = user_hash
    s = start(web_config=parse_web_config(f"basic_auth_users:\n  {user}: '{hashed}'\n"))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert get(s.url + "/metrics", headers={"Authorization": "basic " + token})[0] == 200
