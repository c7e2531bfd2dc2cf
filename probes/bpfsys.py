"""Minimal bpf(2) and perf_event_open(2) calls, without compiling C.

The collector reads maps, maps the ring buffer and attaches programs through
these alone (probes/maps.py, probes/ringbuf.py, probes/attach.py): bcc, and
the LLVM it maps, live only in the short-lived loader (probes/loader.py).

`try_fentry(func)` loads the smallest possible fentry program ("return 0")
against a kernel function's BTF id and attaches it, then closes it at once.
That is what `memcgscope doctor` means by "fentry allowed": a policy that
refuses tracing programs (lockdown, an LSM, a sandbox) answers EPERM here,
exactly as it would to bcc's KFUNC_PROBE, but in milliseconds instead of
the seconds a bcc compile takes.

Attribute layouts are union bpf_attr and struct perf_event_attr of
include/uapi/linux/bpf.h and include/uapi/linux/perf_event.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct

__all__ = ["try_fentry", "FentryResult", "prog_test_run", "prog_run_stats", "bpf_stats_enabled", "BPF_STATS", "bpf",
           "MapInfo", "map_info", "map_lookup", "map_delete", "map_get_next_key", "map_lookup_batch",
           "map_delete_batch", "raw_tracepoint_open", "perf_event_open", "perf_event_attach_bpf",
           "possible_cpus", "BatchUnsupported"]

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_BATCH = 24      # Linux 5.6 (hash maps), 5.7 (arrays)
BPF_MAP_DELETE_BATCH = 27
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24

ENOTSUPP = 524  # kernel-internal, leaks to user space from BPF

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
_SYSCALL_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331}
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


class FentryResult:
    def __init__(self, state: str, detail: str, err: int = 0):
        self.state = state  # "ok", "refused", "unsupported", "error"
        self.detail = detail
        self.errno = err

    def __repr__(self) -> str:
        return f"FentryResult({self.state!r}, {self.detail!r})"


def _bpf(cmd: int, attr: ctypes.Array) -> tuple[int, int]:
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    ctypes.set_errno(0)
    ret = _LIBC.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    return ret, ctypes.get_errno()


def bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    """bpf(cmd, attr) → its result; OSError naming `what` on failure."""
    ret, err = _bpf(cmd, attr)
    if ret < 0:
        raise OSError(err, f"{what}: {os.strerror(err) if err != ENOTSUPP else 'not supported'}")
    return ret


def _attr(size: int = 128) -> ctypes.Array:
    return ctypes.create_string_buffer(size)


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


# --- maps -------------------------------------------------------------------

class MapInfo:
    """struct bpf_map_info, the fields the reader checks."""

    def __init__(self, type_: int, id_: int, key_size: int, value_size: int, max_entries: int, name: str):
        self.type, self.id, self.key_size, self.value_size = type_, id_, key_size, value_size
        self.max_entries, self.name = max_entries, name

    def __repr__(self) -> str:
        return (f"MapInfo(type={self.type}, id={self.id}, key_size={self.key_size}, "
                f"value_size={self.value_size}, max_entries={self.max_entries}, name={self.name!r})")


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    attr = _attr(16)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))   # bpf_fd, info_len, info
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD on fd {fd}")
    type_, id_, key_size, value_size, max_entries = struct.unpack_from("=5I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(type_, id_, key_size, value_size, max_entries, name)


def _elem_attr(fd: int, key, value, flags: int = 0) -> ctypes.Array:
    attr = _attr(32)
    # map_fd, pad, key, value (or next_key), flags
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(key), _addr(value), flags)
    return attr


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key` (for per-CPU maps `value_size` covers every
    possible CPU, each rounded up to 8 bytes), or None when there is none."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    ret, err = _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, kbuf, vbuf))
    if ret < 0:
        if err == errno.ENOENT:
            return None
        raise OSError(err, f"BPF_MAP_LOOKUP_ELEM on fd {fd}: {os.strerror(err)}")
    return vbuf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Deletes `key`; False when it was not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    ret, err = _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, kbuf, None))
    if ret < 0:
        if err == errno.ENOENT:
            return False
        raise OSError(err, f"BPF_MAP_DELETE_ELEM on fd {fd}: {os.strerror(err)}")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first with None); None at the end."""
    kbuf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
    nbuf = ctypes.create_string_buffer(key_size)
    ret, err = _bpf(BPF_MAP_GET_NEXT_KEY, _elem_attr(fd, kbuf, nbuf))
    if ret < 0:
        if err == errno.ENOENT:
            return None
        raise OSError(err, f"BPF_MAP_GET_NEXT_KEY on fd {fd}: {os.strerror(err)}")
    return nbuf.raw


