"""The HTTP server's bounds: listen backlog, time to send a request head,
idle keep-alive, the connection bound and what happens over it, slow
clients that must not hold up scrapes, responses larger than the socket
buffer. 127.0.0.1, port 0, raw sockets."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily

from memcgscope.collector.web import Limits, parse_web_config, serve

pytestmark = pytest.mark.unit

GET = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
HALF = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture
def registry():
    r = CollectorRegistry()
    Gauge("memcgscope_test_value", "A value for the tests.", registry=r).set(42)
    return r


@pytest.fixture
def start(registry):
    servers = []

    def _start(reg=None, **kwargs):
        s = serve("127.0.0.1:0", reg if reg is not None else registry, **kwargs)
        servers.append(s)
        return s

    yield _start
    for s in servers:
        s.shutdown()


@pytest.fixture
def clients():
    """Raw client sockets, all closed at the end."""
    socks = []

    def _open(port, send=b"", rcvbuf=None):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        if send:
            s.sendall(send)
        socks.append(s)
        return s

    yield _open
    for s in socks:
        s.close()


def read_until_closed(sock, within: float) -> tuple[bytes, float]:
    """(everything the server sent, seconds until it closed); fails the
    test if it is still open after `within`."""
    started = time.monotonic()
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server still holds the connection after {within} s (it sent {data[:80]!r})")
    return data, time.monotonic() - started


def is_closed(sock) -> bool:
    """Has the server closed it (EOF or reset), without waiting?"""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(5)


def scrape(port) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wait_for(what: str, cond, within: float = 3.0):
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.02)


# --- backlog ------------------------------------------------------------------------

def test_the_listen_backlog_is_large(start):
    if shutil.which("ss") is None:
        pytest.fail("ss not found; install iproute2 (it reads listen backlogs from the kernel)")
    s = start()
    out = subprocess.run(["ss", "-Hltn", f"sport = :{s.port}"], capture_output=True, text=True, timeout=10,
                         check=True).stdout.split()
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    # a listening socket's Send-Q is its backlog (the kernel caps it at somaxconn)
    assert out[0] == "LISTEN" and int(out[2]) == min(Limits().backlog, somaxconn) >= 128, out


# --- time to send a request -------------------------------------------------------------

def test_half_a_request_is_cut_after_request_timeout_even_when_trickled(start, clients):
    s = start(limits=Limits(request_timeout=0.3))
    c = clients(s.port, HALF)
    started = time.monotonic()
    # a slow loris: a header byte every 0.1 s keeps the connection busy
    # but must not extend the deadline
    with pytest.raises(OSError):
        while time.monotonic() - started < 5:
            c.send(b"X")
            time.sleep(0.1)
    data, _ = read_until_closed(c, 5)
    took = time.monotonic() - started
    assert 0.25 < took < 3, took
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close\r\n" in data, data


def test_a_connection_that_sends_nothing_is_cut_silently(start, clients):
    s = start(limits=Limits(request_timeout=0.3))
    data, took = read_until_closed(clients(s.port), 5)
    assert data == b"" and 0.25 < took < 3


def test_idle_keep_alive_has_its_own_timeout_and_the_next_request_its_own(start, clients):
    s = start(limits=Limits(request_timeout=0.2, idle_timeout=1.5))
    idle = clients(s.port, GET)  # served once, then left idle: closed without a word after idle_timeout
    with idle.makefile("rb") as f:
        assert read_response(f)[0] == 200
    idle_since = time.monotonic()
    c = clients(s.port, GET)
    f = c.makefile("rb")
    assert read_response(f)[0] == 200
    time.sleep(0.3)  # idle longer than request_timeout: still kept alive
    c.sendall(GET)
    assert read_response(f)[0] == 200
    f.close()
    # half of a next request, 0.3 s into the idle time: its own clock starts
    # at its first byte and cuts it long before idle_timeout would (1.2 s on)
    time.sleep(0.3)
    c.sendall(HALF)
    data, took = read_until_closed(c, 3)
    assert data.startswith(b"HTTP/1.1 408 ") and 0.15 < took < 0.9, (data, took)
    data, _ = read_until_closed(idle, 5)
    assert data == b"" and 1.4 < time.monotonic() - idle_since < 4


def test_a_stalled_tls_handshake_is_cut(start, clients, certs):
    config = parse_web_config(f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
                              f"  key_file: {certs.server_key}\n")
    s = start(web_config=config, limits=Limits(request_timeout=0.3))
    silent = clients(s.port)
    half_hello = clients(s.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    for c in (silent, half_hello):
        _, took = read_until_closed(c, 5)
        assert took < 3
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", s.port, timeout=5, context=ctx)
    conn.request("GET", "/-/healthy")
    assert conn.getresponse().status == 200
    conn.close()


def test_an_oversized_head_gets_431(start, clients):
    s = start()
    c = clients(s.port)
    try:
        c.sendall(HALF + b"X-Big: " + b"a" * 80000 + b"\r\n\r\n")
    except OSError:
        pass  # the server may close before we are done sending
    data, _ = read_until_closed(c, 5)
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), data[:100]


# --- the connection bound -----------------------------------------------------------------

def test_over_the_bound_the_longest_waiting_newcomers_are_closed(start, clients):
    s = start(limits=Limits(max_connections=8, request_timeout=30))
    silent = []
    for _ in range(30):
        silent.append(clients(s.port, HALF))
    wait_for("22 of 30 silent connections closed", lambda: sum(is_closed(c) for c in silent[:22]) == 22)
    assert not any(is_closed(c) for c in silent[22:])  # the oldest went first
    assert scrape(s.port) == 200  # a scrape gets in, in place of the oldest one left
    wait_for("the 23rd closed", lambda: is_closed(silent[22]))
    assert not any(is_closed(c) for c in silent[23:])


def test_a_kept_alive_connection_goes_after_the_newcomers(start, clients):
    s = start(limits=Limits(max_connections=4, request_timeout=30))
    kept = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    kept.request("GET", "/metrics")
    assert kept.getresponse().read()
    silent = [clients(s.port) for _ in range(3)]  # 4 open now
    time.sleep(0.2)
    newcomer = clients(s.port)  # over the bound: the oldest silent one goes, not `kept`
    wait_for("the oldest silent connection closed", lambda: is_closed(silent[0]))
    assert not is_closed(newcomer)
    kept.request("GET", "/metrics")
    assert kept.getresponse().status == 200
    kept.close()


def test_over_the_bound_with_every_connection_being_answered_is_a_503(start, clients):
    release = threading.Event()

    class Slow:
        def collect(self):
            release.wait(10)
            yield GaugeMetricFamily("memcgscope_slow", "A slow collector.", value=1)

    reg = CollectorRegistry()
    reg.register(Slow())
    s = start(reg=reg, limits=Limits(max_connections=2, workers=2))
    busy = [clients(s.port, GET) for _ in range(2)]
    time.sleep(0.3)  # both renders are running
    data, _ = read_until_closed(clients(s.port), 5)
    assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Retry-After: 1\r\n" in data
    release.set()
    for c in busy:
        with c.makefile("rb") as f:
            status, body = read_response(f)
        assert status == 200 and b"memcgscope_slow 1.0" in body


def test_scrapes_are_answered_while_slow_clients_outnumber_the_workers(start, clients, certs):
    s = start(limits=Limits(workers=2, request_timeout=30))
    slow = [clients(s.port, HALF) for _ in range(20)] + [clients(s.port) for _ in range(20)]
    started = time.monotonic()
    assert scrape(s.port) == 200
    assert time.monotonic() - started < 2
    assert not any(is_closed(c) for c in slow)

    config = parse_web_config(f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
                              f"  key_file: {certs.server_key}\n")
    tls = start(web_config=config, limits=Limits(workers=2, request_timeout=30))
    stalled = [clients(tls.port) for _ in range(10)] + [clients(tls.port, b"\x16\x03\x01") for _ in range(10)]
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", tls.port, timeout=5, context=ctx)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 200
    conn.close()
    assert not any(is_closed(c) for c in stalled)


# --- responses and requests the socket cannot take in one go --------------------------------

def big_registry(size: int):
    """A registry whose text is `size` bytes and more, cheap to render (one long HELP)."""
    class Big:
        def collect(self):
            yield GaugeMetricFamily("memcgscope_big", "a" * size, value=1)

    reg = CollectorRegistry()
    reg.register(Big())
    return reg


def read_response(f) -> tuple[int, bytes]:
    """(status, body) of one response from a buffered reader, leaving the next in it."""
    status = int(f.readline().split()[1])
    headers = http.client.parse_headers(f)
    return status, f.read(int(headers["Content-Length"]))


@pytest.mark.parametrize("tls", [False, True])
def test_a_response_larger_than_the_socket_buffer_arrives_whole_to_a_slow_reader(start, clients, certs, tls):
    config = parse_web_config(f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
                              f"  key_file: {certs.server_key}\n") if tls else None
    s = start(reg=big_registry(6_000_000), web_config=config)
    raw = clients(s.port, rcvbuf=4096)
    c = ssl.create_default_context(cafile=str(certs.ca)).wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
    c.sendall(GET + GET)  # pipelined: the second answer waits for the first to be sent
    time.sleep(0.3)  # the server fills the socket (about 3 MB here) and must wait for us
    f = c.makefile("rb")
    for _ in range(2):
        status, body = read_response(f)
        assert status == 200 and len(body) > 6_000_000 and b"\nmemcgscope_big 1.0\n" in body[-300:]
    f.close()


def test_a_client_that_never_reads_its_response_is_cut_after_write_timeout(start, clients):
    s = start(reg=big_registry(8_000_000), limits=Limits(write_timeout=0.2))
    c = clients(s.port, GET, rcvbuf=4096)
    time.sleep(0.7)  # the server fills the socket, waits 0.2 s for us to read, gives up
    data, _ = read_until_closed(c, 5)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert 0 < len(body) < length  # cut before the whole answer went out


def test_limits_are_checked():
    with pytest.raises(ValueError, match=r"^Limits.workers: 0; give a whole number ≥ 1$"):
        Limits(workers=0)
    with pytest.raises(ValueError, match=r"^Limits.request_timeout: -1; give a number of seconds > 0$"):
        Limits(request_timeout=-1)


# --- shutdown -------------------------------------------------------------------------------

def test_shutdown_cuts_connections_in_every_state_and_leaves_nothing_behind(start, clients, certs):
    release = threading.Event()

    class Slow:
        def collect(self):
            release.wait(10)
            yield GaugeMetricFamily("memcgscope_slow", "A slow collector.", value=1)

    reg = CollectorRegistry()
    reg.register(Slow())
    fds_before = len(os.listdir("/proc/self/fd"))
    s = serve("127.0.0.1:0", reg)
    tls = serve("127.0.0.1:0", reg, web_config=parse_web_config(
        f"tls_server_config:\n  cert_file: {certs.server_cert}\n  key_file: {certs.server_key}\n"))
    rendering = clients(s.port, GET)  # a worker is answering it
    waiting = [clients(s.port), clients(s.port, HALF), clients(tls.port), clients(tls.port, b"\x16\x03\x01")]
    kept = http.client.HTTPSConnection("127.0.0.1", tls.port, timeout=5,
                                       context=ssl.create_default_context(cafile=str(certs.ca)))
    kept.request("GET", "/-/healthy")
    assert kept.getresponse().read() == b"OK\n"
    time.sleep(0.2)
    started = time.monotonic()
    s.shutdown()
    tls.shutdown()
    assert time.monotonic() - started < 1.5
    release.set()  # the render finishes after shutdown: its answer must not go out
    for c in [rendering, *waiting]:
        assert read_until_closed(c, 3)[0] == b""
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        kept.request("GET", "/-/healthy")
        kept.getresponse()
    kept.close()
    for c in [rendering, *waiting]:
        c.close()
    wait_for("the server's threads to end",
             lambda: not [t for t in threading.enumerate() if t.name.startswith("memcgscope-web-")])
    wait_for("the server's sockets to close", lambda: len(os.listdir("/proc/self/fd")) <= fds_before)


def test_out_of_file_descriptors_the_server_evicts_and_goes_on_answering(clients, tmp_path):
    # A child with 64 descriptors and a bound it cannot reach: accept() fails
    # with EMFILE long before max_connections.
    script = tmp_path / "child.py"
    script.write_text(
        "import logging, resource, sys\n"
        "from prometheus_client import CollectorRegistry\n"
        "from memcgscope.collector.web import Limits, serve\n"
        "logging.basicConfig(format='%(message)s')\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "s = serve('127.0.0.1:0', CollectorRegistry(), limits=Limits(max_connections=500, request_timeout=30))\n"
        "print(s.port, flush=True)\n"
        "sys.stdin.read()\n"
        "s.shutdown()\n")
    child = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        silent = [clients(port, HALF) for _ in range(100)]
        assert scrape(port) == 200
        assert sum(is_closed(c) for c in silent) >= 40  # the oldest made room
        cpu = _cpu_seconds(child.pid)
        time.sleep(0.5)
        assert _cpu_seconds(child.pid) - cpu < 0.2  # not spinning on a readable listener
    finally:
        child.stdin.close()
        child.wait(10)
    err = child.stderr.read()
    assert err.startswith("web: cannot accept connections (Too many open files); max_connections lowered to ")
    assert err.endswith("; raise the open-file limit (ulimit -n)\n") and err.count("\n") == 1, err


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
