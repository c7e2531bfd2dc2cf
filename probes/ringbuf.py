"""The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8),
read through mmap of the map's fd, without libbpf or bcc.

The kernel's layout (kernel/bpf/ringbuf.c):

    page 0          consumer_pos (u64), written by us
    page 1          producer_pos (u64), written by the kernel
    page 2 ...      the data area, `size` bytes (a power of two), records
                    at position & (size - 1)

A record is an 8-byte header, { u32 len; u32 pg_off; }, then `len` bytes,
the whole rounded up to 8. Two bits of len say its state: BUSY (bit 31)
while the producer still writes it, DISCARD (bit 30) when it was reserved
and then dropped. The producer advances producer_pos when it reserves,
so records between consumer_pos and producer_pos may still be busy: reading
stops at the first busy one and resumes there next time (records commit in
any order, they are consumed in order).

The kernel maps the data area twice in a row so that a record crossing its
end reads straight on; this reader maps it once and joins the two pieces
itself, which halves what the mapping costs in resident memory and keeps
the reader testable over a plain buffer (tests/unit/test_ringbuf.py).

Positions are read and written as aligned 8-byte words through ctypes (one
load or store each, never torn). Ordering: on x86_64 (TSO) a header read
before its payload is seen in that order, as the kernel's
smp_store_release of the header needs; weaker architectures would need an
acquire load, which Python cannot issue (bcc's and libbpf's C readers use
smp_load_acquire).

Waiting: poll(2) on the map fd. The kernel's ringbuf_map_poll reports
POLLIN whenever data is available, checked at each call, so no wake-up is
lost between consuming and waiting again (the producer wakes sleepers only
when its record is the first unconsumed one; poll(2) re-checks regardless).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select

__all__ = ["RingBuffer", "RingBufferError", "BUSY_BIT", "DISCARD_BIT", "HDR_SIZE"]

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class RingBufferError(Exception):
    pass


def _mmap(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise RingBufferError(f"mmap of the ring buffer (fd {fd}, {length} bytes at {offset}): {os.strerror(err)}")
    return addr


class RingBuffer:
    """Records of one ring buffer, oldest first.

    ``RingBuffer.open(fd, size)`` maps a ring buffer map; the constructor
    takes the three addresses (consumer word, producer word, data area), so
    a test can hand it memory of its own."""

    def __init__(self, consumer_addr: int, producer_addr: int, data_addr: int, size: int, *,
                 fd: int | None = None, unmap=()):
        if size <= 0 or size & (size - 1) or size % 8:
            raise RingBufferError(f"ring buffer size {size} is not a power of two of at least 8 bytes")
        self.size = size
        self.mask = size - 1
        self.fd = fd
        self._consumer = ctypes.c_uint64.from_address(consumer_addr)
        self._producer = ctypes.c_uint64.from_address(producer_addr)
        self._data_addr = data_addr
        self._data = memoryview((ctypes.c_char * size).from_address(data_addr)).cast("B")
        self._unmap = list(unmap)
        self._poller = None
        if fd is not None:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
        #: records skipped because the producer discarded them
        self.discarded = 0

    @classmethod
    def open(cls, fd: int, size: int) -> "RingBuffer":
        """Maps the ring buffer map `fd` whose data area is `size` bytes
        (its max_entries). The fd stays the caller's."""
        page = mmap.PAGESIZE
        cons = _mmap(fd, page, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        try:
            prod = _mmap(fd, page + size, mmap.PROT_READ, page)
        except BaseException:
            _libc.munmap(cons, page)
            raise
        return cls(cons, prod, prod + page, size, fd=fd, unmap=[(cons, page), (prod, page + size)])

    # --- reading ------------------------------------------------------------

    def _header(self, off: int) -> int:
        return ctypes.c_uint32.from_address(self._data_addr + off).value

    def consume(self, limit: int | None = None) -> list[bytes]:
        """Every committed record up to the first busy one (or `limit`
        records), in order; advances the consumer position past them."""
        if self._data is None:
            raise RingBufferError("ring buffer is closed")
        out = []
        cons = self._consumer.value
        prod = self._producer.value
        data, mask, size = self._data, self.mask, self.size
        while cons < prod:
            off = cons & mask
            length = self._header(off)
            if length & BUSY_BIT:
                break
            n = length & ~(BUSY_BIT | DISCARD_BIT)
            if n > size - HDR_SIZE:
                raise RingBufferError(f"ring buffer record at {cons} claims {n} bytes, more than the buffer holds")
            if not length & DISCARD_BIT:
                start = (off + HDR_SIZE) & mask
                end = start + n
                if end <= size:
                    out.append(bytes(data[start:end]))
                else:   # crosses the end of the data area
                    out.append(bytes(data[start:]) + bytes(data[:end - size]))
            else:
                self.discarded += 1
            cons += (n + HDR_SIZE + 7) & ~7
            # each record's space goes back to the producer at once
            self._consumer.value = cons
            if limit is not None and len(out) >= limit:
                break
            if cons >= prod:
                prod = self._producer.value
        return out

    def available(self) -> int:
        """Bytes between the consumer and the producer (busy records too)."""
        return self._producer.value - self._consumer.value

    def wait(self, timeout_ms: int) -> bool:
        """Sleeps until the kernel says there is data, or `timeout_ms`;
        True when there is."""
        if self._poller is None:
            return self.available() > 0
        try:
            return bool(self._poller.poll(timeout_ms))
        except InterruptedError:
            return False
        except OSError as e:
            if e.errno == errno.EINTR:
                return False
            raise

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Waits up to `timeout_ms` for records, then returns all of them."""
        if self.available() == 0:
            self.wait(timeout_ms)
        return self.consume()

    def close(self) -> None:
        if self._data is None:
            return
        self._data.release()
        self._data = None
        self._consumer = self._producer = None
        for addr, length in self._unmap:
            _libc.munmap(addr, length)
        self._unmap = []
        if self._poller is not None and self.fd is not None:
            try:
                self._poller.unregister(self.fd)
            except (KeyError, ValueError, OSError):
                pass
        self._poller = None
