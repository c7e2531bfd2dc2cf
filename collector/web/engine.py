"""The connection engine: one I/O thread that accepts, reads, writes and
times out connections, and a small pool of workers that answer requests.

The I/O thread owns the listening socket and every connection waiting on
its client: it accepts, reads request heads without blocking, writes what
did not fit the socket buffer, and enforces the bounds (limits.py). It
never waits on one client and never runs application code. A worker gets a
connection only when there is work that needs no waiting: one step of a TLS
handshake whose bytes have arrived, or a complete request head
(connection.py). So a client that connects and sends nothing, half a
request or half a TLS handshake costs a socket and a few hundred bytes, not
a thread, and scrapes go on being answered while such clients hang.

Why not the standard servers: http.server's ThreadingHTTPServer (what this
replaced) gives each connection a thread from accept to close and listens
with a backlog of 5, so a few hundred idle connections are a few hundred
threads contending with the scrapes for the GIL, and connections past the
backlog wait out TCP's SYN retransmits (1, 3, 7 s...). prometheus_client's
`start_http_server` is that same server, and with TLS it wraps the
listening socket, so the handshake runs inside accept() and one slow TLS
client stalls all others. Here each connection's handshake runs on a
worker, non-blocking, one step per batch of bytes received.
"""

from __future__ import annotations

import collections
import errno
import logging
import re
import selectors
import socket
import ssl
import threading
import time
from functools import partial

from .connection import CLOSE, CLOSED, HANDSHAKE, KEEP, LINGER, READ, WORK, WRITE, Connection
from .limits import Limits
from .pool import Pool

__all__ = ["Engine"]

log = logging.getLogger(__name__)

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
_LINGER = 2.0  # s to drain a closing connection, so unread input does not turn our FIN into a RST
_ACCEPTS_PER_WAKEUP = 128  # then look at the other sockets again
# accept(2) on Linux: errors of the pending connection itself, to skip it
_ACCEPT_RETRY = {errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                 errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM}
_RENDER = re.compile(rb"(?:GET|HEAD) /metrics[ ?]")  # the one request that is not quick


