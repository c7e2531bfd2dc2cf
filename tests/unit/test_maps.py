"""probes/maps.py without a kernel: layouts from ctypes types (as bcc builds
them from the compiler's description), packing and decoding, per-CPU
values, the size check against the kernel's map info, and the fallback from
batch operations to key-by-key (bpfsys replaced by an in-memory map)."""

from __future__ import annotations

import ctypes
import struct

import pytest

from memcgscope.probes import bpfsys, maps
from memcgscope.probes.bpfsys import BatchUnsupported, MapInfo
from memcgscope.probes.maps import BpfMap, Layout, MapError

pytestmark = pytest.mark.unit


class ChargeStat(ctypes.Structure):      # struct charge_stat of memcgscope.bpf.c
    _fields_ = [("cgid", ctypes.c_ulonglong), ("calls", ctypes.c_ulonglong), ("pages", ctypes.c_ulonglong),
                ("slow", ctypes.c_ulonglong), ("fail_enomem", ctypes.c_ulonglong),
                ("fail_eintr", ctypes.c_ulonglong), ("fail_other", ctypes.c_ulonglong), ("ns", ctypes.c_ulonglong)]


class LimitKey(ctypes.Structure):        # struct limit_key: a signed field
    _fields_ = [("cgid", ctypes.c_ulonglong), ("kind", ctypes.c_uint), ("ret", ctypes.c_int)]


class Padded(ctypes.Structure):          # implicit padding after `small`, a nested array
    _fields_ = [("small", ctypes.c_ubyte), ("big", ctypes.c_ulonglong), ("comm", ctypes.c_char * 16),
                ("__pad_0", ctypes.c_ubyte * 4), ("last", ctypes.c_short)]


def test_layouts_follow_the_ctypes_offsets_and_round_trip():
    lk = Layout.from_ctype(LimitKey)
    assert lk.size == 16 and lk.fields == (("cgid", 0, "Q"), ("kind", 8, "I"), ("ret", 12, "i"))
    raw = bytes(LimitKey(123, 2, -16))
    k = lk.unpack(raw)
    assert (k.cgid, k.kind, k.ret) == (123, 2, -16)
    assert lk.pack(k) == raw and lk.pack({"cgid": 123, "kind": 2, "ret": -16}) == raw

    p = Layout.from_ctype(Padded)
    assert p.size == ctypes.sizeof(Padded)
    assert [f for f, _, _ in p.fields] == ["small", "big", "comm", "last"]
    v = Padded(7, 2**63 + 5, b"dd", (0, 0, 0, 0), -3)
    got = p.unpack(bytes(v))
    assert (got.small, got.big, got.comm.rstrip(b"\0"), got.last) == (7, 2**63 + 5, b"dd", -3)

    u64 = Layout.from_ctype(ctypes.c_ulonglong)
    assert u64.unpack(struct.pack("=Q", 2**64 - 1)) == 2**64 - 1 and u64.pack(9) == struct.pack("=Q", 9)
    assert Layout.from_ctype(ctypes.c_int).unpack(struct.pack("=i", -1)) == -1
    assert Layout.from_wire(lk.to_wire()) == lk


def test_a_layout_whose_fields_overlap_or_overrun_is_refused():
    with pytest.raises(MapError, match="type bad: field b at 4\\+8 overlaps"):
        Layout("bad", 16, (("a", 0, "Q"), ("b", 4, "Q")))
    with pytest.raises(MapError, match="field b at 8\\+8 overlaps another or ends past its 12 bytes"):
        Layout("short", 12, (("a", 0, "Q"), ("b", 8, "Q")))


class FakeKernel:
    """An in-memory hash map behind bpfsys' calls (raw key -> raw value)."""

    def __init__(self, monkeypatch, batch=True):
        self.data: dict[bytes, bytes] = {}
        self.batch_calls = 0
        ks, vs = None, None

        def lookup_batch(fd, key_size, value_size, chunk=256):
            if not batch:
                raise BatchUnsupported("Invalid argument")
            self.batch_calls += 1
            items = list(self.data.items())
            return b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)

        def delete_batch(fd, keys):
            if not batch:
                raise BatchUnsupported("Invalid argument")
            self.batch_calls += 1
            return sum(self.data.pop(k, None) is not None for k in keys)

        def get_next_key(fd, key, key_size):
            keys = list(self.data)
            if key is None or key not in self.data:
                return keys[0] if keys else None
            i = keys.index(key)
            return keys[i + 1] if i + 1 < len(keys) else None

        monkeypatch.setattr(bpfsys, "map_lookup_batch", lookup_batch)
        monkeypatch.setattr(bpfsys, "map_delete_batch", delete_batch)
        monkeypatch.setattr(bpfsys, "map_get_next_key", get_next_key)
        monkeypatch.setattr(bpfsys, "map_lookup", lambda fd, key, size: self.data.get(key))
        monkeypatch.setattr(bpfsys, "map_delete", lambda fd, key: self.data.pop(key, None) is not None)


def percpu_value(ncpus: int, per_cpu: list[ChargeStat]) -> bytes:
    # each CPU's copy rounded up to 8 bytes (64 already is)
    return b"".join(bytes(v) for v in per_cpu[:ncpus])


