"""The short-lived loader: detect, build, compile (bcc, LLVM), load; then
hand the map and program fds to the collector and exit.

Why a child process: bcc compiles with LLVM and clang in-process, and
keeps them mapped for as long as the Python module lives (importing bcc
alone maps libbcc, libLLVM and libclang-cpp: ~90 MB resident of the
collector's 212 MB). Compiling is needed once; so it happens here, in a
process that exits when the program is loaded. The collector receives
file descriptors over a UNIX socket (SCM_RIGHTS) and does everything else
through bpf(2), perf_event_open(2) and mmap (probes/maps.py, ringbuf.py,
attach.py); it never imports bcc.

The loader loads programs and creates maps, but attaches nothing: the
collector attaches (and detaches for pause/resume), so every attachment is
held by a collector fd from the start, and a crash of either process
leaves nothing attached. A loader that dies mid-handover leaves the
collector only fds it closes.

Protocol (SOCK_SEQPACKET, one message per send; the first byte says what):

    collector → loader   P <pickled LoadParams>
    loader → collector   F <u32 n>  + n fds (SCM_RIGHTS), repeated
                         M <a piece of the pickled handover description>, repeated
                         D   (done: every fd and piece was sent)
                      or E <one-line error>   (and exits 1)

Pickle is safe here: both ends are this package, run by the same user over
a socketpair nobody else holds; the collector's unpickler still only
builds classes of memcgscope.probes.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import io
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["LoadParams", "Prepared", "Handover", "LoadError", "prepare", "load", "child_main",
           "program_kind"]

MAX_FDS_PER_MESSAGE = 250   # SCM_MAX_FD is 253 (include/net/scm.h)
CHUNK = 32768


class LoadError(Exception):
    """One line: what failed, where, and what to do."""


@dataclass
class LoadParams:
    mode: str | None
    sysroot: str = "/"
    report: object = None
    max_cgroups: int = 4096
    ringbuf_pages: int = 256
    memcg_state: bool = False
    check_fentry: bool = True
    latency_sample: int = 64
    without: tuple = ()   # probes left out (program.optional_probes)


@dataclass
class Prepared:
    report: object
    mode: str
    program: object
    btf: object


@dataclass
class Handover:
    """What the loader hands over. `maps`: name -> (fd, key layout, value
    layout) with layouts in Layout.to_wire() form (None for the ring
    buffer); `progs`: name -> (fd, kind, target)."""
    report: object
    mode: str
    program: object
    item_names: dict
    maps: dict = field(default_factory=dict)
    progs: dict = field(default_factory=dict)
    loader_pid: int = 0

    def fds(self) -> list[int]:
        return [m[0] for m in self.maps.values()] + [p[0] for p in self.progs.values()]

    def close(self) -> None:
        for fd in self.fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.maps, self.progs = {}, {}


# --- building (no compiler; Session.build uses this in-process too) ------------

def prepare(params: LoadParams) -> Prepared:
    """Detects the kernel and builds the program for the mode."""
    from .btf import BTF
    from .bpfsys import try_fentry
    from .detect import detect
    from .program import ProgramError, build_program, fentry_arg_reads
    from .sysroot import SysRoot

    sysroot = SysRoot(params.sysroot)
    report = params.report or detect(sysroot)
    mode = params.mode or report.mode
    if mode is None:
        raise LoadError(f"no probe mode is usable on this kernel: {report.mode_reason}; see 'memcgscope doctor'")
    verdict = report.modes.get(mode)
    if verdict is None:
        raise LoadError(f"--mode {mode}: unknown mode; use fentry, kprobe or tracepoint")
    if not verdict.usable:
        raise LoadError(f"--mode {mode} is not usable here ({verdict.reason}); "
                        f"see 'memcgscope doctor'" + (f", which suggests {report.mode}" if report.mode else ""))
    try:
        btf = BTF.from_file(sysroot.path("/sys/kernel/btf/vmlinux"))
    except Exception as e:
        raise LoadError(f"{e}") from e
    if btf.func_id("bpf_ringbuf_output") is None:
        # BPF ring buffers arrived in 5.8 (kernel/bpf/ringbuf.c); every kernel
        # memcgscope has a model profile for is 5.10 or later
        raise LoadError(f"kernel {report.kernel} has no BPF ring buffer (Linux 5.8+); memcgscope supports "
                        f"Linux 5.10 and later")
    arg_reads = fentry_arg_reads(btf)

    def fentry_check(btf_id):
        # load the way the program reads its arguments, not just an attach
        r = try_fentry(btf_id, args=arg_reads)
        return r.state == "ok", r.detail

    try:
        program = build_program(report, mode, btf, max_cgroups=params.max_cgroups,
                                ringbuf_pages=params.ringbuf_pages, use_perf_buffer=False,
                                fentry_check=fentry_check if mode == "fentry" and params.check_fentry else None,
                                memcg_state=params.memcg_state, latency_sample=params.latency_sample,
                                without=params.without)
    except ProgramError as e:
        raise LoadError(str(e)) from e
    return Prepared(report, mode, program, btf)


def item_names(btf) -> dict[str, dict[int, str]]:
    """Kernel enum names for memcg:* tracepoint items (they differ between builds)."""
    state = dict(btf.enumerators("node_stat_item"))
    state.update(btf.enumerators("memcg_stat_item"))
    # lruvec items are marked with bit 16 by the BPF side
    state.update({k | 0x10000: "lruvec_" + v for k, v in btf.enumerators("node_stat_item").items()})
    return {"events": dict(btf.enumerators("vm_event_item")), "state": state}


# bcc names programs by their macro (KFUNC_PROBE, RAW_TRACEPOINT_PROBE,
# TRACEPOINT_PROBE); probes/program.py names its kprobe wrappers kp_*
_KINDS = (("kfunc__", "fentry"), ("kretfunc__", "fexit"), ("raw_tracepoint__", "raw_tracepoint"),
          ("tracepoint__", "tracepoint"), ("kp_", "kprobe"))
# bcc's BPF.KPROBE, TRACEPOINT, RAW_TRACEPOINT, TRACING (enum bpf_prog_type)
PROG_TYPES = {"kprobe": 2, "tracepoint": 5, "raw_tracepoint": 17, "fentry": 26, "fexit": 26}


def program_kind(name: str) -> tuple[str, str | None]:
    """(kind, target) of a program by its name; target None for kprobes,
    whose symbols come from Program.kprobes."""
    for prefix, kind in _KINDS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if kind == "tracepoint":
                return kind, rest.replace("__", ":", 1)
            if kind == "kprobe":
                return kind, None
            return kind, rest
    raise LoadError(f"program {name}: not a kind memcgscope attaches (kfunc__, kretfunc__, "
                    f"raw_tracepoint__, tracepoint__ or kp_)")


# --- the child ----------------------------------------------------------------

def _send(sock: socket.socket, tag: bytes, payload: bytes = b"", fds=()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([tag + payload], anc)


def _send_handover(sock: socket.socket, meta: dict, fds: list[int]) -> None:
    for i in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        part = fds[i:i + MAX_FDS_PER_MESSAGE]
        _send(sock, b"F", struct.pack("=I", len(part)), part)
    blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    for i in range(0, len(blob), CHUNK):
        _send(sock, b"M", blob[i:i + CHUNK])
    _send(sock, b"D")


@contextlib.contextmanager
def captured_stderr(lines: list[str]):
    """bcc's clang prints warnings about fallback headers on fd 2: keep them
    from the user's terminal, but hand them back for the error message."""
    if os.environ.get("MEMCGSCOPE_DEBUG_BPF"):
        yield
        return
    import tempfile
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def compile_and_load(prepared: Prepared) -> tuple[dict, dict, list[int]]:
    """Compiles the program with bcc, loads every function and creates the
    maps; returns (maps, progs, fds) in Handover form, fds by index."""
    from .detect import bcc_kernel_source
    from .sysroot import SysRoot
    source = bcc_kernel_source(SysRoot("/"))
    if source:
        os.environ["BCC_KERNEL_SOURCE"] = source
    try:
        from bcc import BPF
        from bcc.libbcc import lib
    except ImportError as e:
        raise LoadError("python module bcc not importable; run scripts/setup.sh (python3-bpfcc)") from e

    class Loader(BPF):
        # bcc attaches kfunc__/raw_tracepoint__/tracepoint__ programs while
        # constructing; the collector attaches, so this loads only
        def _trace_autoload(self):
            pass

    from .maps import Layout
    program = prepared.program
    output: list[str] = []
    what = ""
    try:
        with captured_stderr(output):
            b = Loader(text=program.text, cflags=program.cflags)
            names = [lib.bpf_function_name(b.module, i).decode()
                     for i in range(lib.bpf_num_functions(b.module))]
            progs = {}
            for name in names:
                kind, target = program_kind(name)
                what = f" ({name})"
                fn = b.load_func(name.encode(), PROG_TYPES[kind])
                progs[name] = (fn.fd, kind, target)
    except LoadError:
        raise
    except Exception as e:
        first_error = next((line for line in output if "error" in line), "")
        detail = first_error or (str(e).splitlines()[0] if str(e) else repr(e))
        raise LoadError(f"compiling or loading the {prepared.mode} program{what} failed: {detail} "
                        f"(MEMCGSCOPE_DEBUG_BPF=1 shows everything)") from e

    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    maps = {}
    for i in range(lib.bpf_num_tables(b.module)):
        name = lib.bpf_table_name(b.module, i).decode()
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd < 0:
            raise LoadError(f"map {name}: bcc has no fd for it")
        t = b.get_table(name)
        if type(t).__name__ == "RingBuf":
            maps[name] = (fd, None, None)
        else:
            # per-CPU tables: bcc's Leaf is the array of every CPU's copy,
            # sLeaf the one C type
            maps[name] = (fd, Layout.from_ctype(t.Key).to_wire(),
                          Layout.from_ctype(getattr(t, "sLeaf", t.Leaf)).to_wire())
    # fds travel by index in the order sent
    fds = []
    for table in (maps, progs):
        for name, entry in table.items():
            fds.append(entry[0])
            table[name] = (len(fds) - 1,) + tuple(entry[1:])
    return maps, progs, fds


