"""The web server's worker threads."""

from __future__ import annotations

import itertools
import logging
import queue
import threading

__all__ = ["Pool"]

log = logging.getLogger(__name__)


class Pool:
    """Daemon worker threads (a collector that hangs must not hold up exit),
    taking urgent jobs first: TLS handshake steps and requests other than
    /metrics are short, and should not queue behind renders."""

    def __init__(self, n: int, name: str):
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()  # FIFO within a priority
        self._threads = [threading.Thread(target=self._run, name=f"{name}-w{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, urgent: bool, fn, *args):
        self._q.put((0 if urgent else 1, next(self._seq), fn, args))

    def stop(self):
        for _ in self._threads:
            self._q.put((2, next(self._seq), None, ()))  # after the queued jobs, which close their connections

    def _run(self):
        while True:
            _, _, fn, args = self._q.get()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:
                log.exception("web: a worker job failed")