class BatchUnsupported(Exception):
    """The kernel or this map type has no batch operations (before 5.6)."""


_NO_BATCH = (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS)


def _batch_attr(fd: int, in_batch, out_batch, keys, values, count: int) -> ctypes.Array:
    attr = _attr(56)
    # in_batch, out_batch, keys, values, count, map_fd, elem_flags, flags
    struct.pack_into("=QQQQIIQQ", attr, 0, _addr(in_batch), _addr(out_batch), _addr(keys), _addr(values),
                     count, fd, 0, 0)
    return attr


def map_lookup_batch(fd: int, key_size: int, value_size: int, chunk: int = 256) -> tuple[bytes, bytes, int]:
    """Every entry of a hash map in BPF_MAP_LOOKUP_BATCH calls: (keys, values,
    count), keys and values packed back to back. BatchUnsupported where the
    kernel has no batch lookup (it arrived in 5.6 for hash maps)."""
    keys, values, total = [], [], 0
    # the batch token is a bucket index for hash maps, a key for arrays
    token_size = max(key_size, 8)
    in_batch = None
    out_batch = ctypes.create_string_buffer(token_size)
    while True:
        kbuf = ctypes.create_string_buffer(key_size * chunk)
        vbuf = ctypes.create_string_buffer(value_size * chunk)
        attr = _batch_attr(fd, in_batch, out_batch, kbuf, vbuf, chunk)
        ret, err = _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        count = struct.unpack_from("=I", attr, 32)[0]
        if ret < 0 and err == errno.ENOSPC and count == 0:
            chunk *= 4     # one bucket holds more than `chunk` entries
            continue
        if ret < 0 and err != errno.ENOENT:
            if err in _NO_BATCH and total == 0:
                raise BatchUnsupported(os.strerror(err))
            raise OSError(err, f"BPF_MAP_LOOKUP_BATCH on fd {fd}: {os.strerror(err)}")
        keys.append(kbuf.raw[:count * key_size])
        values.append(vbuf.raw[:count * value_size])
        total += count
        if ret < 0:        # ENOENT: that was the last batch
            return b"".join(keys), b"".join(values), total
        in_batch = ctypes.create_string_buffer(out_batch.raw, token_size)


def map_delete_batch(fd: int, keys: list[bytes]) -> int:
    """Deletes these keys in BPF_MAP_DELETE_BATCH calls; returns how many
    were there. A missing key stops a batch (ENOENT): it is stepped over.
    BatchUnsupported before 5.6."""
    if not keys:
        return 0
    key_size = len(keys[0])
    deleted, i = 0, 0
    while i < len(keys):
        rest = keys[i:]
        kbuf = ctypes.create_string_buffer(b"".join(rest), key_size * len(rest))
        attr = _batch_attr(fd, None, None, kbuf, None, len(rest))
        ret, err = _bpf(BPF_MAP_DELETE_BATCH, attr)
        count = struct.unpack_from("=I", attr, 32)[0]
        if ret >= 0:
            return deleted + count
        if err == errno.ENOENT:
            deleted += count
            i += count + 1         # the key at `count` was not there
            continue
        if err in _NO_BATCH and deleted == 0 and i == 0:
            raise BatchUnsupported(os.strerror(err))
        raise OSError(err, f"BPF_MAP_DELETE_BATCH on fd {fd}: {os.strerror(err)}")
    return deleted


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs per-CPU map values hold: every possible CPU
    (kernel/bpf/syscall.c bpf_map_value_size uses num_possible_cpus())."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# --- attaching --------------------------------------------------------------

