"""probes/ringbuf.py over a synthetic ring buffer: a producer written here
the way kernel/bpf/ringbuf.c writes (reserve sets the header's busy bit and
advances producer_pos, commit clears it or marks the record discarded,
payloads wrap at the end of the data area), read by the real reader."""

from __future__ import annotations

import ctypes
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcgscope.probes.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, RingBuffer, RingBufferError

pytestmark = pytest.mark.unit


class Producer:
    """The kernel's side of a ring buffer of `size` bytes, in plain memory."""

    def __init__(self, size: int):
        self.size = size
        self.cons = ctypes.c_uint64(0)
        self.prod = ctypes.c_uint64(0)
        self.data = (ctypes.c_ubyte * size)()
        self.ring = RingBuffer(ctypes.addressof(self.cons), ctypes.addressof(self.prod),
                               ctypes.addressof(self.data), size)

    def _write(self, pos: int, payload: bytes) -> None:
        for i, b in enumerate(payload):
            self.data[(pos + i) & (self.size - 1)] = b

    def _header(self, pos: int, value: int) -> None:
        struct.pack_into("=I", self.data, pos & (self.size - 1), value)

    def reserve(self, n: int) -> int | None:
        """A record of n bytes, busy; its position, or None when full (the
        kernel refuses: bpf_ringbuf_reserve returns NULL)."""
        total = (n + HDR_SIZE + 7) & ~7
        if self.prod.value - self.cons.value + total > self.size:
            return None
        pos = self.prod.value
        self._header(pos, n | BUSY_BIT)
        struct.pack_into("=I", self.data, (pos + 4) & (self.size - 1), 0)   # pg_off
        self.prod.value = pos + total
        return pos

    def commit(self, pos: int, payload: bytes, discard: bool = False) -> None:
        self._write(pos + HDR_SIZE, payload)
        self._header(pos, len(payload) | (DISCARD_BIT if discard else 0))

    def output(self, payload: bytes) -> bool:
        pos = self.reserve(len(payload))
        if pos is None:
            return False
        self.commit(pos, payload)
        return True


def rec(i: int, n: int) -> bytes:
    return bytes((i * 7 + j) & 0xFF for j in range(n))


def test_records_come_in_order_and_the_consumer_catches_up():
    p = Producer(4096)
    sent = [rec(i, 1 + i * 13 % 200) for i in range(12)]
    for r in sent:
        assert p.output(r)
    assert p.ring.consume() == sent
    assert p.cons.value == p.prod.value
    assert p.ring.consume() == []


def test_a_busy_record_stops_reading_until_it_commits():
    p = Producer(4096)
    assert p.output(b"first")
    busy = p.reserve(10)
    assert p.output(b"after the busy one")       # committed, but behind a busy record
    assert p.ring.consume() == [b"first"]
    assert p.cons.value == busy                   # stopped at the busy header
    assert p.ring.consume() == []                 # still busy
    p.commit(busy, b"0123456789")
    assert p.ring.consume() == [b"0123456789", b"after the busy one"]
    assert p.cons.value == p.prod.value


def test_discarded_records_are_skipped_and_counted():
    p = Producer(4096)
    a = p.reserve(40)
    b = p.reserve(24)
    p.commit(a, rec(1, 40), discard=True)
    p.commit(b, rec(2, 24))
    assert p.ring.consume() == [rec(2, 24)]
    assert p.ring.discarded == 1
    assert p.cons.value == p.prod.value


def test_records_that_cross_the_end_of_the_data_area_read_whole():
    p = Producer(256)
    # a payload from 208 on, across the end to 52
    assert p.output(rec(0, 192)) and p.ring.consume() == [rec(0, 192)]
    payload = rec(9, 100)
    pos = p.reserve(100)
    assert pos == 200
    p.commit(pos, payload)
    assert p.ring.consume() == [payload]
    # a header in the last 8 bytes, its payload from the start
    assert p.output(rec(1, 184)) and p.ring.consume() == [rec(1, 184)]
    assert p.cons.value & 255 == 248
    assert p.output(rec(2, 30)) and p.ring.consume() == [rec(2, 30)]


def test_a_full_buffer_refuses_until_the_reader_frees_space():
    p = Producer(256)
    n = 0
    while p.output(rec(n, 56)):
        n += 1
    assert n == 4                       # 4 x (56 + 8) = 256
    got = p.ring.consume(limit=1)
    assert got == [rec(0, 56)]          # one record's space back to the producer
    assert p.output(rec(99, 56)) and not p.output(rec(100, 1))
    assert p.ring.consume() == [rec(i, 56) for i in (1, 2, 3, 99)]


def test_a_header_claiming_more_than_the_buffer_is_an_error_naming_the_position():
    p = Producer(256)
    assert p.output(b"ok")
    p.prod.value += 16
    struct.pack_into("=I", p.data, 16, 10_000)
    with pytest.raises(RingBufferError, match="record at 16 claims 10000 bytes"):
        p.ring.consume()


def test_sizes_that_are_not_a_power_of_two_are_refused():
    c, d = ctypes.c_uint64(), (ctypes.c_ubyte * 96)()
    with pytest.raises(RingBufferError, match="96 is not a power of two"):
        RingBuffer(ctypes.addressof(c), ctypes.addressof(c), ctypes.addressof(d), 96)


def test_a_closed_ring_says_so_and_waiting_without_an_fd_reports_data():
    p = Producer(256)
    assert not p.ring.wait(0)
    p.output(b"x")
    assert p.ring.wait(0) and p.ring.available() == 16
    p.ring.close()
    with pytest.raises(RingBufferError, match="closed"):
        p.ring.consume()


# random schedules of reserves, commits (in any order), discards and reads,
# long enough to lap the buffer many times, against a model: what was
# committed and not discarded, in reserve order, up to the first busy one
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([64, 256, 1024]))
def test_any_schedule_reads_exactly_the_committed_records_in_order(seed, size):
    rnd = random.Random(seed)
    p = Producer(size)
    open_ = []        # reserved, not yet committed: (pos, payload)
    order = []        # every reserved record in reserve order: [pos, payload, state]
    got = []
    crossed = 0
    for seq in range(400):
        op = rnd.choices(["reserve", "commit", "discard", "read"], [4, 3, 1, 2])[0]
        if op == "reserve":
            payload = rec(seq, rnd.randint(1, size // 2 - HDR_SIZE))
            pos = p.reserve(len(payload))
            if pos is not None:
                open_.append((pos, payload))
                order.append([pos, payload, "busy"])
                crossed += (pos & (size - 1)) + HDR_SIZE + len(payload) > size
        elif op in ("commit", "discard") and open_:
            pos, payload = open_.pop(rnd.randrange(len(open_)))
            p.commit(pos, payload, discard=op == "discard")
            next(r for r in order if r[0] == pos)[2] = op
        elif op == "read":
            got += p.ring.consume(limit=rnd.choice([None, 1, 3]))
    got += p.ring.consume()
    assert crossed > 0, "the schedule should wrap records across the end"
    expect = []
    for pos, payload, state in order:
        if state == "busy":
            assert p.cons.value == pos
            break
        if state == "commit":
            expect.append(payload)
    else:
        assert p.cons.value == p.prod.value
    assert got == expect
