"""A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux).

Two uses: the BTF id of a function (what an fentry program attaches to),
and struct field offsets of the *running* kernel, for BPF programs compiled
against headers of another version. Format: the
kernel's Documentation/bpf/btf.rst; only what those uses need is decoded.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

__all__ = ["BTF", "BTFError", "Member"]

BTF_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

# bytes that follow the 12-byte common header, per kind: (fixed, per vlen item)
_TRAILER = {
    INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12),
}
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BTFError(Exception):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


#: (path, size, mtime) -> BTF: one parse per process (from_file)
_PARSED: dict = {}


class BTF:
    def __init__(self, data: bytes, source: str = "BTF"):
        if len(data) < 24:
            raise BTFError(f"{source}: too short to be BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"{source}: bad magic {magic:#x}; expected a BTF blob")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._data = data
        # index -> (name_off, kind, vlen, kind_flag, size_or_type, trailer offset)
        self._types: list[tuple[int, int, int, int, int, int]] = [(0, 0, 0, 0, 0, 0)]
        self._by_off: dict[int, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            self._types.append((name_off, kind, vlen, kflag, size_or_type, pos + 12))
            pos += 12 + fixed + per_item * vlen
        self._source = source

    @classmethod
    def from_file(cls, path: str = "/sys/kernel/btf/vmlinux") -> "BTF":
        """The BTF of ``path``, parsed once per process (doctor's detection
        and the session both read vmlinux's: parsing it is most of a
        start-up in a TCG guest)."""
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
            hit = _PARSED.get(key)
            if hit is not None:
                return hit
            with open(path, "rb") as f:
                btf = cls(f.read(), source=path)
        except OSError as e:
            raise BTFError(f"{path}: {e.strerror}; the kernel needs CONFIG_DEBUG_INFO_BTF=y") from e
        _PARSED.clear()
        _PARSED[key] = btf
        return btf

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _index_offsets(self) -> None:
        # by string offset, not by name: decoding every name cost more than
        # the lookups it served
        if self._by_off:
            return
        by = self._by_off
        for type_id in range(1, len(self._types)):
            name_off = self._types[type_id][0]
            if name_off:
                ids = by.get(name_off)
                if ids is None:
                    by[name_off] = [type_id]
                else:
                    ids.append(type_id)

    def _offsets_of(self, name: str):
        """Every offset in the string table holding ``name`` (each string
        follows a NUL: the table starts with the empty string)."""
        needle = b"\0" + name.encode() + b"\0"
        at = self._strings.find(needle)
        while at != -1:
            yield at + 1
            at = self._strings.find(needle, at + 1)

    def find(self, name: str, kind: int) -> int | None:
        self._index_offsets()
        for off in self._offsets_of(name):
            for type_id in self._by_off.get(off, ()):
                if self._types[type_id][1] == kind:
                    return type_id
        return None

    def func_id(self, name: str) -> int | None:
        return self.find(name, FUNC)

    def func_param_count(self, name: str) -> int | None:
        """How many parameters a function takes (fexit's return value
        follows them in the program's context)."""
        type_id = self.func_id(name)
        if type_id is None:
            return None
        proto = self._types[type_id][4]
        return self._types[proto][2]

    def func_param_size(self, name: str, index: int) -> int | None:
        """The size in bytes of a function's parameter ``index`` (a bool is
        1: a trampoline or pt_regs slot holds it in a 64-bit register whose
        upper bits are not cleared)."""
        type_id = self.func_id(name)
        if type_id is None:
            return None
        proto = self._types[type_id][4]
        _, _, vlen, _, _, trailer = self._types[proto]
        if not 0 <= index < vlen:
            return None
        _name, ptype = struct.unpack_from("<II", self._data, trailer + 8 * index)
        t = self._resolve(ptype)
        kind = self._types[t][1]
        if kind == PTR:
            return 8
        if kind in (INT, ENUM, ENUM64):
            return self._types[t][4]
        return None

    def raw_tracepoint_params(self, name: str) -> list[str] | None:
        """Kinds ("ptr", "int", ...) of a tracepoint's arguments as a raw
        tracepoint gets them: typedef btf_trace_<name> is a pointer to its
        prototype, whose first parameter (void *data) is left out."""
        type_id = self.find(f"btf_trace_{name}", TYPEDEF)
        if type_id is None:
            return None
        t = self._resolve(type_id)
        if self._types[t][1] != PTR:
            return None
        proto = self._types[t][4]
        _, kind, vlen, _, _, trailer = self._types[proto]
        out = []
        for i in range(1, vlen):
            _name, ptype = struct.unpack_from("<II", self._data, trailer + 8 * i)
            k = self._types[self._resolve(ptype)][1]
            out.append({PTR: "ptr", INT: "int", ENUM: "int"}.get(k, "other"))
        return out

    def enum_value(self, enumerator: str) -> int | None:
        """The value of an enumerator (e.g. memory_cgrp_id) in any enum."""
        for type_id in range(1, len(self._types)):
            _, kind, vlen, _, _, trailer = self._types[type_id]
            if kind == ENUM:
                for i in range(vlen):
                    name_off, value = struct.unpack_from("<Ii", self._data, trailer + 8 * i)
                    if self._name(name_off) == enumerator:
                        return value
            elif kind == ENUM64:
                for i in range(vlen):
                    name_off, lo, hi = struct.unpack_from("<III", self._data, trailer + 12 * i)
                    if self._name(name_off) == enumerator:
                        return lo | (hi << 32)
        return None

    def enumerators(self, enum_name: str) -> dict[int, str]:
        """value -> name for one named enum (e.g. vm_event_item)."""
        type_id = self.find(enum_name, ENUM)
        if type_id is None:
            return {}
        _, _, vlen, _, _, trailer = self._types[type_id]
        out = {}
        for i in range(vlen):
            name_off, value = struct.unpack_from("<Ii", self._data, trailer + 8 * i)
            out.setdefault(value, self._name(name_off))
        return out

    def members(self, type_id: int) -> list[Member]:
        _, kind, vlen, kflag, _, trailer = self._types[type_id]
        if kind not in (STRUCT, UNION):
            raise BTFError(f"{self._source}: type {type_id} is not a struct or union")
        out = []
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, trailer + 12 * i)
            bit_offset = offset & 0xFFFFFF if kflag else offset
            out.append(Member(self._name(name_off) if name_off else "", mtype, bit_offset))
        return out

    def _resolve(self, type_id: int) -> int:
        while self._types[type_id][1] in _MODIFIERS:
            type_id = self._types[type_id][4]
        return type_id

    def pointee(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        if self._types[type_id][1] != PTR:
            raise BTFError(f"{self._source}: type {type_id} is not a pointer")
        return self._resolve(self._types[type_id][4])

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path inside a struct, through
        embedded (not pointed-to) members and anonymous unions:
        offsetof("mem_cgroup", "memory.usage")."""
        type_id = self.find(struct_name, STRUCT)
        if type_id is None:
            raise BTFError(f"{self._source}: no struct {struct_name}")
        total_bits = 0
        for part in path.split("."):
            found = self._find_member(type_id, part)
            if found is None:
                raise BTFError(f"{self._source}: struct {struct_name} has no member {path!r}")
            bits, type_id = found
            total_bits += bits
            type_id = self._resolve(type_id)
        if total_bits % 8:
            raise BTFError(f"{self._source}: {struct_name}.{path} is a bit field")
        return total_bits // 8

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        for m in self.members(type_id):
            if m.name == name:
                return m.bit_offset, m.type_id
            if not m.name:  # anonymous struct/union: look inside
                inner = self._resolve(m.type_id)
                if self._types[inner][1] in (STRUCT, UNION):
                    found = self._find_member(inner, name)
                    if found is not None:
                        return m.bit_offset + found[0], found[1]
        return None
