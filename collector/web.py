"""The exporter's HTTP side: /metrics, a landing page and a health check.

`serve()` runs a threaded HTTP(S) server for one prometheus_client
`CollectorRegistry`. TLS and basic auth follow the Prometheus
exporter-toolkit web configuration file (`--web.config.file`,
docs/web-configuration.md in prometheus/exporter-toolkit), so a Prometheus
already set up for node_exporter scrapes memcgscope the same way.

Served paths: `/metrics` (text format, or OpenMetrics when the Accept header
asks for it; gzip when accepted), `/` (HTML landing page), `/-/healthy`
(200 "OK", or 503 with the reason). Anything else is 404; methods other than
GET and HEAD are 405. Basic auth, when configured, guards every path, as the
toolkit does.

Differences from the toolkit, each refused with a one-line error rather
than silently ignored: inline `cert`/`key`/`client_ca`, `cipher_suites`,
`curve_preferences`, `client_allowed_sans`, `rate_limit`, and the client
auth types Python's ssl module cannot express (RequestClientCert,
RequireAnyClientCert). The file is read once at start, not per request.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import html
import ipaddress
import logging
import os
import socket
import socketserver
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

import bcrypt
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily

from memcgscope import __version__

__all__ = [
    "WebConfig", "WebConfigError", "ListenError", "WebServer",
    "load_web_config", "parse_web_config", "parse_listen", "serve",
    "ScrapeDurationCollector",
]

log = logging.getLogger(__name__)

HEALTH_PATH = "/-/healthy"
METRICS_PATH = "/metrics"


class WebConfigError(ValueError):
    """A bad web configuration file; str() is one line: file, key, fix."""


class ListenError(ValueError):
    """A bad --listen value; str() is one line with the accepted forms."""


# --- the web configuration file -----------------------------------------

# Header names and, where the toolkit restricts them, their allowed values
# (exporter-toolkit web/handler.go, extraHTTPHeaders).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file",
             "min_version", "max_version", "prefer_server_cipher_suites"}
_HTTP_KEYS = {"headers", "http2"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}

# Toolkit keys we know but do not implement: key -> what to do instead.
_UNSUPPORTED = {
    "tls_server_config.cert": "not supported by memcgscope; put the PEM in a file and use cert_file",
    "tls_server_config.key": "not supported by memcgscope; put the PEM in a file and use key_file",
    "tls_server_config.client_ca": "not supported by memcgscope; put the PEM in a file and use client_ca_file",
    "tls_server_config.cipher_suites": "not supported by memcgscope (Go cipher names); remove it to use OpenSSL's defaults",
    "tls_server_config.curve_preferences": "not supported by memcgscope; remove it to use OpenSSL's defaults",
    "tls_server_config.client_allowed_sans": "not supported by memcgscope; remove it and restrict clients with client_ca_file",
    "rate_limit": "not supported by memcgscope; remove it",
}

_BCRYPT_HINT = ("give a bcrypt hash, e.g. from htpasswd -nBC 10 \"\" | tr -d ':\\n' or "
                "python3 -c 'import bcrypt; print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())'")


@dataclass(frozen=True)
class WebConfig:
    """A parsed web configuration; the default (no file) is plain HTTP, no auth."""

    path: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A server context; raises WebConfigError when files do not load."""
        name = _short(self.path)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        if self.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        for key, what in (("cert_file", "certificate"), ("key_file", "private key"),
                          ("client_ca_file", "CA certificate")):
            file = getattr(self, key)
            if file is not None and not os.path.isfile(file):
                raise WebConfigError(f"{name}: tls_server_config.{key}: {file}: no such file; "
                                     f"give the path of a PEM {what}")
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise WebConfigError(f"{name}: tls_server_config.cert_file/key_file: {self.cert_file}, {self.key_file}: "
                                 f"cannot load ({_ssl_reason(e)}); give a PEM certificate and its matching "
                                 "unencrypted private key") from None
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise WebConfigError(f"{name}: tls_server_config.client_ca_file: {self.client_ca_file}: "
                                     f"cannot load ({_ssl_reason(e)}); give the path of a PEM CA certificate") from None
        return ctx


def _short(path: str | None) -> str:
    return os.path.basename(path) if path else "web config"


def _ssl_reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


