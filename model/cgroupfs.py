"""The virtual cgroupfs: which control files exist per cgroup version and
profile, what ``read`` prints and where ``write`` goes (the cftype tables
of mm/memcontrol.c and, from 6.12, mm/memcontrol-v1.c).

Reads return the text the kernel prints (with its trailing newline).
Writes return 0 or -errno, like write(2) (a successful write's byte count
is 0 here).
"""

from __future__ import annotations

import errno

from .limits import mem_cgroup_resize_max, memory_high_write, memory_max_write, memory_reclaim
from .page_counter import PAGE_COUNTER_MAX, PAGE_SIZE, page_counter_memparse

__all__ = ["files_of", "read_file", "write_file", "kstrtoull"]

_U64 = (1 << 64) - 1


def kstrtoull(buf: str):
    """lib/kstrtox.c kstrtoull(buf, 0): (0, value), (-EINVAL, None) or
    (-ERANGE, None).  One trailing newline is allowed, nothing else."""
    s = buf[:-1] if buf.endswith("\n") else buf
    if s.startswith("+"):
        s = s[1:]
    base, digits = 10, s
    if s[:2].lower() == "0x":
        base, digits = 16, s[2:]
    elif s.startswith("0") and len(s) > 1:
        base, digits = 8, s[1:]
    if not digits:
        return -errno.EINVAL, None
    valid = "0123456789abcdef"[:base]
    if not all(c in valid for c in digits.lower()):
        return -errno.EINVAL, None
    value = int(digits, base)
    if value > _U64:
        return -errno.ERANGE, None
    return 0, value


def _bytes(pages: int) -> str:
    return f"{pages * PAGE_SIZE}\n"


def _max_or_bytes(pages: int) -> str:
    return "max\n" if pages == PAGE_COUNTER_MAX else _bytes(pages)


def _v1_root_usage(kernel, swap: bool) -> int:
    # The v1 root reads its usage from page statistics, not from its
    # counter: stocked pages are not in it.
    pages = sum(m.charged for m in kernel.root.subtree())
    if swap:
        pages += sum(m.swapped for m in kernel.root.subtree())
    return pages


def _oom_control(kernel, m) -> str:
    under = kernel.under_oom(m)
    return (f"oom_kill_disable {int(m.oom_kill_disable)}\n"
            f"under_oom {int(under)}\n"
            f"oom_kill {m.event('oom_kill')}\n")


def _events(kernel, m, local: bool) -> str:
    return "".join(f"{key} {m.event(key, local)}\n" for key in kernel.profile.memory_events_keys)


def _peak(kernel, counter, fd_reset: bool) -> str:
    # ≥ 6.12: after a write to this file (one fd, in the model) it shows the
    # local watermark, which the write reset to the usage of that moment
    if fd_reset:
        return _bytes(counter.local_watermark)
    return _bytes(counter.watermark)


def files_of(kernel, m) -> list[str]:
    """The memory control files this cgroup has."""
    p = kernel.profile
    if kernel.cgroup == "v1":
        names = ["memory.limit_in_bytes", "memory.usage_in_bytes", "memory.failcnt",
                 "memory.max_usage_in_bytes", "memory.soft_limit_in_bytes",
                 "memory.oom_control"]
        if m.memsw is not None:
            names += ["memory.memsw.limit_in_bytes", "memory.memsw.usage_in_bytes",
                      "memory.memsw.failcnt", "memory.memsw.max_usage_in_bytes"]
        return names
    names = []
    if p.has_memory_reclaim:
        names.append("memory.reclaim")
    if m.is_root:
        return names
    names += ["memory.current", "memory.max", "memory.high", "memory.events",
              "memory.events.local", "memory.swap.current", "memory.swap.max",
              "memory.swap.high", "memory.swap.events"]
    if p.has_peak:
        names.append("memory.peak")
    if p.has_swap_peak:
        names.append("memory.swap.peak")
    return names


_WRITE_ONLY = {"memory.reclaim"}
_READ_ONLY = {"memory.usage_in_bytes", "memory.memsw.usage_in_bytes", "memory.current",
              "memory.events", "memory.events.local", "memory.swap.current",
              "memory.swap.events"}


