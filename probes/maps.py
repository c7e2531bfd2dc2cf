"""BPF maps read and pruned through bpf(2) (probes/bpfsys.py), with the key
and value layouts of the C structs in memcgscope.bpf.c.

Where the layouts come from: the loader (probes/loader.py) compiles the
program and reads each map's key and value types from the compiler, as bcc
describes them (the same types bcc's own tables decode with), and hands them
over as `Layout`s next to the map's fd. memcgscope.bpf.c stays the one
definition of its structs; nothing here repeats them. `BpfMap` checks each
layout's size against what the kernel says the map holds (key_size,
value_size), so a layout that does not fit its map is an error naming the
map, never a misread.
"""

from __future__ import annotations

import ctypes
import struct
from collections import namedtuple
from dataclasses import dataclass

from . import bpfsys

__all__ = ["Layout", "BpfMap", "MapError", "field_code"]

# BPF_MAP_TYPE_*: the kinds the session reads
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH = 1, 2, 5, 6, 9, 10
RINGBUF = 27
PERCPU_TYPES = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
HASH_TYPES = {HASH, PERCPU_HASH, LRU_HASH, LRU_PERCPU_HASH}

_SCALARS = {("u", 1): "B", ("s", 1): "b", ("u", 2): "H", ("s", 2): "h", ("u", 4): "I", ("s", 4): "i",
            ("u", 8): "Q", ("s", 8): "q"}


class MapError(Exception):
    """One line: which map, what does not fit."""


def field_code(signed: bool | None, size: int) -> str:
    """The struct-module code of an integer field (signed None: raw bytes)."""
    if signed is None:
        return f"{size}s"
    code = _SCALARS.get(("s" if signed else "u", size))
    if code is None:
        return f"{size}s"
    return code


@dataclass(frozen=True)
class Layout:
    """A C type as the compiler laid it out: its size and its fields
    (name, byte offset, struct code). A scalar is one field named ""."""
    name: str
    size: int
    fields: tuple

    def __post_init__(self):
        fmt, pos = "=", 0
        for fname, off, code in self.fields:
            width = struct.calcsize("=" + code)
            if off < pos or off + width > self.size:
                raise MapError(f"type {self.name}: field {fname or '(value)'} at {off}+{width} "
                               f"overlaps another or ends past its {self.size} bytes")
            if off > pos:
                fmt += f"{off - pos}x"
            fmt += code
            pos = off + width
        if pos < self.size:
            fmt += f"{self.size - pos}x"
        object.__setattr__(self, "_struct", struct.Struct(fmt))
        scalar = len(self.fields) == 1 and self.fields[0][0] == ""
        object.__setattr__(self, "_scalar", scalar)
        if not scalar:
            names = [f for f, _, _ in self.fields]
            object.__setattr__(self, "_tuple", namedtuple(_ident(self.name), names, rename=True))

    @classmethod
    def scalar(cls, name: str, size: int, signed: bool = False) -> "Layout":
        return cls(name, size, (("", 0, field_code(signed, size)),))

    @classmethod
    def from_ctype(cls, t) -> "Layout":
        """A ctypes type, as bcc decodes a table's key or leaf from the
        compiler's description: a Structure's fields at their offsets
        (nested structs and arrays as raw bytes), or a scalar."""
        size = ctypes.sizeof(t)
        if isinstance(t, type) and issubclass(t, ctypes.Structure):
            fields = []
            for f in t._fields_:
                name, ft = f[0], f[1]
                if len(f) > 2:   # a bitfield: the struct as raw bytes
                    return cls(t.__name__, size, (("raw", 0, f"{size}s"),))
                if name.startswith("__pad"):
                    continue
                fields.append((name, getattr(t, name).offset, _ctype_code(ft)))
            return cls(t.__name__, size, tuple(fields))
        return cls(getattr(t, "__name__", "value"), size, (("", 0, _ctype_code(t)),))

    def unpack(self, buf, offset: int = 0):
        """An int for a scalar, else a named tuple of the fields."""
        values = self._struct.unpack_from(buf, offset)
        if self._scalar:
            return values[0]
        return self._tuple._make(values)

    def pack(self, value) -> bytes:
        if self._scalar:
            return self._struct.pack(value)
        if isinstance(value, dict):
            value = [value.get(f, 0) for f, _, _ in self.fields]
        return self._struct.pack(*value)

    def to_wire(self) -> tuple:
        return (self.name, self.size, tuple(self.fields))

    @classmethod
    def from_wire(cls, t) -> "Layout":
        name, size, fields = t
        return cls(str(name), int(size), tuple((str(f), int(o), str(c)) for f, o, c in fields))


