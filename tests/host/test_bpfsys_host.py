"""The collector's own bpf(2) readers against real kernel objects on this
host: a BPF ring buffer read through mmap (probes/ringbuf.py) and hash,
per-CPU hash and per-CPU array maps read and pruned through bpf(2)
(probes/maps.py), each compared with what the kernel was made to hold.

The objects come from a small program compiled here with bcc (the test
process may import bcc; the collector never does) and driven with
BPF_PROG_TEST_RUN, so every record and entry is known in advance."""

from __future__ import annotations

import ctypes
import os
import struct
import time

import pytest

from memcgscope.probes import bpfsys
from memcgscope.probes.bpfsys import possible_cpus, prog_test_run
from memcgscope.probes.detect import bcc_kernel_source
from memcgscope.probes.maps import BpfMap, Layout, MapError
from memcgscope.probes.ringbuf import RingBuffer
from memcgscope.probes.sysroot import SysRoot

PROGRAM = r"""
struct pair { u64 cgid; u32 kind; s32 ret; };
struct stat { u64 calls; u64 ns; s64 sum; u32 small; };
BPF_RINGBUF_OUTPUT(rb, 1);                       // one page: 4096 bytes of data
BPF_HASH(byid, struct pair, struct stat, 4096);
BPF_PERCPU_HASH(percpu, u64, struct stat, 1024);
BPF_PERCPU_ARRAY(counter, u64, 4);
struct blob { char b[2048]; };
BPF_ARRAY(buf, struct blob, 1);                  // one for every CPU: the runs are sequential

// args: 0 = what (1 output, 2 discard, 3 fill maps), 1 = size or count, 2 = seq
int drv(struct bpf_raw_tracepoint_args *ctx) {
    u64 what = ctx->args[0], n = ctx->args[1], seq = ctx->args[2];
    int zero = 0;
    if (what == 1) {
        struct blob *bl = buf.lookup(&zero);
        if (!bl) return 0;
        char *b = bl->b;
        u32 len = n & 2047;
        for (int i = 0; i < 16; i++) b[i] = (char)(seq + i);
        if (len > 0) b[len - 1] = (char)seq;
        rb.ringbuf_output(b, len, 0);
    } else if (what == 2) {
        u64 *r = rb.ringbuf_reserve(40);
        if (r) { *r = seq; rb.ringbuf_discard(r, 0); }
    } else if (what == 3) {
        for (u32 i = 0; i < 200; i++) {
            if (i >= n) break;
            struct pair k = {.cgid = seq + i, .kind = i & 3, .ret = -(s32)i};
            struct stat v = {.calls = i, .ns = i * 1000, .sum = -(s64)i, .small = i + 7};
            byid.update(&k, &v);
            u64 pk = seq + i;
            struct stat pv = {.calls = 1, .ns = i, .sum = 1, .small = 1};
            struct stat *old = percpu.lookup(&pk);
            if (old) { old->calls += 1; old->ns += i; } else percpu.update(&pk, &pv);
        }
        int idx = 2;
        u64 *c = counter.lookup(&idx);
        if (c) *c += n;
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def prog():
    from bcc import BPF
    source = bcc_kernel_source(SysRoot("/"))
    if source:
        os.environ["BCC_KERNEL_SOURCE"] = source
    b = BPF(text=PROGRAM, cflags=["-Wno-unused-function"])
    fd = b.load_func("drv", BPF.RAW_TRACEPOINT).fd
    yield b, fd
    b.cleanup()


def run(fd: int, *args: int) -> None:
    vals = list(args) + [0] * (6 - len(args))
    prog_test_run(fd, struct.pack("<6Q", *vals))


class Blob:
    """The program's buffer, written here as the program writes it."""

    def __init__(self):
        self.b = bytearray(2048)

    def record(self, n: int, seq: int) -> bytes:
        for i in range(16):
            self.b[i] = (seq + i) & 0xFF
        if n:
            self.b[n - 1] = seq & 0xFF
        return bytes(self.b[:n])


BLOB = Blob()


def bcc_map(b, name):
    """A BpfMap over bcc's table, with the layouts the loader would send."""
    t = b[name]
    fd = os.dup(t.map_fd)
    return BpfMap(name, fd, Layout.from_ctype(t.Key), Layout.from_ctype(getattr(t, "sLeaf", t.Leaf)))


