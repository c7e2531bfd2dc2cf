"""What the web server answers: routes, the landing page, the health check,
/metrics exposition, and the self-metric timing it.

`App.respond(head, peer)` turns one complete request head (request line and
headers, as the connection engine read them) into the bytes of the response
and whether to close the connection after it. Parsing and the HTTP/1.1
details (keep-alive, HTTP/1.0, errors for malformed requests) are
`http.server.BaseHTTPRequestHandler`'s, run over the buffered head rather
than over a socket, so the handler never waits on a client.

Exposition is prometheus_client's: `choose_encoder` picks the text format or
OpenMetrics from the Accept header (with its escaping and version), and
`gzip_accepted` reads Accept-Encoding. Its `make_wsgi_app` is not used: it
has no place to time the render (the self-metric below), turns a failing
collector into an exception instead of a 500, and compresses at gzip level
9, where level 1 costs a twentieth of the CPU on exposition text for a body
under twice the size (50 KB of text: 3.5 KB against 2.1 KB).
"""

from __future__ import annotations

import email.utils
import gzip
import html
import io
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import GaugeMetricFamily

from memcgscope import __version__

from .auth import BasicAuth

__all__ = ["App", "ScrapeDurationCollector", "HEALTH_PATH", "METRICS_PATH"]

log = logging.getLogger(__name__)

HEALTH_PATH = "/-/healthy"
METRICS_PATH = "/metrics"
SERVER = f"memcgscope/{__version__}"
_JOIN_BELOW = 65536  # responses up to this size go out in one send (one TCP segment train, no Nagle wait)


# --- the self-metric --------------------------------------------------------

class ScrapeDurationCollector:
    """Exports how long the previous /metrics render took.

    The render being timed includes this collector, so the value shown is
    always the previous scrape's; before the first scrape there is no sample.
    """

    NAME = "memcgscope_scrape_duration_seconds"
    HELP = "Time the previous /metrics render took."

    def __init__(self):
        self.last: float | None = None

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self):
        g = GaugeMetricFamily(self.NAME, self.HELP)
        if self.last is not None:
            g.add_metric([], self.last)
        yield g


# Servers of one registry (say, one per listen address) share its
# self-metric, so it is registered once and unregistered with the last one.
_scrape_collectors: "weakref.WeakKeyDictionary[CollectorRegistry, list]" = weakref.WeakKeyDictionary()
_scrape_lock = threading.Lock()


def acquire_scrape_collector(registry: CollectorRegistry) -> ScrapeDurationCollector:
    with _scrape_lock:
        entry = _scrape_collectors.get(registry)
        if entry is None:
            entry = [ScrapeDurationCollector(), 0]
            registry.register(entry[0])
            _scrape_collectors[registry] = entry
        entry[1] += 1
        return entry[0]


def release_scrape_collector(registry: CollectorRegistry) -> None:
    with _scrape_lock:
        entry = _scrape_collectors.get(registry)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _scrape_collectors[registry]
            try:
                registry.unregister(entry[0])
            except KeyError:
                pass


# --- the application ---------------------------------------------------------

@dataclass
class App:
    registry: CollectorRegistry
    facts: Mapping[str, Any]
    health: Callable[[], str | None] | None
    auth: BasicAuth | None
    headers: Mapping[str, str]
    version: str
    scrape_duration: ScrapeDurationCollector | None = None

    def respond(self, head: bytes, peer) -> tuple[list[bytes], bool]:
        """The response to one request head, as chunks to send, and whether
        to close the connection once they are sent."""
        h = _Handler(self, head, peer)
        chunks = h.wfile.chunks
        if len(chunks) > 1 and sum(map(len, chunks)) <= _JOIN_BELOW:
            chunks = [b"".join(chunks)]
        return chunks, h.close_connection

    def canned(self, status: int, text: str, extra: Mapping[str, str] | None = None) -> bytes:
        """A complete response that closes the connection, for the engine's
        own answers (408, 431, 503) where no request was parsed."""
        body = f"{text}\n".encode()
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Server: {SERVER}",
                 f"Date: {email.utils.formatdate(usegmt=True)}", "Content-Type: text/plain; charset=utf-8",
                 f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in {**self.headers, **(extra or {})}.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def unhealthy_reason(self) -> str | None:
        if self.health is None:
            return None
        try:
            reason = self.health()
        except Exception as e:
            return f"health check raised {type(e).__name__}: {e}"
        return None if reason is None else (str(reason) or "unhealthy")

    def landing_page(self) -> bytes:
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fact(v))}</td></tr>\n"
            for k, v in self.facts.items())
        page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>memcgscope</title></head>
