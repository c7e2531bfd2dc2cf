"""A scenario task on the real kernel: a small process that takes commands
on stdin, one per line, and answers on stdout.

    enter PATH          move itself into the cgroup whose cgroup.procs is PATH
    thp never           disable transparent huge pages for itself (prctl)
    anon PAGES          map PAGES of anonymous memory and write to each page
                        (then MADV_NOHUGEPAGE: khugepaged leaves it alone)
    huge PAGES          the same in 2 MiB-aligned ranges with THP allowed for
                        the touch (each range's first fault tries a huge page)
    file PATH PAGES     write PAGES of page cache to PATH, flushed as it goes
    exit                answer and exit 0

Each command answers "ok ..." or "error ...". An OOM kill shows as the end
of the output (the runner reads EOF and a SIGKILL exit status).

The process starts outside the scenario's cgroups and enters its cgroup
only after the interpreter is up: charges stay with the cgroup they were
made in, so the scenario's cgroup is charged with what the scenario
touches, not with Python's start-up (about 10 MiB).  Memory it needs
afterwards (the write buffer) is allocated before it enters.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
HPAGE = 512 * PAGE            # a PMD-mapped huge page on x86-64
CHUNK = 1 << 20


def _prctl(*args) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.prctl(*args, 0, 0, 0) if len(args) == 2 else libc.prctl(*args, 0, 0, 0, 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")
    return r


def huge(pages: int, maps: list) -> int:
    """Touch ``pages`` pages from a 2 MiB boundary on, THP allowed while
    touching: the first fault of each 2 MiB range tries a huge page. The
    range is then marked MADV_NOHUGEPAGE and THP restored as it was, so
    khugepaged does not collapse it (or anything else of ours) later: a
    collapse charges 512 pages on its own, with reclaim."""
    ranges = -(-pages * PAGE // HPAGE)
    m = mmap.mmap(-1, (ranges + 1) * HPAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    maps.append(m)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -base % HPAGE
    disabled = _prctl(PR_GET_THP_DISABLE)
    if disabled:
        _prctl(PR_SET_THP_DISABLE, 0)
    try:
        for off in range(start, start + pages * PAGE, PAGE):
            m[off] = 1
    finally:
        m.madvise(mmap.MADV_NOHUGEPAGE, start, ranges * HPAGE)
        if disabled:
            _prctl(PR_SET_THP_DISABLE, 1)
    return pages


def main() -> int:
    buf = b"\x5a" * CHUNK     # before entering: charged to the launch cgroup
    maps = []                 # keep touched memory mapped until exit
    out = sys.stdout
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "enter":
                with open(args[0], "w") as f:
                    f.write("0")  # 0: the writing process itself
                reply = "ok entered"
            elif cmd == "thp":
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
                reply = "ok thp never"
            elif cmd == "huge":
                pages = int(args[0])
                reply = f"ok huge {huge(pages, maps)}"
            elif cmd == "anon":
                pages = int(args[0])
                if pages:
                    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                    maps.append(m)
                    for off in range(0, pages * PAGE, PAGE):
                        m[off] = 1
                    # the ranges whose huge charge fell back are what khugepaged
                    # collapses later, charging 512 pages with reclaim: not the
                    # scenario's (no-op where THP is off for us)
                    m.madvise(mmap.MADV_NOHUGEPAGE)
                reply = f"ok anon {pages}"
            elif cmd == "file":
                path, pages = args[0], int(args[1])
                left = pages * PAGE
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    while left > 0:
                        n = os.write(fd, buf[:min(CHUNK, left)])
                        left -= n
                        # clean pages can be dropped by reclaim at once, as the
                        # model's page cache can; dirty ones wait for writeback
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
                reply = f"ok file {pages}"
            elif cmd == "exit":
                out.write("ok bye\n")
                out.flush()
                return 0
            else:
                reply = f"error unknown command {cmd!r}"
        except (OSError, ValueError, IndexError) as e:
            reply = f"error {cmd}: {e}"
        out.write(reply + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