def load_web_config(path: str) -> WebConfig:
    """Read and check a web configuration file (exporter-toolkit format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise WebConfigError(f"{path}: cannot read ({e.strerror}); give the path of the web configuration YAML "
                             "to --web.config.file") from None
    return parse_web_config(text, path)


def parse_web_config(text: str, path: str | None = None) -> WebConfig:
    """Parse the YAML text of a web configuration; `path` names it in errors
    and anchors relative file names (the toolkit resolves them against the
    file's directory)."""
    name = _short(path)

    def err(key: str, msg: str) -> WebConfigError:
        return WebConfigError(f"{name}: {key}: {msg}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or "invalid"
        raise WebConfigError(f"{name}: {where}: {problem}; fix the YAML syntax") from None
    if doc is None:
        return WebConfig(path=path)
    if not isinstance(doc, dict):
        raise err("top level", f"expected a mapping, got {type(doc).__name__}; "
                  "give keys tls_server_config, http_server_config, basic_auth_users")
    _check_keys(doc, "", _TOP_KEYS, err)

    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def file_key(section: dict, key: str) -> str | None:
        value = section.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise err(f"tls_server_config.{key}", f"expected a file name, got {value!r}; give a path")
        return os.path.join(base, value)

    kwargs: dict[str, Any] = {"path": path}
    tls = doc.get("tls_server_config")
    if tls is not None:
        if not isinstance(tls, dict):
            raise err("tls_server_config", "expected a mapping; give cert_file and key_file below it")
        _check_keys(tls, "tls_server_config.", _TLS_KEYS, err)
        cert, key = file_key(tls, "cert_file"), file_key(tls, "key_file")
        if cert is None:
            raise err("tls_server_config.cert_file", "missing; give the path of a PEM certificate")
        if key is None:
            raise err("tls_server_config.key_file", "missing; give the path of the certificate's PEM private key")
        kwargs.update(cert_file=cert, key_file=key)
        auth = tls.get("client_auth_type", "NoClientCert") or "NoClientCert"
        if auth not in _CLIENT_AUTH:
            hint = ("Python's ssl module cannot request a client certificate without verifying it; "
                    if auth in ("RequestClientCert", "RequireAnyClientCert") else "")
            raise err("tls_server_config.client_auth_type",
                      f"{auth!r} is not supported; {hint}use one of {', '.join(_CLIENT_AUTH)}")
        ca = file_key(tls, "client_ca_file")
        # Same rules as the toolkit (https/tls_config.go): a CA without a
        # policy that uses it, or a policy that verifies without a CA, is a
        # configuration mistake.
        if ca and auth == "NoClientCert":
            raise err("tls_server_config.client_ca_file", "set but client_auth_type is NoClientCert; "
                      "set client_auth_type: RequireAndVerifyClientCert (or remove client_ca_file)")
        if auth != "NoClientCert" and not ca:
            raise err("tls_server_config.client_ca_file", f"missing, needed by client_auth_type {auth}; "
                      "give the path of the PEM CA that signs client certificates")
        kwargs.update(client_auth_type=auth, client_ca_file=ca)
        for key_name in ("min_version", "max_version"):
            if key_name in tls:
                v = tls[key_name]
                if v not in _TLS_VERSIONS:
                    raise err(f"tls_server_config.{key_name}", f"unknown TLS version {v!r}; use one of "
                              f"{', '.join(_TLS_VERSIONS)}")
                kwargs[key_name] = v
        lo, hi = kwargs.get("min_version", "TLS12"), kwargs.get("max_version", "TLS13")
        if _TLS_VERSIONS[lo] > _TLS_VERSIONS[hi]:
            raise err("tls_server_config.min_version", f"{lo} is above max_version {hi}; lower min_version "
                      "or raise max_version")
        if "prefer_server_cipher_suites" in tls:
            v = tls["prefer_server_cipher_suites"]
            if not isinstance(v, bool):
                raise err("tls_server_config.prefer_server_cipher_suites", f"expected true or false, got {v!r}")
            kwargs["prefer_server_cipher_suites"] = v

    http = doc.get("http_server_config")
    if http is not None:
        if not isinstance(http, dict):
            raise err("http_server_config", "expected a mapping; give headers below it")
        _check_keys(http, "http_server_config.", _HTTP_KEYS, err)
        # http2 is accepted for compatibility; this server speaks HTTP/1.1 only.
        if "http2" in http and not isinstance(http["http2"], bool):
            raise err("http_server_config.http2", f"expected true or false, got {http['http2']!r}")
        headers = http.get("headers") or {}
        if not isinstance(headers, dict):
            raise err("http_server_config.headers", "expected a mapping of header name to value")
        kwargs["headers"] = _check_headers(headers, err)

    users = doc.get("basic_auth_users")
    if users is not None:
        if not isinstance(users, dict):
            raise err("basic_auth_users", "expected a mapping of user name to bcrypt hash")
        out: dict[str, bytes] = {}
        for user, hashed in users.items():
            key = f"basic_auth_users.{user}"
            if not isinstance(user, str) or not user:
                raise err("basic_auth_users", f"user name {user!r} is not a string; quote it")
            if ":" in user:
                raise err(key, "a user name cannot contain ':' (basic auth splits on it); rename the user")
            if not isinstance(hashed, str) or not _is_bcrypt(hashed):
                raise err(key, f"not a bcrypt hash; {_BCRYPT_HINT}")
            out[user] = hashed.encode()
        kwargs["basic_auth_users"] = out

    config = WebConfig(**kwargs)
    if config.tls:
        config.ssl_context()  # load the files now so a bad one stops start-up, not the first scrape
    return config


def _check_keys(section: dict, prefix: str, known: set[str], err) -> None:
    for key in section:
        full = f"{prefix}{key}"
        if full in _UNSUPPORTED:
            raise err(full, _UNSUPPORTED[full])
        if key not in known:
            raise err(full, f"unknown key; use one of {', '.join(sorted(known))}")


def _check_headers(headers: dict, err) -> dict[str, str]:
    out = {}
    by_lower = {h.lower(): h for h in _HEADERS}
    for name, value in headers.items():
        canonical = by_lower.get(str(name).lower())
        key = f"http_server_config.headers.{name}"
        if canonical is None:
            raise err(key, f"header not allowed; use one of {', '.join(_HEADERS)}")
        if value is None or value == "":
            continue  # blank means unset, as in the toolkit
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise err(key, f"expected a one-line string, got {value!r}")
        allowed = _HEADERS[canonical]
        if allowed is not None and value.lower() not in allowed:
            raise err(key, f"invalid value {value!r}; use one of {', '.join(allowed)}")
        out[canonical] = value
    return out


def _is_bcrypt(hashed: str) -> bool:
    # $2a$/$2b$/$2y$, two-digit cost, 53 characters of salt and hash.
    return (len(hashed) == 60 and hashed[:4] in ("$2a$", "$2b$", "$2y$") and hashed[4:6].isdigit()
            and hashed[6] == "$")


# --- basic auth -----------------------------------------------------------

class _BasicAuth:
    """Checks credentials against bcrypt hashes, caching successes.

    bcrypt at cost 10 takes tens of milliseconds; Prometheus sends the same
    credentials every scrape, so a success is remembered under a SHA-256 of
    (user, password, hash). Only successes are cached, so a wrong password
    always pays the full bcrypt cost. Unknown users are checked against a
    decoy hash so response time does not reveal which user names exist.
    """

    CACHE_SIZE = 256

    def __init__(self, users: Mapping[str, bytes]):
        self.users = dict(users)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._decoy = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=10)) if users else b""
        self.bcrypt_calls = 0  # for tests: proves the cache is used

    def check(self, header: str | None) -> bool:
        if header is None or header[:6].lower() != "basic ":  # the scheme is case-insensitive (RFC 7617)
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join([user.encode(), password.encode(), hashed or b""])).digest()
        if hashed is not None:
            with self._lock:
                if key in self._ok:
                    self._ok.move_to_end(key)
                    return True
        self.bcrypt_calls += 1
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._decoy)
        except ValueError:
            ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._ok[key] = None
                while len(self._ok) > self.CACHE_SIZE:
                    self._ok.popitem(last=False)
        return ok


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