<body>
<h1>memcgscope</h1>
<p>The memory-cgroup charge path, observed with eBPF and checked against a model. Version {html.escape(self.version)}.</p>
<table>
{rows}</table>
<ul>
<li><a href="{METRICS_PATH}">Metrics</a></li>
<li><a href="{HEALTH_PATH}">Health</a></li>
</ul>
</body>
</html>
"""
        return page.encode()

    def metrics(self, accept: str | None, accept_encoding: str | None) -> tuple[int, bytes, str, dict]:
        encoder, content_type = choose_encoder(accept)
        started = time.perf_counter()
        try:
            body = encoder(self.registry)
        except Exception as e:  # a broken collector must not kill the server
            log.warning("rendering /metrics failed: %s", e, exc_info=True)
            return 500, f"rendering /metrics failed: {e}\n".encode(), "text/plain; charset=utf-8", {}
        finally:
            self.scrape_duration.last = time.perf_counter() - started
        if gzip_accepted(accept_encoding or ""):
            return 200, gzip.compress(body, compresslevel=1), content_type, {"Content-Encoding": "gzip"}
        return 200, body, content_type, {}


def _fact(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(str(v) for v in value)
    return str(value)


# --- one request ---------------------------------------------------------------

class _Chunks:
    """The handler's wfile: collects what it writes, sends nothing."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def write(self, b) -> int:
        self.chunks.append(bytes(b))
        return len(b)

    def flush(self):
        pass


class _Handler(BaseHTTPRequestHandler):
    server_version = SERVER
    protocol_version = "HTTP/1.1"  # keep-alive between scrapes

    def __init__(self, app: App, head: bytes, peer):
        # Not BaseRequestHandler.__init__: there is no socket here, only the
        # head the engine read; the response goes to a buffer.
        self.app = app
        self.client_address = peer
        self.rfile = io.BytesIO(head)
        self.wfile = _Chunks()
        self.close_connection = True
        self.handle_one_request()

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def __getattr__(self, name):
        # BaseHTTPRequestHandler answers 501 to a method without a do_X;
        # every method other than GET and HEAD is a 405 here instead.
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self):
        if self._authorized():
            self._reply(405, b"Method Not Allowed\n", extra={"Allow": "GET, HEAD"})

    def do_GET(self):
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        if path == METRICS_PATH:
            status, body, content_type, extra = self.app.metrics(self.headers.get("Accept"),
                                                                 self.headers.get("Accept-Encoding"))
            self._reply(status, body, content_type, extra)
        elif path == "/":
            self._reply(200, self.app.landing_page(), "text/html; charset=utf-8")
        elif path == HEALTH_PATH:
            reason = self.app.unhealthy_reason()
            if reason is None:
                self._reply(200, b"OK\n")
            else:
                self._reply(503, f"Unhealthy: {reason}\n".encode())
        else:
            self._reply(404, b"Not Found\n")

    do_HEAD = do_GET

    def _authorized(self) -> bool:
        auth = self.app.auth
        if auth is None or auth.check(self.headers.get("Authorization")):
            return True
        self._reply(401, b"Unauthorized\n", extra={"WWW-Authenticate": "Basic"})
        return False

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
               extra: Mapping[str, str] | None = None):
        self.send_response(status)
        if self.command not in ("GET", "HEAD") or "Content-Length" in self.headers \
                or "Transfer-Encoding" in self.headers:
            # A request body we did not read would be parsed as the next
            # request on a kept-alive connection: close it instead.
            self.close_connection = True
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**self.app.headers, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
