"""`serve()`: the listening socket, the engine behind it, and `WebServer`,
the handle that stops it."""

from __future__ import annotations

import socket
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry

from memcgscope import __version__

from .app import App, acquire_scrape_collector, release_scrape_collector
from .auth import BasicAuth
from .config import ListenError, WebConfig, load_web_config, parse_listen
from .engine import Engine
from .limits import Limits

__all__ = ["WebServer", "serve"]


class WebServer:
    """A running server: `.url`, `.host`, `.port`, `.shutdown()`."""

    def __init__(self, engine: Engine, address: tuple, app: App, scheme: str):
        self._engine = engine
        self._app = app
        host, port = address[:2]
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
        """Stop serving: the port is closed and kept-alive connections are
        cut when this returns, within about a second."""
        if self._stopped:
            return
        self._stopped = True
        self._engine.stop(timeout=1.0)
        release_scrape_collector(self._app.registry)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def serve(listen: str, registry: CollectorRegistry, web_config: WebConfig | str | None = None,
          facts: Mapping[str, Any] | None = None, health: Callable[[], str | None] | None = None,
          version: str = __version__, limits: Limits | None = None) -> WebServer:
    """Start serving `registry` in background threads.

    `listen` is "HOST:PORT", "[IPV6]:PORT" or ":PORT"; port 0 picks a free
    one (read it from `.port`). `web_config` is a path or a parsed
    WebConfig. `facts` fill the landing page's table. `health` returns None
    when healthy, else the reason (then /-/healthy answers 503). `limits`
    bound connections and the time they may take (limits.py).
    """
    host, port = parse_listen(listen)
    if isinstance(web_config, str):
        web_config = load_web_config(web_config)
    web_config = web_config or WebConfig()
    limits = limits or Limits()
    family, address = _resolve(host, port, listen)

    app = App(registry=registry, facts=dict(facts or {}), health=health,
              auth=BasicAuth(web_config.basic_auth_users) if web_config.basic_auth_users else None,
              headers=dict(web_config.headers), version=version)
    ctx = web_config.ssl_context() if web_config.tls else None
    try:
        listener = _listen(family, address, limits.backlog)
    except OSError as e:
        raise ListenError(f"--listen {listen!r}: cannot listen ({e.strerror}); "
                          "pick a free port or an address of this host") from None
    # after the bind, so a failed start leaves the registry as it was
    app.scrape_duration = acquire_scrape_collector(registry)
    bound = listener.getsockname()
    return WebServer(Engine(listener, ctx, app, limits), bound, app, "https" if ctx else "http")


def _listen(family: socket.AddressFamily, address: tuple, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a restarted exporter rebinds while old connections sit in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            # ":PORT" means every interface, IPv4 included.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


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