def _ctype_code(t) -> str:
    code = getattr(t, "_type_", None)
    if isinstance(code, str) and len(code) == 1 and code in "bBhHiIlLqQ?c":
        return field_code(code in "bhilq", ctypes.sizeof(t))
    return field_code(None, ctypes.sizeof(t))


def _ident(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name) or "T"
    return out if not out[0].isdigit() else "T" + out


class BpfMap:
    """One map, by fd. Per-CPU maps give a list of values, one per possible
    CPU. The fd is this object's: `close()` releases it."""

    def __init__(self, name: str, fd: int, key: Layout, value: Layout, *, info=None, ncpus: int | None = None):
        self.name = name
        self.fd = fd
        self.key = key
        self.value = value
        info = info if info is not None else bpfsys.map_info(fd)
        self.type = info.type
        self.max_entries = info.max_entries
        if info.key_size != key.size or info.value_size != value.size:
            raise MapError(f"map {name}: the kernel holds keys of {info.key_size} and values of "
                           f"{info.value_size} bytes, the layout from the loader says {key.size} "
                           f"({key.name}) and {value.size} ({value.name}): a memcgscope bug, reading "
                           f"it would misread every entry; please report it with 'memcgscope doctor'")
        self.percpu = info.type in PERCPU_TYPES
        self.ncpus = (ncpus or bpfsys.possible_cpus()) if self.percpu else 1
        # per-CPU values: each CPU's copy rounded up to 8 bytes
        self.stride = (value.size + 7) & ~7 if self.percpu else value.size
        self.elem_size = self.stride * self.ncpus if self.percpu else value.size
        self._batch = info.type in HASH_TYPES   # tried once; off where the kernel refuses

    # --- decoding -----------------------------------------------------------

    def _values(self, buf: bytes, offset: int = 0):
        if not self.percpu:
            return self.value.unpack(buf, offset)
        return [self.value.unpack(buf, offset + cpu * self.stride) for cpu in range(self.ncpus)]

    # --- reading ------------------------------------------------------------

    def lookup(self, key):
        """The value(s) under a key (an int or a tuple/dict of fields), or None."""
        raw = bpfsys.map_lookup(self.fd, self.key.pack(key), self.elem_size)
        return None if raw is None else self._values(raw)

    def raw_keys(self) -> list[bytes]:
        """Every key, as the kernel holds it (BPF_MAP_GET_NEXT_KEY). A key
        deleted under the walk (the BPF side frees task contexts) restarts
        it at the first key (htab_map_get_next_key): keys seen already are
        stepped over, and the walk is bounded."""
        out, seen, key = [], set(), None
        for _ in range(2 * self.max_entries + 2):
            nxt = bpfsys.map_get_next_key(self.fd, key, self.key.size)
            if nxt is None:
                break
            if nxt not in seen:
                seen.add(nxt)
                out.append(nxt)
            key = nxt
        return out

    def keys(self) -> list:
        return [self.key.unpack(k) for k in self.raw_keys()]

    def entries(self) -> list[tuple[bytes, object, object]]:
        """(raw key, key, value) of every entry: in batches where the kernel
        has them (5.6+ for hash maps), else key by key."""
        if self._batch:
            try:
                keys, values, count = bpfsys.map_lookup_batch(self.fd, self.key.size, self.elem_size)
            except bpfsys.BatchUnsupported:
                self._batch = False
            else:
                ks, es = self.key.size, self.elem_size
                return [(keys[i * ks:(i + 1) * ks], self.key.unpack(keys, i * ks), self._values(values, i * es))
                        for i in range(count)]
        out = []
        for raw in self.raw_keys():
            value = bpfsys.map_lookup(self.fd, raw, self.elem_size)
            if value is not None:    # deleted between the walk and the read
                out.append((raw, self.key.unpack(raw), self._values(value)))
        return out

    def items(self) -> list[tuple[object, object]]:
        return [(k, v) for _, k, v in self.entries()]

    def array_sum(self, index: int = 0) -> int:
        """A per-CPU array slot of integers, summed over the CPUs."""
        v = self.lookup(index)
        if v is None:
            return 0
        return sum(v) if self.percpu else v

    # --- pruning ------------------------------------------------------------

    def delete_raw(self, raw_keys: list[bytes]) -> int:
        """Deletes these keys (as entries()/raw_keys() gave them); returns
        how many were there."""
        if not raw_keys:
            return 0
        if self._batch:
            try:
                return bpfsys.map_delete_batch(self.fd, raw_keys)
            except bpfsys.BatchUnsupported:
                self._batch = False
        return sum(bpfsys.map_delete(self.fd, k) for k in raw_keys)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            import os
            os.close(fd)