def read_file(kernel, m, name: str) -> str:
    if name not in files_of(kernel, m):
        raise FileNotFoundError(errno.ENOENT, f"{m.path}: no file {name} "
                                f"(cgroup {kernel.cgroup}, profile {kernel.profile.name})")
    if name in _WRITE_ONLY:
        raise PermissionError(errno.EACCES, f"{m.path}/{name} is write-only")
    mem, memsw = m.memory, m.memsw
    v1 = {
        "memory.limit_in_bytes": lambda: _bytes(mem.max),
        "memory.memsw.limit_in_bytes": lambda: _bytes(memsw.max),
        "memory.usage_in_bytes": lambda: _bytes(_v1_root_usage(kernel, False) if m.is_root
                                                else mem.usage),
        "memory.memsw.usage_in_bytes": lambda: _bytes(_v1_root_usage(kernel, True) if m.is_root
                                                      else memsw.usage),
        "memory.failcnt": lambda: f"{mem.failcnt}\n",
        "memory.memsw.failcnt": lambda: f"{memsw.failcnt}\n",
        "memory.max_usage_in_bytes": lambda: _bytes(mem.watermark),
        "memory.memsw.max_usage_in_bytes": lambda: _bytes(memsw.watermark),
        "memory.soft_limit_in_bytes": lambda: _bytes(m.soft_limit),
        "memory.oom_control": lambda: _oom_control(kernel, m),
    }
    v2 = {
        "memory.current": lambda: _bytes(mem.usage),
        "memory.peak": lambda: _peak(kernel, mem, m.peak_fd_reset),
        "memory.max": lambda: _max_or_bytes(mem.max),
        "memory.high": lambda: _max_or_bytes(mem.high),
        "memory.events": lambda: _events(kernel, m, False),
        "memory.events.local": lambda: _events(kernel, m, True),
        "memory.swap.current": lambda: _bytes(m.swap.usage),
        "memory.swap.peak": lambda: _peak(kernel, m.swap, m.swap_peak_fd_reset),
        "memory.swap.max": lambda: _max_or_bytes(m.swap.max),
        "memory.swap.high": lambda: _max_or_bytes(m.swap.high),
        "memory.swap.events": lambda: (f"high {m.event('swap_high')}\n"
                                       f"max {m.event('swap_max')}\n"
                                       f"fail {m.event('swap_fail')}\n"),
    }
    return (v1 if kernel.cgroup == "v1" else v2)[name]()


def write_file(ctx, m, name: str, text: str, nonblock: bool = False) -> int:
    k = ctx.kernel
    if name not in files_of(k, m):
        return -errno.ENOENT
    if name in _READ_ONLY:
        return -errno.EACCES
    buf = text.strip()  # strstrip
    if k.cgroup == "v1":
        return _write_v1(ctx, m, name, text, buf)
    return _write_v2(ctx, m, name, buf, nonblock)


def _write_v1(ctx, m, name, raw, buf) -> int:
    k = ctx.kernel
    if name in ("memory.failcnt", "memory.memsw.failcnt"):
        # mem_cgroup_reset: the text is not looked at
        (m.memory if name == "memory.failcnt" else m.memsw).failcnt = 0
        return 0
    if name in ("memory.max_usage_in_bytes", "memory.memsw.max_usage_in_bytes"):
        (m.memory if name == "memory.max_usage_in_bytes" else m.memsw).reset_watermark()
        return 0
    if name == "memory.oom_control":
        err, val = kstrtoull(raw)
        if err:
            return err
        if m.is_root or val not in (0, 1):
            return -errno.EINVAL
        m.oom_kill_disable = bool(val)
        if not val:
            k.memcg_oom_recover(m)
        return 0
    err, pages = page_counter_memparse(buf, "-1")
    if err:
        return err
    if name == "memory.soft_limit_in_bytes":
        m.soft_limit = pages
        return 0
    if m.is_root:
        return -errno.EINVAL  # no limit on the root
    return mem_cgroup_resize_max(ctx, m, pages, memsw=name == "memory.memsw.limit_in_bytes")


def _write_v2(ctx, m, name, buf, nonblock) -> int:
    k = ctx.kernel
    if name in ("memory.peak", "memory.swap.peak"):
        if not k.profile.peak_writable:
            return -errno.EACCES
        counter = m.memory if name == "memory.peak" else m.swap
        counter.local_watermark = counter.usage
        if name == "memory.peak":
            m.peak_fd_reset = True
        else:
            m.swap_peak_fd_reset = True
        return 0
    if name == "memory.reclaim":
        # 6.1 takes a size; "max" is not a size here (page_counter_memparse(buf, ""))
        err, pages = page_counter_memparse(buf, "")
        if err:
            return err
        return memory_reclaim(ctx, m, pages)
    err, pages = page_counter_memparse(buf, "max")
    if err:
        return err
    if name == "memory.max":
        memory_max_write(ctx, m, pages, nonblock)
    elif name == "memory.high":
        memory_high_write(ctx, m, pages, nonblock)
    elif name == "memory.swap.max":
        m.swap.max = pages
    elif name == "memory.swap.high":
        m.swap.high = pages
    return 0