def raw_tracepoint_open(name: str | None, prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: a raw tracepoint program on `name`, or
    (name None) a tracing program (fentry/fexit) on the function its load
    named; the fd returned keeps it attached until it is closed."""
    name_buf = ctypes.create_string_buffer(name.encode()) if name else None
    attr = _attr(16)
    struct.pack_into("=QI", attr, 0, _addr(name_buf), prog_fd)
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr, f"BPF_RAW_TRACEPOINT_OPEN {name or '(fentry/fexit)'}")


PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400              # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408         # _IOW('$', 8, __u32)
PERF_ATTR_SIZE_VER5 = 112


def perf_event_open(type_: int, config: int, config1: int = 0, config2: int = 0, cpu: int = 0) -> int:
    """A perf event counting every run (sample_period 1), for all tasks on
    `cpu` (a tracepoint or probe event with a BPF program runs it on every
    CPU whichever `cpu` opened it); the fd keeps it alive."""
    nr = _SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: unknown on {platform.machine()}")
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE_VER5)
    struct.pack_into("=IIQQ", attr, 0, type_, PERF_ATTR_SIZE_VER5, config, 1)   # type, size, config, sample_period
    struct.pack_into("=I", attr, 48, 1)                                          # wakeup_events
    struct.pack_into("=QQ", attr, 56, config1, config2)
    ctypes.set_errno(0)
    fd = _LIBC.syscall(ctypes.c_long(nr), attr, ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open (type {type_}, config {config}): {os.strerror(err)}")
    return fd


def perf_event_attach_bpf(perf_fd: int, prog_fd: int) -> None:
    """Runs `prog_fd` on the perf event's hits and enables it."""
    import fcntl
    fcntl.ioctl(perf_fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
    fcntl.ioctl(perf_fd, PERF_EVENT_IOC_ENABLE, 0)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_MOV_X, _MOV_K, _ADD_K, _CALL, _EXIT = 0xBF, 0xB7, 0x07, 0x85, 0x95
BPF_FUNC_PROBE_READ_KERNEL = 113
BPF_FUNC_GET_FUNC_ARG = 183
#: how an fentry program reads its arguments (probes/program.py uses the same)
ARG_READS = {
    # nothing: the attach itself
    None: b"",
    # bpf_get_func_arg(ctx, 0, fp - 8): Linux 5.17+
    "helper": _insn(_MOV_X, 6, 1) + _insn(_MOV_X, 1, 6) + _insn(_MOV_K, 2, imm=0) + _insn(_MOV_X, 3, 10)
    + _insn(_ADD_K, 3, imm=-8) + _insn(_CALL, imm=BPF_FUNC_GET_FUNC_ARG),
    # bpf_probe_read_kernel(fp - 8, 8, ctx): the trampoline's saved argument,
    # read as memory (kernels before 5.17)
    "frame": _insn(_MOV_X, 3, 1) + _insn(_MOV_X, 1, 10) + _insn(_ADD_K, 1, imm=-8) + _insn(_MOV_K, 2, imm=8)
    + _insn(_CALL, imm=BPF_FUNC_PROBE_READ_KERNEL),
}


def try_fentry(btf_id: int, args: str | None = None) -> FentryResult:
    """Load and attach a minimal fentry program on the function with
    `btf_id`; with ``args`` ("helper" or "frame") it first reads argument 0
    the way the real program will, so a kernel that refuses that way of
    reading (no bpf_get_func_arg before 5.17) answers here."""
    # [read an argument;] r0 = 0; exit
    insns = ARG_READS[args] + _insn(_MOV_K, 0, imm=0) + _insn(_EXIT)
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    # union bpf_attr, BPF_PROG_LOAD layout (include/uapi/linux/bpf.h)
    struct.pack_into("<II", attr, 0, BPF_PROG_TYPE_TRACING, len(insns) // 8)   # prog_type, insn_cnt
    struct.pack_into("<Q", attr, 8, ctypes.addressof(insn_buf))
    struct.pack_into("<Q", attr, 16, ctypes.addressof(license_buf))
    struct.pack_into("<II", attr, 24, 1, len(log_buf))                         # log_level, log_size
    struct.pack_into("<Q", attr, 32, ctypes.addressof(log_buf))
    attr[48:48 + 16] = b"memcgscope_chk".ljust(16, b"\0")
    struct.pack_into("<I", attr, 68, BPF_TRACE_FENTRY)
    struct.pack_into("<I", attr, 108, btf_id)
    prog_fd, err = _bpf(BPF_PROG_LOAD, attr)
    if prog_fd < 0:
        return _classify(err, "loading a minimal fentry program", log_buf.value.decode(errors="replace"))
    try:
        link_attr = ctypes.create_string_buffer(16)
        struct.pack_into("<QI", link_attr, 0, 0, prog_fd)  # raw_tracepoint: name=NULL, prog_fd
        link_fd, err = _bpf(BPF_RAW_TRACEPOINT_OPEN, link_attr)
        if link_fd < 0:
            return _classify(err, "attaching a minimal fentry program", "")
        os.close(link_fd)
        return FentryResult("ok", "a minimal fentry program loaded and attached")
    finally:
        os.close(prog_fd)


def prog_test_run(prog_fd: int, ctx: bytes) -> int:
    """BPF_PROG_TEST_RUN of a loaded program with ``ctx`` as its context
    (a raw tracepoint's u64 args) in the calling thread → its return value.
    The BPF side's handlers are driven this way in tests/host (raw
    tracepoint test runs exist since Linux 5.10)."""
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
    attr = ctypes.create_string_buffer(80)
    # union bpf_attr, the `test` struct (include/uapi/linux/bpf.h)
    struct.pack_into("<I", attr, 0, prog_fd)
    struct.pack_into("<II", attr, 40, len(ctx), 0)          # ctx_size_in, ctx_size_out
    struct.pack_into("<Q", attr, 48, ctypes.addressof(ctx_buf))
    ret, err = _bpf(BPF_PROG_TEST_RUN, attr)
    if ret < 0:
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return struct.unpack_from("<I", attr, 4)[0]


def _classify(err: int, doing: str, log: str) -> FentryResult:
    name = errno.errorcode.get(err, str(err))
    if err in (errno.EPERM, errno.EACCES):
        return FentryResult("refused", f"{name} {doing}: refused by the kernel or a security policy", err)
    if err in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP, errno.ENOSYS):
        last = log.strip().splitlines()[-1] if log.strip() else ""
        return FentryResult("unsupported", f"{name} {doing}: not supported by this kernel"
                            + (f" ({last})" if last else ""), err)
    return FentryResult("error", f"{name} {doing}: {os.strerror(err)}", err)


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program fd of this process, from its
    /proc/self/fdinfo (zero unless kernel.bpf_stats_enabled is 1); OSError
    when the fd is not open."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        info = dict(line.split(":", 1) for line in f if ":" in line)
    return int(info.get("run_time_ns", "0").strip() or 0), int(info.get("run_cnt", "0").strip() or 0)


@contextlib.contextmanager
def bpf_stats_enabled(path: str = BPF_STATS):
    """kernel.bpf_stats_enabled on for the duration (the kernel then keeps
    each program's run time and run count), the old value restored after;
    yields whether it is on (False where the file cannot be written)."""
    try:
        with open(path) as f:
            old = f.read().strip()
        if old != "1":
            with open(path, "w") as f:
                f.write("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        if old != "1":
            try:
                with open(path, "w") as f:
                    f.write(old)
            except OSError:
                pass