class Engine:
    def __init__(self, listener: socket.socket, ssl_context: ssl.SSLContext | None, app, limits: Limits):
        self._listener = listener
        self._ctx = ssl_context
        self._app = app
        self._limits = limits
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (listener, self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(listener, R, None)
        self._sel.register(self._wake_r, R, None)
        self._conns: set[Connection] = set()  # every open connection; I/O thread only
        self._fresh: dict[Connection, None] = {}  # waiting, never completed a request (or closing): evicted first
        self._kept: dict[Connection, None] = {}  # waiting, kept alive after a response
        self._handbacks: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stopping = self._stopped = False
        self._next_deadline = float("inf")
        self._paused_until = 0.0  # accept() paused after ENOBUFS and the like
        self._max_connections = limits.max_connections  # lowered if descriptors run out first
        self._warned: dict[str, float] = {}
        port = listener.getsockname()[1]
        self._pool = Pool(limits.workers, f"memcgscope-web-{port}")
        self._thread = threading.Thread(target=self._run, name=f"memcgscope-web-{port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Close the listener and every connection, those being answered
        included; returns within `timeout`."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout)
        self._pool.stop()

    # --- the I/O thread ------------------------------------------------------

    def _run(self):
        try:
            while not self._stopping:
                now = time.monotonic()
                until = min(self._next_deadline, self._paused_until or float("inf"), now + 1.0)
                for key, _ in self._sel.select(max(0.0, until - now)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    else:
                        self._guarded(self._on_event, key.data)
                while self._handbacks:
                    self._guarded(self._take_handback, *self._handbacks.popleft())
                now = time.monotonic()
                if now >= self._next_deadline:
                    self._expire(now)
                if self._paused_until and now >= self._paused_until:
                    self._paused_until = 0.0
                    self._sel.register(self._listener, R, None)
        except Exception:
            log.exception("web: the I/O loop failed; the server stops")
        finally:
            self._close_all()

    def _accept(self):
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_RETRY:
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE) and len(self._conns) > 1:
                    # Out of descriptors: hold no more connections than now,
                    # less one, so accepting evicts instead of failing.
                    self._max_connections = min(self._max_connections, len(self._conns) - 1)
                    self._warn("fds", f"web: cannot accept connections ({e.strerror}); max_connections lowered "
                               f"to {self._max_connections}; raise the open-file limit (ulimit -n)")
                    if self._evict():
                        continue
                # The pending connection stays in the backlog and the listener
                # stays readable: pause rather than spin.
                self._warn("accept", f"web: cannot accept connections ({e.strerror}) with {len(self._conns)} "
                           "open; pausing accepts for 0.1 s; check the open-file limit and the host's memory")
                self._sel.unregister(self._listener)
                self._paused_until = time.monotonic() + 0.1
                return
            if len(self._conns) >= self._max_connections and not self._evict():
                self._refuse(sock, peer)
                continue
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                sock = self._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as e:
            log.debug("web: dropping %s at accept: %s", peer[0], e)
            sock.close()
            return
        conn = Connection(sock, peer, self._ctx is not None, time.monotonic() + self._limits.request_timeout)
        self._conns.add(conn)
        self._wait(conn, conn.state, R, conn.deadline)

    def _refuse(self, sock: socket.socket, peer):
        self._warn("bound", f"web: {len(self._conns)} connections open, all being answered "
                   f"(max_connections {self._max_connections}); refusing new ones")
        if self._ctx is None:
            try:
                sock.setblocking(False)
                sock.send(self._app.canned(503, "Service Unavailable: too many connections",
                                           {"Retry-After": "1"}))
            except OSError:
                pass
        sock.close()

    def _evict(self) -> bool:
        """Close the connection waiting longest without a complete request."""
        for q in (self._fresh, self._kept):
            if q:
                conn = next(iter(q))
                log.debug("web: closing %s (%s) to make room", conn.peer[0], conn.state)
                self._close(conn)
                return True
        return False

    def _on_event(self, conn: Connection):
        if conn.state == HANDSHAKE:
            self._to_worker(conn, conn.handshake_step)
        elif conn.state == READ:
            self._read(conn)
        elif conn.state == WRITE:
            self._write(conn)
        elif conn.state == LINGER:
            self._drain(conn)

    def _read(self, conn: Connection):
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                return self._watch(conn, W)
            except (OSError, ssl.SSLError):
                return self._close(conn)
            if not data:
                return self._close(conn)
            if conn.idle:  # the first byte of the next request starts its clock
                conn.idle = False
                self._set_deadline(conn, time.monotonic() + self._limits.request_timeout)
            conn.inbuf += data
            end = conn.head_end()
            if end is not None and end <= self._limits.max_head:
                return self._to_answer(conn)
            if end is not None or len(conn.inbuf) > self._limits.max_head:
                return self._too_large(conn)
        self._watch(conn, R)

    def _too_large(self, conn: Connection):
        conn.inbuf.clear()
        conn.out.append(self._app.canned(431, "Request Header Fields Too Large: the request head is over "
                                         f"{self._limits.max_head} bytes"))
        conn.close_after = True
        self._write(conn)

    def _write(self, conn: Connection):
        try:
            done = conn.send()
        except (OSError, ssl.SSLError):
            return self._close(conn)
        if not done:
            if conn.state != WRITE:
                self._wait(conn, WRITE, conn.want, time.monotonic() + self._limits.write_timeout)
            else:
                self._watch(conn, conn.want)
            return
        self._after_response(conn)

    def _after_response(self, conn: Connection):
        """A response went out in full."""
        if conn.close_after:
            return self._linger(conn)
        conn.served += 1
        self._keep(conn)

    def _keep(self, conn: Connection):
        """Wait for the next request on a kept-alive connection."""
        end = conn.head_end() if conn.inbuf else None
        if end is not None:  # pipelined
            return self._to_answer(conn) if end <= self._limits.max_head else self._too_large(conn)
        conn.idle = not conn.inbuf
        timeout = self._limits.idle_timeout if conn.idle else self._limits.request_timeout
        self._wait(conn, READ, R, time.monotonic() + timeout)
        self._read(conn)

    def _linger(self, conn: Connection):
        # Half-close after the response, then read and discard until the
        # client closes: closing with unread input would send a RST that
        # can destroy the response before the client read it. The raw
        # socket's shutdown, not SSLSocket's: no TLS close_notify (as before).
        try:
            socket.socket.shutdown(conn.sock, socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        self._wait(conn, LINGER, R, time.monotonic() + _LINGER)
        self._drain(conn)

    def _drain(self, conn: Connection):
        while True:
            try:
                if not socket.socket.recv(conn.sock, 65536):
                    return self._close(conn)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self._close(conn)

    def _expire(self, now: float):
        nxt = float("inf")
        for conn in list(self._conns):
            if conn.state == WORK:
                continue
            if conn.deadline > now:
                nxt = min(nxt, conn.deadline)
                continue
            if conn.state == READ and conn.inbuf:  # half a request: say why before closing
                log.debug("web: %s sent no complete request within %g s; closing", conn.peer[0],
                          self._limits.request_timeout)
                try:
                    conn.sock.send(self._app.canned(408, "Request Timeout: the request head did not arrive "
                                                    f"within {self._limits.request_timeout:g} s"))
                except (OSError, ssl.SSLError):
                    pass
            else:
                log.debug("web: %s timed out (%s); closing", conn.peer[0], conn.state)
            self._close(conn)
        self._next_deadline = nxt

    def _wait(self, conn: Connection, state: str, events: int, deadline: float):
        """The connection now waits on its client, in `state`, until `deadline`."""
        conn.state = state
        self._set_deadline(conn, deadline)
        if conn.waitq is not None:
            del conn.waitq[conn]
            conn.waitq = None
        if state != WRITE:  # a response being sent is not evicted
            conn.waitq = self._kept if conn.served and state != LINGER else self._fresh
            conn.waitq[conn] = None
        self._watch(conn, events)

    def _set_deadline(self, conn: Connection, deadline: float):
        conn.deadline = deadline
        self._next_deadline = min(self._next_deadline, deadline)

    def _watch(self, conn: Connection, events: int):
        if conn.events == events:
            return
        if conn.events:
            self._sel.modify(conn.sock, events, conn)
        else:
            self._sel.register(conn.sock, events, conn)
        conn.events = events

    def _unwatch(self, conn: Connection):
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        if conn.waitq is not None:
            del conn.waitq[conn]
            conn.waitq = None

    def _to_worker(self, conn: Connection, step, urgent: bool = True):
        self._unwatch(conn)
        conn.state = WORK
        self._pool.submit(urgent, self._step, conn, step)

    def _to_answer(self, conn: Connection):
        urgent = not _RENDER.match(conn.inbuf)
        self._to_worker(conn, partial(conn.answer, self._app.respond, lambda: self._stopping), urgent)

    def _close(self, conn: Connection):
        self._unwatch(conn)
        self._conns.discard(conn)
        conn.state = CLOSED  # events already selected for it are ignored
        conn.sock.close()

    def _guarded(self, fn, conn: Connection, *args):
        try:
            fn(conn, *args)
        except Exception:  # a bug met by one connection must not stop the server
            log.exception("web: serving %s failed; closing it", conn.peer[0])
            if conn.state != WORK:  # else its worker owns it
                self._close(conn)

    def _take_handback(self, conn: Connection, next_state: str):
        if next_state == HANDSHAKE:
            self._wait(conn, HANDSHAKE, conn.want, conn.deadline)
        elif next_state == READ:  # handshake done: the head's deadline still runs from accept
            self._wait(conn, READ, R, conn.deadline)
            self._read(conn)
        elif next_state == KEEP:
            self._keep(conn)
        elif next_state == WRITE:
            self._write(conn)
        elif next_state == LINGER:
            self._linger(conn)
        else:
            self._close(conn)

    def _drain_wakeups(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is already pending; closed: the loop has ended

    def _warn(self, what: str, msg: str):
        now = time.monotonic()  # at most once a minute per kind: an overload must not flood the log
        if now - self._warned.get(what, -60.0) >= 60.0:
            self._warned[what] = now
            log.warning("%s", msg)

    def _close_all(self):
        with self._lock:
            self._stopped = True
        for conn in list(self._conns):
            if conn.state == WORK:
                # its worker closes it when it hands it back; cut it now so
                # no answer goes out after shutdown
                try:
                    socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self._close(conn)
        while self._handbacks:
            self._handbacks.popleft()[0].sock.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # --- workers ---------------------------------------------------------------

    def _handback(self, conn: Connection, next_state: str):
        with self._lock:
            if not self._stopped:
                self._handbacks.append((conn, next_state))
                self._wake()
                return
        conn.sock.close()

    def _step(self, conn: Connection, step):
        self._handback(conn, CLOSE if self._stopping else step())
