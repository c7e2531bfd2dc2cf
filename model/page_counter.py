"""``mm/page_counter.c``: hierarchical page counters, and
``page_counter_memparse``.

A counter belongs to one cgroup (``owner``) and links to the same counter of
the parent cgroup.  Counts are in pages.
"""

from __future__ import annotations

import errno

__all__ = ["PAGE_SIZE", "PAGE_COUNTER_MAX", "PageCounter", "page_counter_memparse", "memparse"]

PAGE_SIZE = 4096
#: LONG_MAX / PAGE_SIZE; v1 prints it as 9223372036854771712 bytes
PAGE_COUNTER_MAX = ((1 << 63) - 1) // PAGE_SIZE


class PageCounter:
    """``struct page_counter``.

    ``local_watermark`` exists from 6.12; ``track_failcnt`` from 6.15 (on
    older profiles every counter counts failures, modelled as True; which
    counters set it: the profile's ``failcnt_counters``).
    ``clamps``: ≥ 5.15 clamps a negative usage to 0 after the warning.
    """

    __slots__ = ("name", "owner", "parent", "usage", "max", "high", "min", "low",
                 "watermark", "local_watermark", "failcnt", "track_failcnt",
                 "has_local_watermark", "clamps", "set_max_enlarge_ok", "warnings")

    def __init__(self, name, owner, parent, *, has_local_watermark=False,
                 track_failcnt=True, clamps=True, set_max_enlarge_ok=True):
        self.name = name
        self.owner = owner
        self.parent = parent
        self.usage = 0
        self.max = PAGE_COUNTER_MAX
        self.high = PAGE_COUNTER_MAX
        self.min = 0
        self.low = 0
        self.watermark = 0
        self.local_watermark = 0
        self.failcnt = 0
        self.track_failcnt = track_failcnt
        self.has_local_watermark = has_local_watermark
        self.clamps = clamps
        self.set_max_enlarge_ok = set_max_enlarge_ok
        self.warnings = 0

    def __repr__(self):
        return f"<PageCounter {self.owner.path}:{self.name} usage={self.usage} max={self.max}>"

    def levels(self):
        c = self
        while c is not None:
            yield c
            c = c.parent

    def _update_watermarks(self, new: int) -> None:
        # ≥ 6.12: local watermark first; the global one only moves with it.
        if self.has_local_watermark:
            if new > self.local_watermark:
                self.local_watermark = new
                if new > self.watermark:
                    self.watermark = new
        elif new > self.watermark:
            self.watermark = new

    def charge(self, nr_pages: int) -> None:
        """page_counter_charge: forced, no limit check; watermarks still move."""
        for c in self.levels():
            c.usage += nr_pages
            c._update_watermarks(c.usage)

    def try_charge(self, nr_pages: int, outcome=None):
        """page_counter_try_charge → ``(True, None)`` or ``(False, failing_counter)``.

        Leaf → root: each level adds then compares (``usage == max`` is
        allowed).  The first level over its max takes the pages back,
        increments *its own* failcnt (≥ 6.15: only if the leaf counter has
        track_failcnt) and the levels below are cancelled; levels above are
        untouched.  The watermark of each level that passed is updated as
        the walk goes, so a failure higher up leaves the lower watermarks
        raised (the kernel does the same).

        ``outcome`` (the ``attempt`` oracle's answer) overrides the
        comparisons: True passes every level, a level of this counter fails
        there; other CPUs' charges and uncharges, which the model does not
        see, make either possible.
        """
        track = self.track_failcnt
        passed = []
        for c in self.levels():
            new = c.usage + nr_pages
            if (new > c.max) if outcome is None else (c is outcome):
                if track:
                    c.failcnt += 1
                for low in passed:
                    low.cancel_one(nr_pages)
                return False, c
            c.usage = new
            c._update_watermarks(new)
            passed.append(c)
        if outcome is not None and outcome is not True:
            for low in passed:
                low.cancel_one(nr_pages)
            raise ValueError(f"{outcome!r} is not a level of {self!r}")
        return True, None

    def cancel_one(self, nr_pages: int) -> None:
        """page_counter_cancel on this level only."""
        new = self.usage - nr_pages
        if new < 0:
            self.warnings += 1
            if self.clamps:
                new = 0
        self.usage = new

    def uncharge(self, nr_pages: int) -> None:
        """page_counter_uncharge: cancel at every level."""
        for c in self.levels():
            c.cancel_one(nr_pages)

    def set_max(self, nr_pages: int, usage_grows=None, read_usage=None) -> int:
        """page_counter_set_max → 0 or -EBUSY.

        ``read_usage`` (optional callable) answers the usage read that
        decides -EBUSY, each time round (default: this counter's usage).
        ``usage_grows`` (optional callable) lets a caller model a concurrent
        charge landing between the swap and the re-read; it returns the
        pages charged meanwhile (the re-read is the first read plus those).
        Without it the loop runs once.
        """
        while True:
            usage = self.usage if read_usage is None else read_usage()
            if usage > nr_pages:
                return -errno.EBUSY
            old = self.max
            self.max = nr_pages
            grown = usage_grows() if usage_grows is not None else 0
            if grown:
                self.charge(grown)
            # ≥ 6.1: an enlarging write is never undone by concurrent growth
            if grown <= 0 or (self.set_max_enlarge_ok and nr_pages >= old):
                return 0
            self.max = old

    def reset_watermark(self) -> None:
        """page_counter_reset_watermark (v1 memory.max_usage_in_bytes write)."""
        self.watermark = self.usage
        if self.has_local_watermark:
            self.local_watermark = self.usage


_SUFFIX_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def _simple_strtoull(s: str):
    """lib/vsprintf.c simple_strtoull with base 0: (value, rest).  No sign."""
    i, base = 0, 10
    if s[:2].lower() == "0x" and len(s) > 2 and s[2] in "0123456789abcdefABCDEF":
        base, i = 16, 2
    elif s[:1] == "0":
        base = 8
    value = 0
    digits = "0123456789abcdef"[:base]
    while i < len(s) and s[i].lower() in digits:
        value = (value * base + digits.index(s[i].lower())) & ((1 << 64) - 1)
        i += 1
    return value, s[i:]


def memparse(s: str):
    """lib/cmdline.c memparse: number with an optional K/M/G/T/P/E suffix
    (either case).  Returns (bytes, rest); arithmetic wraps at 64 bits."""
    value, rest = _simple_strtoull(s)
    if rest and rest[0].upper() in _SUFFIX_SHIFT:
        value = (value << _SUFFIX_SHIFT[rest[0].upper()]) & ((1 << 64) - 1)
        rest = rest[1:]
    return value, rest


def page_counter_memparse(buf: str, max_word: str):
    """page_counter_memparse → (0, nr_pages) or (-EINVAL, None).

    ``max_word`` is ``"max"`` on v2 files and ``"-1"`` on v1 files; the
    caller has already stripped whitespace (strstrip).  Bytes are rounded
    *down* to pages and capped at PAGE_COUNTER_MAX.
    """
    if buf == max_word:
        return 0, PAGE_COUNTER_MAX
    value, rest = memparse(buf)
    if rest != "":
        return -errno.EINVAL, None
    return 0, min(value // PAGE_SIZE, PAGE_COUNTER_MAX)