def _scrape_collector(registry: CollectorRegistry) -> ScrapeDurationCollector:
    with _scrape_lock:
        entry = _scrape_collectors.get(registry)
        if entry is None:
            entry = [ScrapeDurationCollector(), 0]
            registry.register(entry[0])
            _scrape_collectors[registry] = entry
        entry[1] += 1
        return entry[0]


def _release_scrape_collector(registry: CollectorRegistry) -> None:
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


# --- --listen ------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT", "[IPV6]:PORT" or ":PORT" (all interfaces) -> (host, port);
    host "" means all interfaces."""
    def bad(why: str) -> ListenError:
        return ListenError(f"--listen {text!r}: {why}; use HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9100")

    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise bad("an IPv6 address needs brackets and a port")
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("an IPv6 address needs brackets")
        if any(c.isspace() for c in host) or "/" in host:
            raise bad(f"{host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


# --- the server ------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # shutdown() must not wait for a slow client
    allow_reuse_address = True

    def __init__(self, address, family, handler, ssl_context: ssl.SSLContext | None):
        self.address_family = family
        self.ssl_context = ssl_context
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, handler, bind_and_activate=False)
        if family == socket.AF_INET6 and address[0] == "::":
            # ":PORT" means every interface, IPv4 included.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self):
        # HTTPServer.server_bind would look up the host's FQDN, which can
        # hang for seconds without DNS; the name is unused here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, in the request's own thread, so a slow
        # or broken client cannot stall the accept loop.
        conn = request
        if self.ssl_context is not None:
            request.settimeout(_Handler.timeout)
            try:
                conn = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return
        with self._lock:
            self._active.add(conn)
        try:
            super().finish_request(conn, client_address)
        finally:
            with self._lock:
                self._active.discard(conn)
            if conn is not request:
                conn.close()

    def close_connections(self):
        """Cut kept-alive connections so no request is answered after shutdown."""
        with self._lock:
            active = list(self._active)
        for conn in active:
            try:
                # socket.socket.shutdown, not SSLSocket's: cut the TCP
                # stream without a TLS close_notify exchange.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        log.debug("error serving %s", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"memcgscope/{__version__}"
    protocol_version = "HTTP/1.1"  # keep-alive between scrapes
    timeout = 30  # seconds a client may stay idle
    app: "_App"  # set on the per-server subclass

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
            self._metrics()
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

    def _metrics(self):
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        started = time.perf_counter()
        try:
            body = encoder(self.app.registry)
        except Exception as e:  # a broken collector must not kill the server
            log.warning("rendering /metrics failed: %s", e, exc_info=True)
            self._reply(500, f"rendering /metrics failed: {e}\n".encode())
            return
        finally:
            self.app.scrape_duration.last = time.perf_counter() - started
        extra = {}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body, compresslevel=1)
            extra["Content-Encoding"] = "gzip"
        self._reply(200, body, content_type, extra)

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


@dataclass
class _App:
    registry: CollectorRegistry
    facts: Mapping[str, Any]
    health: Callable[[], str | None] | None
    auth: _BasicAuth | None
    headers: Mapping[str, str]
    version: str
    scrape_duration: ScrapeDurationCollector | None

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


def _fact(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(str(v) for v in value)
    return str(value)


class WebServer:
    """A running server: `.url`, `.port`, `.shutdown()`."""

    def __init__(self, server: _Server, thread: threading.Thread, app: _App, scheme: str):
        self._server = server
        self._thread = thread
        self._app = app
        host, port = server.server_address[:2]
        self.port: int = port
        self.host: str = host
        if host in ("0.0.0.0", ""):
            shown = "127.0.0.1"
        elif host == "::":
            shown = "[::1]"
        elif ":" in host:
            shown = f"[{host}]"
        else:
            shown = host
        self.url = f"{scheme}://{shown}:{port}"
        self._stopped = False

    def shutdown(self) -> None:
        """Stop serving; returns within about a second."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()  # the serve loop polls every 0.1 s
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=1)
        _release_scrape_collector(self._app.registry)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def serve(listen: str, registry: CollectorRegistry, web_config: WebConfig | str | None = None,
          facts: Mapping[str, Any] | None = None, health: Callable[[], str | None] | None = None,
          version: str = __version__) -> WebServer:
    """Start serving `registry` in a background thread.

    `listen` is "HOST:PORT", "[IPV6]:PORT" or ":PORT"; port 0 picks a free
    one (read it from `.port`). `web_config` is a path or a parsed
    WebConfig. `facts` fill the landing page's table. `health` returns None
    when healthy, else the reason (then /-/healthy answers 503).
    """
    host, port = parse_listen(listen)
    if isinstance(web_config, str):
        web_config = load_web_config(web_config)
    web_config = web_config or WebConfig()
    family, address = _resolve(host, port, listen)

    app = _App(registry=registry, facts=dict(facts or {}), health=health,
               auth=_BasicAuth(web_config.basic_auth_users) if web_config.basic_auth_users else None,
               headers=dict(web_config.headers), version=version, scrape_duration=None)
    handler = type("Handler", (_Handler,), {"app": app})
    ctx = web_config.ssl_context() if web_config.tls else None
    try:
        server = _Server(address, family, handler, ctx)
    except OSError as e:
        raise ListenError(f"--listen {listen!r}: cannot listen ({e.strerror}); "
                          "pick a free port or an address of this host") from None
    # after the bind, so a failed start leaves the registry as it was
    app.scrape_duration = _scrape_collector(registry)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"memcgscope-web-{server.server_address[1]}", daemon=True)
    thread.start()
    return WebServer(server, thread, app, "https" if ctx else "http")


def _resolve(host: str, port: int, listen: str) -> tuple[socket.AddressFamily, tuple]:
    if host == "":
        return (socket.AF_INET6, ("::", port)) if socket.has_ipv6 and _ipv6_works() else (socket.AF_INET, ("0.0.0.0", port))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"--listen {listen!r}: cannot resolve {host!r} ({e.strerror}); "
                          "give an address or a name this host resolves") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[:2] if family == socket.AF_INET else sockaddr


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