@pytest.mark.parametrize("batch", [True, False])
def test_per_cpu_values_come_one_per_cpu_batched_or_key_by_key(monkeypatch, batch):
    k = FakeKernel(monkeypatch, batch=batch)
    info = MapInfo(maps.PERCPU_HASH, 1, 8, ctypes.sizeof(ChargeStat), 64, "charge_stats")
    m = BpfMap("charge_stats", -1, Layout.from_ctype(ctypes.c_ulonglong), Layout.from_ctype(ChargeStat),
               info=info, ncpus=3)
    assert m.percpu and m.elem_size == 3 * 64
    k.data[struct.pack("=Q", 0xffff0001)] = percpu_value(3, [ChargeStat(5, 1), ChargeStat(5, 2), ChargeStat(0, 3)])
    k.data[struct.pack("=Q", 0xffff0002)] = percpu_value(3, [ChargeStat(6, 10)] * 3)
    items = dict(m.items())
    assert sorted(items) == [0xffff0001, 0xffff0002]
    assert [v.calls for v in items[0xffff0001]] == [1, 2, 3] and [v.cgid for v in items[0xffff0001]] == [5, 5, 0]
    assert m._batch == batch and (k.batch_calls > 0) == batch
    raws = [raw for raw, key, _ in m.entries() if key == 0xffff0001]
    assert m.delete_raw(raws + [struct.pack("=Q", 42)]) == 1
    assert list(dict(m.items())) == [0xffff0002]


def test_a_kernel_without_batch_operations_falls_back_once(monkeypatch):
    k = FakeKernel(monkeypatch, batch=False)
    info = MapInfo(maps.HASH, 1, 16, 8, 64, "limit_stats")
    m = BpfMap("limit_stats", -1, Layout.from_ctype(LimitKey), Layout.from_ctype(ctypes.c_ulonglong), info=info)
    assert m._batch
    k.data[bytes(LimitKey(1, 2, -16))] = struct.pack("=Q", 4)
    assert [(tuple(key), v) for key, v in m.items()] == [((1, 2, -16), 4)]
    assert m._batch is False       # BatchUnsupported turned it off for good


def test_arrays_are_read_key_by_key_and_summed_over_cpus(monkeypatch):
    k = FakeKernel(monkeypatch)
    info = MapInfo(maps.PERCPU_ARRAY, 1, 4, 8, 13, "map_full")
    m = BpfMap("map_full", -1, Layout.from_ctype(ctypes.c_int), Layout.from_ctype(ctypes.c_ulonglong),
               info=info, ncpus=4)
    assert not m._batch
    k.data[struct.pack("=i", 3)] = struct.pack("=4Q", 1, 2, 3, 4)
    assert m.array_sum(3) == 10 and m.array_sum(0) == 0


def test_a_layout_that_does_not_fit_the_kernels_map_names_the_map():
    info = MapInfo(maps.HASH, 1, 16, 32, 64, "reclaim_stats")
    with pytest.raises(MapError, match="map reclaim_stats: the kernel holds keys of 16 and values of 32 bytes, "
                                       "the layout from the loader says 16 \\(LimitKey\\) and 8"):
        BpfMap("reclaim_stats", -1, Layout.from_ctype(LimitKey), Layout.from_ctype(ctypes.c_ulonglong), info=info)


def test_a_walk_that_restarts_under_deletion_still_ends_with_each_key_once(monkeypatch):
    k = FakeKernel(monkeypatch)
    info = MapInfo(maps.HASH, 1, 4, 8, 8, "tasks")
    m = BpfMap("tasks", -1, Layout.from_ctype(ctypes.c_uint), Layout.from_ctype(ctypes.c_ulonglong), info=info)
    for tid in range(5):
        k.data[struct.pack("=I", tid)] = struct.pack("=Q", 0)
    real = bpfsys.map_get_next_key
    calls = []

    def deleting(fd, key, size):
        calls.append(key)
        if len(calls) == 3:                 # the BPF side frees the current key
            k.data.pop(key, None)
        return real(fd, key, size)

    monkeypatch.setattr(bpfsys, "map_get_next_key", deleting)
    assert sorted(m.keys()) == [0, 1, 2, 3, 4]
    assert len(calls) <= 2 * 8 + 2


def test_possible_cpus_counts_up_to_the_highest_possible_one(tmp_path):
    # per-CPU values hold a slot for every possible CPU, holes included
    for text, n in (("0\n", 1), ("0-3\n", 4), ("0-3,8-9\n", 10), ("0,2\n", 3)):
        (tmp_path / "possible").write_text(text)
        assert bpfsys.possible_cpus(str(tmp_path / "possible")) == n


def test_bpf_stats_enabled_is_a_context_manager_that_restores(tmp_path):
    """kernel.bpf_stats_enabled on for a block, the old value back after (a
    decorator moved onto the wrong function once broke `memcgscope run`)."""
    from memcgscope.probes.bpfsys import bpf_stats_enabled, prog_run_stats
    f = tmp_path / "bpf_stats_enabled"
    f.write_text("0\n")
    with bpf_stats_enabled(str(f)) as on:
        assert on and f.read_text().strip() == "1"
    assert f.read_text().strip() == "0"
    with pytest.raises(OSError):
        prog_run_stats(10 ** 6)      # not an open fd
