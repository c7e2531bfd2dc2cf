"""The exporter's HTTP server under load, on this machine (loopback only).

    python tests/bench/bench_web.py [--scrapers 32] [--idle 300] [--seconds 15]
                                    [--web LABEL=FILE ...]

A real `serve()` runs in a child process over a registry whose collector
costs what memcgscope's does with a few hundred cgroups (600 samples, about
3 ms to render plus 1 ms of I/O wait). This process then, for --seconds:

- runs --scrapers threads scraping /metrics over kept-alive connections
  with Prometheus' Accept and Accept-Encoding headers (10 s timeout each,
  as Prometheus' default scrape_timeout);
- after one second opens --idle connections that send half a request
  ("GET /metrics HTTP/1.1", one header, no blank line) and then nothing;
  each one the server cuts is replaced, so that many stay held;
- every 0.25 s opens a new connection and times connect + GET /-/healthy +
  full answer.

Then it stops replacing the idle connections, waits up to --cut-wait for
the server to cut or answer each, and checks the server still answers.

Prints scrapes, errors, p50/p99, the idle connections' connect time and the
new-connection time, and returns them from `run()`; asserts nothing
(tests/host/test_web_load_host.py asserts what must hold).

--web LABEL=FILE serves with another copy of the web module, e.g. the one
before a change: `git show REV:collector/web.py > /tmp/old_web.py`, then
`--web before=/tmp/old_web.py --web after=`. An empty FILE means the
installed memcgscope.collector.web. Several --web run one after the other and
print side by side.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import importlib.util
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
SCRAPE_TIMEOUT = 10.0


# --- the server side (child process) -------------------------------------------

def load_web(path: str):
    """The web module to serve with: a file (an older copy) or the installed one."""
    if not path:
        from memcgscope.collector import web
        return web
    spec = importlib.util.spec_from_file_location("memcgscope_web_under_test", path)
    if spec is None:
        raise SystemExit(f"bench_web: --web {path}: not a Python file; give a copy of collector/web.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def busy_registry():
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import CounterMetricFamily

    class Busy:
        """20 families x 30 series, and 1 ms asleep as reading BPF maps would be."""

        def collect(self):
            time.sleep(0.001)
            for f in range(20):
                c = CounterMetricFamily(f"memcgscope_load_{f}", "Load test counter.", labels=["cgroup", "kind"])
                for i in range(30):
                    c.add_metric([f"/load.slice/unit-{i}.service", "charge"], i * 1.5)
                yield c

    registry = CollectorRegistry()
    registry.register(Busy())
    return registry


def serve_child(web_path: str, request_timeout: float | None) -> int:
    """Serve on 127.0.0.1, print the port, stop when stdin closes."""
    web = load_web(web_path)
    kwargs = {}
    if request_timeout is not None:
        if not hasattr(web, "Limits"):
            raise SystemExit(f"bench_web: --request-timeout: {web_path or 'the installed web module'} has no Limits; "
                             "leave it out for this copy")
        kwargs["limits"] = web.Limits(request_timeout=request_timeout)
    server = web.serve("127.0.0.1:0", busy_registry(), **kwargs)
    print(server.port, flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us, and so does its death
    server.shutdown()
    return 0


# --- the load side -----------------------------------------------------------------

class Scrapers:
    def __init__(self, port: int, n: int):
        self.port = port
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def start(self):
        for t in self._threads:
            t.start()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(SCRAPE_TIMEOUT + 5)

    def _error(self, kind: str):
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def _run(self):
        conn = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=SCRAPE_TIMEOUT)
            started = time.perf_counter()
            try:
                conn.request("GET", "/metrics", headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
                r = conn.getresponse()
                body = r.read()
                took = time.perf_counter() - started
                if r.status != 200:
                    self._error(f"HTTP {r.status}")
                elif not gzip.decompress(body).endswith(b"# EOF\n"):
                    self._error("truncated body")
                else:
                    with self._lock:
                        self.latencies.append(took)
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException, EOFError) as e:
                self._error("timeout" if isinstance(e, TimeoutError) else type(e).__name__)
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


class IdleHolder:
    """Holds `n` connections that sent half a request, from one thread."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.refill = True
        self.opened = 0
        self.all_connected_after: float | None = None  # s from start until n were connected at once
        self.cut_after: list[float] = []  # s each lived before the server cut it
        self.answered = 0  # of those, how many got a response (e.g. 408) rather than a bare close
        self.connect_errors: dict[str, int] = {}
        self._socks: dict[socket.socket, list] = {}  # sock -> [connected at or None, opened at]
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def held(self) -> int:
        return sum(1 for v in list(self._socks.values()) if v[0] is not None)

    @property
    def left(self) -> int:
        return len(self._socks)

    def start(self):
        self._started = time.monotonic()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        for s in list(self._socks):
            s.close()

    def _open(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self._socks[s] = [None, time.monotonic()]
        self._sel.register(s, selectors.EVENT_WRITE)
        self.opened += 1

    def _drop(self, s):
        self._sel.unregister(s)
        s.close()
        del self._socks[s]
        if self.refill:
            self._open()

    def _run(self):
        for _ in range(self.n):
            self._open()
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                s = key.fileobj
                connected, opened = self._socks[s]
                if connected is None:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        name = os.strerror(err)
                        self.connect_errors[name] = self.connect_errors.get(name, 0) + 1
                        self._drop(s)
                        continue
                    s.send(HALF_REQUEST)
                    self._socks[s][0] = time.monotonic()
                    self._sel.modify(s, selectors.EVENT_READ)
                    if self.all_connected_after is None and self.held >= self.n:
                        self.all_connected_after = time.monotonic() - self._started
                    continue
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                self.cut_after.append(time.monotonic() - connected)
                self.answered += data.startswith(b"HTTP/")
                self._drop(s)


def probe(port: int) -> float | None:
    """Seconds to connect, ask /-/healthy and read the whole answer; None on failure."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=SCRAPE_TIMEOUT) as s:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    return time.perf_counter() - started if data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"OK\n") else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(scrapers: int = 32, idle: int = 300, seconds: float = 15.0, web: str = "", cut_wait: float = 45.0,
        request_timeout: float | None = None, out=print) -> dict:
    """One load run against a server child; returns the figures (see the module doc)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--web", f"x={web}"]
    if request_timeout is not None:
        cmd += ["--request-timeout", str(request_timeout)]
    log = tempfile.TemporaryFile("w+")  # the server's stderr: tracebacks, warnings
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(child.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            raise RuntimeError("bench_web: the server child printed no port within 30 s")
        line = child.stdout.readline()
        if not line.strip().isdigit():
            child.wait(10)
            log.seek(0)
            raise RuntimeError(f"bench_web: the server child ({' '.join(cmd)}) failed to start: {log.read().strip()}")
        port = int(line)
        figures = _load(port, scrapers, idle, seconds, cut_wait, out) | {"exit_code": _stop_child(child)}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
        if stderr:
            out(f"bench_web: the server wrote to stderr:\n{stderr.rstrip()}")
    return figures | {"server_stderr": stderr}


def _stop_child(child: subprocess.Popen) -> int | None:
    child.stdin.close()
    try:
        return child.wait(10)
    except subprocess.TimeoutExpired:
        return None


def _load(port, scrapers, idle, seconds, cut_wait, out) -> dict:
    load = Scrapers(port, scrapers)
    holder = IdleHolder(port, idle)
    probes: list[float | None] = []
    started = time.monotonic()
    load.start()
    time.sleep(min(1.0, seconds / 4))
    holder.start()
    while time.monotonic() - started < seconds:
        t = time.monotonic()
        probes.append(probe(port))
        time.sleep(max(0.0, 0.25 - (time.monotonic() - t)))
    load.stop()
    # the idle connections: no more replacements; each must be cut or answered
    holder.refill = False
    cut_started = time.monotonic()
    while holder.left and time.monotonic() - cut_started < cut_wait:
        time.sleep(0.1)
    idle_left = holder.left
    holder.stop()
    after = probe(port)
    lat = load.latencies
    ok_probes = [p for p in probes if p is not None]
    figures = {
        "scrapes": len(lat),
        "errors": sum(load.errors.values()),
        "error_kinds": dict(load.errors),
        "p50_ms": _ms(_pct(lat, 0.50)),
        "p99_ms": _ms(_pct(lat, 0.99)),
        "max_ms": _ms(max(lat) if lat else None),
        "idle_opened": holder.opened,
        "idle_all_connected_s": None if holder.all_connected_after is None else round(holder.all_connected_after, 2),
        "idle_cut": len(holder.cut_after),
        "idle_answered": holder.answered,
        "idle_cut_median_s": None if not holder.cut_after else round(statistics.median(holder.cut_after), 2),
        "idle_left": idle_left,
        "idle_connect_errors": holder.connect_errors,
        "new_conn_probes": len(probes),
        "new_conn_failed": len(probes) - len(ok_probes),
        "new_conn_p50_ms": _ms(_pct(ok_probes, 0.5)),
        "new_conn_max_ms": _ms(max(ok_probes) if ok_probes else None),
        "answers_after": after is not None,
    }
    out(f"bench_web: {scrapers} scrapers, {idle} idle half-request connections, {seconds:g} s: "
        f"{figures['scrapes']} scrapes, {figures['errors']} errors {figures['error_kinds'] or ''}, "
        f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; idle all connected after "
        f"{figures['idle_all_connected_s']} s, {figures['idle_cut']} cut (median after {figures['idle_cut_median_s']} s), "
        f"{idle_left} left; new connection answered in p50 {figures['new_conn_p50_ms']} ms, "
        f"max {figures['new_conn_max_ms']} ms, {figures['new_conn_failed']}/{len(probes)} failed")
    return figures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scrapers", type=int, default=32)
    p.add_argument("--idle", type=int, default=300)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--cut-wait", type=float, default=45.0,
                   help="seconds to wait, after the run, for the server to cut the idle connections")
    p.add_argument("--web", action="append", default=[], metavar="LABEL=FILE",
                   help="serve with this copy of the web module (repeatable; FILE empty: the installed one)")
    p.add_argument("--request-timeout", type=float, help="Limits(request_timeout=...) for the server (new module only)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    webs = [w.partition("=")[::2] if "=" in w else (w, w) for w in args.web] or [("current", "")]
    if args.serve:
        return serve_child(webs[0][1], args.request_timeout)
    results = {}
    for label, path in webs:
        print(f"bench_web: {label} ({path or 'memcgscope.collector.web'})", flush=True)
        results[label] = run(args.scrapers, args.idle, args.seconds, path, args.cut_wait, args.request_timeout)
    if len(results) > 1:
        keys = [k for k in next(iter(results.values()))
                if k not in ("error_kinds", "idle_connect_errors", "server_stderr")]
        print(f"{'':24}" + "".join(f"{label:>14}" for label in results))
        for k in keys:
            print(f"{k:24}" + "".join(f"{str(r[k]):>14}" for r in results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
