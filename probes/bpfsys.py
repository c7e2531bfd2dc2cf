"""Minimal bpf(2) calls, for feature detection without compiling C.

`try_fentry(func)` loads the smallest possible fentry program ("return 0")
against a kernel function's BTF id and attaches it, then closes it at once.
That is what `memcgscope doctor` means by "fentry allowed": a policy that
refuses tracing programs (lockdown, an LSM, a sandbox) answers EPERM here,
exactly as it would to bcc's KFUNC_PROBE, but in milliseconds instead of
the seconds a bcc compile takes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct

__all__ = ["try_fentry", "FentryResult", "prog_test_run", "bpf_stats_enabled", "BPF_STATS"]

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"

BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24

ENOTSUPP = 524  # kernel-internal, leaks to user space from BPF

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


class FentryResult:
    def __init__(self, state: str, detail: str, err: int = 0):
        self.state = state  # "ok", "refused", "unsupported", "error"
        self.detail = detail
        self.errno = err

    def __repr__(self) -> str:
        return f"FentryResult({self.state!r}, {self.detail!r})"


def _bpf(cmd: int, attr: ctypes.Array) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    return ret, ctypes.get_errno()


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