def _restrict_child() -> None:
    # the collector decides about SIGINT/SIGTERM (it ends this process by
    # pid); when it dies, so does this one (PR_SET_PDEATHSIG)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock_fd, parent = int(argv[0]), int(argv[1])
    _restrict_child()
    if os.getppid() != parent:
        os._exit(3)    # the collector is gone already
    sock = socket.socket(fileno=sock_fd)
    msg = sock.recv(1 << 20)
    if not msg.startswith(b"P"):
        os._exit(4)
    params = pickle.loads(msg[1:])
    try:
        prepared = prepare(params)
        maps, progs, fds = compile_and_load(prepared)
        meta = {"report": prepared.report, "mode": prepared.mode, "program": prepared.program,
                "item_names": item_names(prepared.btf), "maps": maps, "progs": progs}
        _send_handover(sock, meta, fds)
    except BaseException as e:
        if isinstance(e, LoadError):
            message = str(e)
        else:
            # a bug of ours: the one line names it, the traceback goes to stderr
            import traceback
            traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            message = f"the BPF loader failed: {type(e).__name__}{': ' + first if first else ''}"
        with contextlib.suppress(OSError):
            _send(sock, b"E", message.encode())
        sys.stderr.flush()
        os._exit(1)
    # no interpreter shutdown: bcc's atexit cleanup would close and detach
    # nothing useful; the kernel closes our copies of the fds
    os._exit(0)


