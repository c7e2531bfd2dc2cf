"""The BTF reader over a hand-built blob laid out as the kernel's
Documentation/bpf/btf.rst describes (and, where this host has BTF, the
offsets bpftool reports are checked in tests/host)."""

from __future__ import annotations

import struct

import pytest

from memcgscope.probes.btf import BTF, BTFError, FUNC, INT, PTR, STRUCT, UNION, FUNC_PROTO


class Builder:
    def __init__(self):
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, name, kind, vlen=0, size_or_type=0, trailer=b"", kflag=0) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + trailer
        self.count += 1
        return self.count

    def struct(self, name, size, members, kind=STRUCT):
        trailer = b"".join(struct.pack("<III", self.s(n), t, bits) for n, t, bits in members)
        return self.add(name, kind, len(members), size, trailer)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def sample() -> bytes:
    b = Builder()
    long_t = b.add("long", INT, 0, 8, struct.pack("<I", 64))
    pc = b.struct("page_counter", 128, [("usage", long_t, 0), ("max", long_t, 64 * 8)])
    kn = b.struct("kernfs_node", 128, [("parent", long_t, 0), ("id", long_t, 96 * 8)])
    kn_ptr = b.add("", PTR, 0, kn)
    cg = b.struct("cgroup", 512, [("self", long_t, 0), ("kn", kn_ptr, 256 * 8)])
    cg_ptr = b.add("", PTR, 0, cg)
    css = b.struct("cgroup_subsys_state", 200, [("cgroup", cg_ptr, 0)])
    anon = b.struct("", 256, [("memory", pc, 0), ("swap", pc, 0)], kind=UNION)
    b.struct("mem_cgroup", 1024, [("css", css, 0), ("", anon, 256 * 8), ("memsw", pc, 512 * 8)])
    proto = b.add("", FUNC_PROTO, 0, long_t)
    b.add("try_charge_memcg", FUNC, 0, proto)
    return b.blob()


def test_offsets_through_embedded_structs_and_anonymous_unions():
    btf = BTF(sample())
    assert btf.offsetof("mem_cgroup", "memory.usage") == 256
    assert btf.offsetof("mem_cgroup", "memory.max") == 256 + 64
    assert btf.offsetof("mem_cgroup", "memsw.max") == 512 + 64
    assert btf.offsetof("mem_cgroup", "css.cgroup") == 0
    assert btf.offsetof("cgroup", "kn") == 256
    assert btf.offsetof("kernfs_node", "id") == 96


def test_function_ids_and_pointers():
    btf = BTF(sample())
    fid = btf.func_id("try_charge_memcg")
    assert fid is not None and btf.func_id("no_such_function") is None
    cgroup_id = btf.find("cgroup", STRUCT)
    kn_member = next(m for m in btf.members(cgroup_id) if m.name == "kn")
    assert btf.pointee(kn_member.type_id) == btf.find("kernfs_node", STRUCT)


def test_errors_name_the_problem():
    with pytest.raises(BTFError, match="bad magic"):
        BTF(b"\0" * 32, source="x.btf")
    with pytest.raises(BTFError, match="has no member 'memory.nope'"):
        BTF(sample()).offsetof("mem_cgroup", "memory.nope")
    with pytest.raises(BTFError, match="no struct nope"):
        BTF(sample()).offsetof("nope", "x")
    with pytest.raises(BTFError, match="CONFIG_DEBUG_INFO_BTF"):
        BTF.from_file("/no/such/vmlinux")
