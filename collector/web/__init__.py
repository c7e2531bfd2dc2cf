"""The exporter's HTTP side: /metrics, a landing page and a health check.

`serve()` runs an HTTP(S) server for one prometheus_client
`CollectorRegistry`. TLS and basic auth follow the Prometheus
exporter-toolkit web configuration file (`--web.config.file`), so a
Prometheus already set up for node_exporter scrapes memcgscope the same way.

Served paths: `/metrics` (text format, or OpenMetrics when the Accept header
asks for it; gzip when accepted), `/` (HTML landing page), `/-/healthy`
(200 "OK", or 503 with the reason). Anything else is 404; methods other than
GET and HEAD are 405. Basic auth, when configured, guards every path, as the
toolkit does.

One job per module:
- config.py: the web configuration file and --listen;
- auth.py: basic auth (bcrypt, a cache of successes, a decoy hash);
- app.py: routes, landing page, health, exposition, the self-metric;
- limits.py: the bounds on connections and their times;
- engine.py: the I/O thread and worker pool serving connections (why it is
  not http.server's or prometheus_client's server: its docstring);
- connection.py: one connection's state and non-blocking steps;
- server.py: `serve()` and `WebServer`.
"""

from .app import ScrapeDurationCollector
from .config import ListenError, WebConfig, WebConfigError, load_web_config, parse_listen, parse_web_config
from .limits import Limits
from .server import WebServer, serve

__all__ = [
    "WebConfig", "WebConfigError", "ListenError", "WebServer", "Limits",
    "load_web_config", "parse_web_config", "parse_listen", "serve",
    "ScrapeDurationCollector",
]
