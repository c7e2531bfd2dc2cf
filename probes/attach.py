"""Attaching loaded BPF programs, by fd, in the collector (no bcc).

Which fd keeps each kind attached, so that closing it (or the collector
dying, which closes them all) detaches:

| kind | how | the fd that holds it |
|---|---|---|
| fentry, fexit | BPF_RAW_TRACEPOINT_OPEN without a name (the program's load named the function; Linux 5.5) | the link fd returned (kernel/bpf/syscall.c bpf_tracing_prog_attach: a bpf_link) |
| raw tracepoint | BPF_RAW_TRACEPOINT_OPEN with the tracepoint's name | the link fd returned (bpf_raw_tracepoint_open: a bpf_link since 5.7) |
| tracepoint | perf_event_open(PERF_TYPE_TRACEPOINT, the event's id) + PERF_EVENT_IOC_SET_BPF | the perf event fd (perf_event_free_bpf_prog on release) |
| kprobe, kretprobe | perf_event_open on the kprobe PMU (Linux 4.17, e12f03d "perf/core: Implement the 'perf_kprobe' PMU") | the perf event fd; the probe itself is a local trace_kprobe, freed with the event (kernel/trace/trace_kprobe.c destroy_local_trace_kprobe) |
| kretprobe with maxactive | a named event in tracefs kprobe_events (the PMU takes no maxactive: create_local_trace_kprobe passes 0), then perf_event_open on its id | the perf event fd for the program; the *name* stays in kprobe_events until removed |

The last kind is the one residue a crash can leave: a named, disabled
kretprobe definition in kprobe_events, with no program and no cost (a
trace_kprobe without a perf event or tracefs enable is not armed). Each
name carries the collector's pid (`memcgscope/r<pid>_<n>_<symbol>`); detaching
removes it, and `sweep_stale()` at the next start removes those of dead
pids. MEMCGSCOPE_KRETPROBE_MAXACTIVE=0 uses the PMU for return probes too,
which leaves nothing behind at all, at the kernel's default of
max(10, 2 * possible CPUs) instances (kernel/kprobes.c register_kretprobe).
bcc does the same with a maxactive (libbpf.c bpf_attach_probe: the
perf_event_open path only when maxactive <= 0), under names of its own
(`kprobes/r_<symbol>_bcc_<pid>`).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import time
from dataclasses import dataclass

from . import bpfsys

__all__ = ["Attachment", "AttachError", "attach", "detach", "sweep_stale", "KPROBE_GROUP", "kprobe_pmu"]

KPROBE_GROUP = "memcgscope"
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
_EVENT_LINE = re.compile(r"^[pr]\d*:" + KPROBE_GROUP + r"/(r(\d+)_\w+)\s")
MAX_EVENT_NAME = 63   # MAX_EVENT_NAME_LEN 64 with its NUL (kernel/trace/trace.h)


class AttachError(Exception):
    """One line: which program on what, and why not."""


@dataclass
class Attachment:
    kind: str           # fentry | fexit | raw_tracepoint | tracepoint | kprobe | kretprobe
    target: str         # the function or tracepoint (category:name for tracepoints)
    prog: str           # the program's name
    fd: int
    event: str | None = None   # the tracefs kprobe event we created ("group/name")
    tracing_dir: str | None = None


def kprobe_pmu(path: str = KPROBE_PMU) -> tuple[int, int] | None:
    """(PMU type, retprobe config bit) of the kprobe PMU, or None."""
    try:
        with open(os.path.join(path, "type")) as f:
            type_ = int(f.read().strip())
        with open(os.path.join(path, "format", "retprobe")) as f:
            fmt = f.read().strip()   # "config:0"
        bit = int(fmt.split(":", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return type_, bit


def _tracepoint_id(tracing_dir: str, category: str, name: str) -> int:
    path = os.path.join(tracing_dir, "events", category, name, "id")
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as e:
        raise AttachError(f"tracepoint {category}:{name}: cannot read {path} ({e})") from e


def _perf_with_prog(type_: int, config: int, prog_fd: int, what: str, config1: int = 0) -> int:
    try:
        fd = bpfsys.perf_event_open(type_, config, config1=config1)
    except OSError as e:
        raise AttachError(f"{what}: {e.strerror or e}") from e
    try:
        bpfsys.perf_event_attach_bpf(fd, prog_fd)
    except OSError as e:
        os.close(fd)
        raise AttachError(f"{what}: PERF_EVENT_IOC_SET_BPF: {os.strerror(e.errno)}") from e
    return fd


def _write_kprobe_events(tracing_dir: str, line: str) -> None:
    fd = os.open(os.path.join(tracing_dir, "kprobe_events"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_SEQ = itertools.count()


def _event_name(symbol: str, owner: int) -> str:
    # unique per attach in this process: two sessions may probe one symbol
    clean = re.sub(r"\W", "_", symbol)
    return f"r{owner}_{next(_SEQ)}_{clean}"[:MAX_EVENT_NAME]


def attach(kind: str, target: str, prog: str, prog_fd: int, *, tracing_dir: str | None = None,
           maxactive: int = 0, owner: int | None = None) -> Attachment:
    """Attaches the program `prog_fd` of `kind` on `target`; AttachError
    with one line when the kernel refuses."""
    if kind in ("fentry", "fexit"):
        try:
            fd = bpfsys.raw_tracepoint_open(None, prog_fd)
        except OSError as e:
            raise AttachError(f"{kind} on {target} ({prog}): {e.strerror or e}") from e
        return Attachment(kind, target, prog, fd)
    if kind == "raw_tracepoint":
        name = target.split(":", 1)[-1]
        try:
            fd = bpfsys.raw_tracepoint_open(name, prog_fd)
        except OSError as e:
            raise AttachError(f"raw tracepoint {target} ({prog}): {e.strerror or e}") from e
        return Attachment(kind, target, prog, fd)
    if kind == "tracepoint":
        if tracing_dir is None:
            raise AttachError(f"tracepoint {target}: tracefs is not mounted; mount it on /sys/kernel/tracing")
        category, name = target.split(":", 1)
        fd = _perf_with_prog(bpfsys.PERF_TYPE_TRACEPOINT, _tracepoint_id(tracing_dir, category, name), prog_fd,
                             f"tracepoint {target} ({prog})")
        return Attachment(kind, target, prog, fd)
    if kind in ("kprobe", "kretprobe"):
        retprobe = kind == "kretprobe"
        if retprobe and maxactive > 0:
            return _named_kretprobe(target, prog, prog_fd, tracing_dir, maxactive, owner or os.getpid())
        pmu = kprobe_pmu()
        if pmu is None:
            raise AttachError(f"{kind} on {target}: no kprobe PMU in {KPROBE_PMU} (Linux 4.17+ with CONFIG_KPROBE_EVENTS)")
        type_, bit = pmu
        sym = ctypes.create_string_buffer(target.encode())
        fd = _perf_with_prog(type_, (1 << bit) if retprobe else 0, prog_fd, f"{kind} on {target} ({prog})",
                             config1=ctypes.addressof(sym))
        return Attachment(kind, target, prog, fd)
    raise AttachError(f"{prog}: unknown attachment kind {kind!r}")


def _named_kretprobe(symbol: str, prog: str, prog_fd: int, tracing_dir: str | None, maxactive: int,
                     owner: int) -> Attachment:
    what = f"kretprobe on {symbol} ({prog}, maxactive {maxactive})"
    if tracing_dir is None:
        raise AttachError(f"{what}: tracefs is not mounted; mount it on /sys/kernel/tracing "
                          f"or set MEMCGSCOPE_KRETPROBE_MAXACTIVE=0")
    name = _event_name(symbol, owner)
    event = f"{KPROBE_GROUP}/{name}"
    line = f"r{maxactive}:{event} {symbol}"
    try:
        try:
            _write_kprobe_events(tracing_dir, line)
        except FileExistsError:
            # a crashed collector of the same pid (a container's pid 1) left it
            _remove_event(tracing_dir, event, tries=1)
            _write_kprobe_events(tracing_dir, line)
    except OSError as e:
        raise AttachError(f"{what}: writing kprobe_events: {os.strerror(e.errno)}") from e
    try:
        tp_id = _tracepoint_id(tracing_dir, KPROBE_GROUP, name)
        fd = _perf_with_prog(bpfsys.PERF_TYPE_TRACEPOINT, tp_id, prog_fd, what)
    except BaseException:
        _remove_event(tracing_dir, event)
        raise
    return Attachment("kretprobe", symbol, prog, fd, event=event, tracing_dir=tracing_dir)


def _remove_event(tracing_dir: str, event: str, tries: int = 20) -> bool:
    for _ in range(tries):
        try:
            _write_kprobe_events(tracing_dir, f"-:{event}")
            return True
        except OSError as e:
            if e.errno == errno.ENOENT:
                return True
            if e.errno != errno.EBUSY:
                return False
            time.sleep(0.01)   # the perf event is still being released
    return False


def detach(a: Attachment) -> None:
    fd, a.fd = a.fd, -1
    if fd >= 0:
        os.close(fd)
    if a.event and a.tracing_dir:
        _remove_event(a.tracing_dir, a.event)
        a.event = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(tracing_dir: str | None) -> list[str]:
    """Removes our named kretprobe events whose collector is gone (a crash
    leaves them, disabled); an event still in use answers EBUSY and stays.
    Returns the events removed."""
    if tracing_dir is None:
        return []
    try:
        with open(os.path.join(tracing_dir, "kprobe_events")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    removed = []
    for line in lines:
        m = _EVENT_LINE.match(line + " ")
        if m is None:
            continue
        pid = int(m.group(2))
        # our own pid: a crashed collector of the same pid (a container's
        # pid 1); this one has attached nothing yet
        if pid != os.getpid() and _alive(pid):
            continue
        event = f"{KPROBE_GROUP}/{m.group(1)}"
        if _remove_event(tracing_dir, event, tries=1):
            removed.append(event)
    return removed