# --- the collector's side -------------------------------------------------------

class _Unpickler(pickle.Unpickler):
    ALLOWED = ("memcgscope.probes.", "builtins")

    def find_class(self, module, name):
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return super().find_class(module, name)
        if module.startswith("memcgscope.probes."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the loader sent a {module}.{name}, which is not allowed")


def loader_command() -> list[str]:
    return [sys.executable, "-c", "import sys; from memcgscope.probes.loader import child_main; "
                                  "sys.exit(child_main())"]


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "is still running"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def load(params: LoadParams, command: list[str] | None = None) -> Handover:
    """Runs the loader and returns what it hands over; LoadError (one line)
    when it cannot, with every fd received closed."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = (command or loader_command()) + [str(child_end.fileno()), str(os.getpid())]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, cwd="/")
    except OSError as e:
        parent_end.close()
        child_end.close()
        raise LoadError(f"cannot start the BPF loader ({cmd[0]}): {e.strerror}") from e
    child_end.close()
    fds: list[int] = []
    ok = False
    try:
        params_blob = pickle.dumps(params, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            parent_end.sendmsg([b"P" + params_blob])
        except OSError:
            pass   # it died already; the read below says how
        blob = io.BytesIO()
        error = None
        done = False
        anc_size = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
        while True:
            data, anc, flags, _ = parent_end.recvmsg(CHUNK + 16, anc_size)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if flags & (socket.MSG_CTRUNC | getattr(socket, "MSG_TRUNC", 0)):
                raise LoadError(f"the BPF loader (pid {proc.pid}) sent a message larger than expected; "
                                f"nothing was attached")
            if not data:
                break                     # the loader closed its end (exited)
            tag, payload = data[:1], data[1:]
            if tag == b"F":
                pass
            elif tag == b"M":
                blob.write(payload)
            elif tag == b"D":
                done = True
                break
            elif tag == b"E":
                error = payload.decode(errors="replace")
                break
            else:
                raise LoadError(f"the BPF loader (pid {proc.pid}) sent an unknown message {tag!r}")
        if error is not None:
            proc.wait()
            raise LoadError(error)
        if not done:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise LoadError(f"the BPF loader (pid {proc.pid}) {_describe_exit(proc.poll())} before handing "
                            f"over its programs; nothing was attached (run with MEMCGSCOPE_DEBUG_BPF=1 "
                            f"to see its output)")
        try:
            meta = _Unpickler(io.BytesIO(blob.getvalue())).load()
        except Exception as e:
            raise LoadError(f"the BPF loader's description could not be read ({e}); nothing was attached") from e
        index = {i: fd for i, fd in enumerate(fds)}
        try:
            maps = {name: (index[e[0]],) + tuple(e[1:]) for name, e in meta["maps"].items()}
            progs = {name: (index[e[0]],) + tuple(e[1:]) for name, e in meta["progs"].items()}
        except KeyError as e:
            raise LoadError(f"the BPF loader described fd {e} but sent only {len(fds)}; nothing was attached") from e
        if len(maps) + len(progs) != len(fds):
            raise LoadError(f"the BPF loader sent {len(fds)} fds for {len(maps) + len(progs)} maps and programs; "
                            f"nothing was attached")
        handover = Handover(meta["report"], meta["mode"], meta["program"], meta["item_names"], maps, progs,
                            proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ok = True
        return handover
    finally:
        parent_end.close()
        if not ok:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(child_main())
