"""One client connection: its buffers and state, and the non-blocking steps
a worker runs on it (a TLS handshake step, answering the complete requests
it holds). Each step returns what the connection waits for next; the
engine (engine.py) owns the waiting.

A connection belongs to one thread at a time: the I/O thread while it
waits on its client, one worker while its state is WORK. Whoever holds it
may touch its fields; the hand-over goes through the engine's lock.
"""

from __future__ import annotations

import collections
import logging
import re
import selectors
import ssl
from typing import Callable

__all__ = ["Connection", "HANDSHAKE", "READ", "WRITE", "LINGER", "WORK", "CLOSED", "KEEP", "CLOSE"]

log = logging.getLogger(__name__)

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
# What a connection held by the I/O thread waits for, or who holds it:
HANDSHAKE, READ, WRITE, LINGER, WORK, CLOSED = "handshake", "read", "write", "linger", "work", "closed"
# What a worker's step asks for next, besides HANDSHAKE, READ, WRITE, LINGER:
KEEP, CLOSE = "keep", "close"  # a response went out in full: keep alive / close now

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TLS_CHUNK = 16384  # one TLS record; an SSL write that would block must be retried with the same buffer


class Connection:
    __slots__ = ("sock", "peer", "tls", "state", "events", "inbuf", "scan_from", "out", "close_after",
                 "deadline", "idle", "served", "waitq", "want")

    def __init__(self, sock, peer, tls: bool, deadline: float):
        self.sock, self.peer, self.tls = sock, peer, tls
        self.state = HANDSHAKE if tls else READ
        self.events = 0  # what the selector watches it for
        self.inbuf = bytearray()
        self.scan_from = 0  # where to resume looking for the end of the head
        self.out: collections.deque[memoryview] = collections.deque()
        self.close_after = False  # close once `out` is sent
        self.deadline = deadline  # when the I/O thread cuts it, in its current state
        self.idle = False  # kept alive, no byte of a next request yet
        self.served = 0  # responses sent in full
        self.waitq: dict | None = None  # the engine's eviction queue it is in
        self.want = W  # what a blocked send or handshake waits for (TLS may need a read)

    def head_end(self) -> int | None:
        """Where the first request head in inbuf ends (after its blank line),
        or None while it is incomplete."""
        m = _HEAD_END.search(self.inbuf, self.scan_from)
        if m:
            return m.end()
        self.scan_from = max(0, len(self.inbuf) - 3)  # the end may straddle what comes next
        return None

    def pop_head(self) -> bytes:
        end = _HEAD_END.search(self.inbuf).end()
        head = bytes(self.inbuf[:end])
        del self.inbuf[:end]
        self.scan_from = 0
        return head

    def send(self) -> bool:
        """Send what is queued without blocking; False when the socket is full
        (then `want` says what to wait for). Raises OSError/SSLError when the
        client is gone."""
        while self.out:
            buf = self.out[0]
            try:
                n = self.sock.send(buf[:_TLS_CHUNK] if self.tls else buf)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self.want = W
                return False
            except ssl.SSLWantReadError:
                self.want = R
                return False
            if n == len(buf):
                self.out.popleft()
            else:
                self.out[0] = buf[n:]
        return True

    # --- worker steps ------------------------------------------------------------

    def handshake_step(self) -> str:
        """Advance the TLS handshake as far as the bytes that arrived allow."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want = R
            return HANDSHAKE
        except ssl.SSLWantWriteError:
            self.want = W
            return HANDSHAKE
        except (ssl.SSLError, OSError) as e:
            log.debug("web: TLS handshake with %s failed: %s", self.peer[0], e)
            return CLOSE
        return READ

    def answer(self, respond: Callable[[bytes, object], tuple[list[bytes], bool]],
               stopping: Callable[[], bool]) -> str:
        """Answer the complete request heads in inbuf, in order (pipelining),
        until one leaves output unsent or no complete head is left."""
        while True:
            try:
                chunks, close = respond(self.pop_head(), self.peer)
            except Exception:
                log.exception("web: answering %s failed", self.peer[0])
                return CLOSE
            if stopping():  # no answer goes out after shutdown
                return CLOSE
            self.out.extend(memoryview(c) for c in chunks)
            self.close_after = close
            try:
                if not self.send():
                    return WRITE
            except (OSError, ssl.SSLError):
                return CLOSE
            if close:
                return LINGER
            self.served += 1
            if not _HEAD_END.search(self.inbuf):
                return KEEP