def test_the_ring_buffer_reads_every_record_over_many_laps(prog):
    b, fd = prog
    info = bpfsys.map_info(b["rb"].map_fd)
    assert info.type == 27 and info.max_entries == 4096
    ring = RingBuffer.open(b["rb"].map_fd, info.max_entries)
    try:
        assert ring.consume() == []
        assert not ring.wait(50), "no data: poll(2) waits out its timeout"
        sizes = [0, 1, 7, 8, 9, 15, 100, 1000, 2040, 333, 4, 1500, 64]
        sent, got = [], []
        seq = 0
        for lap in range(40):        # ~40 x 6 KB through a 4 KB buffer
            for n in sizes:
                seq += 1
                if seq % 5 == 0:
                    run(fd, 2, 0, seq)              # reserved, then discarded
                run(fd, 1, n, seq)
                sent.append(BLOB.record(n, seq))
                if ring.available() > 2048:
                    got += ring.consume()
            t0 = time.monotonic()
            assert ring.wait(1000) and time.monotonic() - t0 < 0.5, "data waiting: poll(2) returns at once"
            got += ring.consume()
        assert got == sent
        assert ring.discarded == seq // 5
        assert ring.available() == 0
    finally:
        ring.close()


def test_a_full_ring_buffer_drops_and_recovers(prog):
    b, fd = prog
    ring = RingBuffer.open(b["rb"].map_fd, 4096)
    try:
        sent = []
        for seq in range(10):
            run(fd, 1, 1000, seq)              # 1008 bytes each: four fit
            sent.append(BLOB.record(1000, seq))
        got = ring.consume()
        assert got == sent[:4]
        run(fd, 1, 10, 77)
        assert ring.consume() == [BLOB.record(10, 77)]
    finally:
        ring.close()


def test_maps_read_as_bcc_reads_them_batched_or_key_by_key(prog):
    b, fd = prog
    run(fd, 3, 150, 1000)
    run(fd, 3, 20, 1000)               # the first 20 again: percpu calls 2
    byid, percpu, counter = bcc_map(b, "byid"), bcc_map(b, "percpu"), bcc_map(b, "counter")
    try:
        theirs = {(int(k.cgid), int(k.kind), int(k.ret)): (int(v.calls), int(v.ns), int(v.sum), int(v.small))
                  for k, v in b["byid"].items()}
        assert len(theirs) == 150
        for batched in (True, False):
            byid._batch = batched
            mine = {tuple(k): tuple(v) for k, v in byid.items()}
            assert byid._batch == batched, "this kernel (5.6+) has batch lookups: no fallback"
            assert mine == theirs
            assert mine[(1000 + 7, 3, -7)] == (7, 7000, -7, 14)
        assert percpu.percpu and percpu.ncpus == possible_cpus()
        for batched in (True, False):
            percpu._batch = batched
            mine = {k: [tuple(x) for x in v] for k, v in percpu.items()}
            assert percpu._batch == batched
            theirs_pc = {int(k.value): [(int(x.calls), int(x.ns), int(x.sum), int(x.small)) for x in v]
                         for k, v in b["percpu"].items()}
            assert mine == theirs_pc
            assert sum(x[0] for x in mine[1005]) == 2
        assert counter.array_sum(2) == 170 and counter.array_sum(0) == 0
        assert percpu.lookup(1003) is not None and percpu.lookup(999_999) is None
    finally:
        byid.close(), percpu.close(), counter.close()


def test_deleting_steps_over_keys_that_are_gone(prog):
    b, fd = prog
    run(fd, 3, 100, 50_000)
    m = bcc_map(b, "byid")
    try:
        for batched in (True, False):
            m._batch = batched
            entries = [e for e in m.entries() if 50_000 <= e[1].cgid < 50_100]
            raws = [raw for raw, k, _ in entries if k.cgid % 2 == 0]
            ghost = Layout.pack(m.key, (123_456_789, 0, 0))
            # a key that is not there in the middle of the batch
            n = m.delete_raw(raws[:10] + [ghost] + raws[10:])
            assert m._batch == batched
            assert n == len(raws) == 50
            left = [k for k in m.keys() if 50_000 <= k.cgid < 50_100]
            assert len(left) == 50 and all(k.cgid % 2 for k in left)
            run(fd, 3, 100, 50_000)      # refill for the other path
    finally:
        m.close()


def test_a_layout_that_does_not_fit_its_map_is_refused_naming_it(prog):
    b, _fd = prog
    t = b["byid"]
    fd = os.dup(t.map_fd)
    wrong = Layout("stat", 24, (("calls", 0, "Q"), ("ns", 8, "Q"), ("sum", 16, "q")))
    try:
        with pytest.raises(MapError, match=r"map byid: the kernel holds keys of 16 and values of 32 bytes.*says 16 \(pair\) and 24 \(stat\)"):
            BpfMap("byid", fd, Layout.from_ctype(t.Key), wrong)
    finally:
        os.close(fd)
