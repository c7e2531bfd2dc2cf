"""The HTTP server's bounds, and what happens at each.

- `request_timeout` (5 s): from accept (TLS handshake included), or from the
  first byte of a later request on a kept-alive connection, the request
  head must be complete within this, or the connection gets a 408 and is
  closed. Trickling a byte now and then does not extend it, and it is
  independent of `idle_timeout`.
- `idle_timeout` (30 s): how long a kept-alive connection may sit with no
  byte of a next request; then it is closed without a word.
- `max_connections` (512, or half the open-file limit if lower): when a new
  connection would go over, the connection that has waited longest without
  a complete request is closed to make room, one that never completed a
  request (a slow or silent newcomer, a closing one) before a kept-alive one
  that did (likely a Prometheus between scrapes; its next scrape
  reconnects). Only when every connection is being answered is the newcomer
  refused: 503 with Retry-After (a plain close under TLS). Queueing instead
  (not accepting) would let a few hundred silent connections make every new
  scrape wait out their timeouts; refusing whenever full would let them lock
  Prometheus out. Should accept() run out of file descriptors first, the
  bound is lowered to what the process could hold, with a warning.
- `workers` (8): threads answering requests; CPU-bound renders share one
  core under the GIL, so more would add contention, not throughput.
- `write_timeout` (30 s): a response must be sent within this.
- `backlog` (1024): the listen queue, for bursts of connections while the
  I/O thread is busy; the kernel caps it at net.core.somaxconn.
- `max_head` (64 KiB): a longer request head gets a 431 and a close.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

__all__ = ["Limits"]


def _default_max_connections() -> int:
    # Half the open-file limit, so connections cannot starve the BPF side
    # of file descriptors (systemd's default soft limit is 1024).
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 512 if soft == resource.RLIM_INFINITY else max(8, min(512, soft // 2))


@dataclass(frozen=True)
class Limits:
    """The HTTP server's bounds; see the module docstring."""

    max_connections: int = field(default_factory=_default_max_connections)
    workers: int = 8
    request_timeout: float = 5.0
    idle_timeout: float = 30.0
    write_timeout: float = 30.0
    backlog: int = 1024
    max_head: int = 65536

    def __post_init__(self):
        for name in ("max_connections", "workers", "backlog", "max_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name}: {value!r}; give a whole number ≥ 1")
        for name in ("request_timeout", "idle_timeout", "write_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{name}: {value!r}; give a number of seconds > 0")
