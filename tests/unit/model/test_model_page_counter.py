"""page_counter (§5) and page_counter_memparse."""

import errno

import pytest

from memcgscope.model import PAGE_COUNTER_MAX, Kernel
from memcgscope.model.page_counter import PageCounter, page_counter_memparse

pytestmark = pytest.mark.unit


class _Owner:
    def __init__(self, path):
        self.path = path


def chain(*maxes, **kw):
    """Counters leaf → root with the given max values (first is the leaf)."""
    parent = None
    made = []
    for i, mx in reversed(list(enumerate(maxes))):
        c = PageCounter("memory", _Owner(f"/l{i}"), parent, **kw)
        c.max = mx
        made.append(c)
        parent = c
    return list(reversed(made))


def test_try_charge_fails_at_the_ancestor_and_counts_failcnt_there():
    leaf, mid, top = chain(100, 10, 1000)
    ok, fail = leaf.try_charge(11)
    assert not ok and fail is mid
    assert (leaf.usage, mid.usage, top.usage) == (0, 0, 0)
    assert (leaf.failcnt, mid.failcnt, top.failcnt) == (0, 1, 0)
    # the leaf passed before the parent refused: its watermark moved (as in the kernel)
    assert leaf.watermark == 11 and mid.watermark == 0


def test_usage_equal_to_max_is_allowed():
    leaf, top = chain(10, 10)
    assert leaf.try_charge(10) == (True, None)
    assert leaf.usage == top.usage == 10
    ok, fail = leaf.try_charge(1)
    assert not ok and fail is leaf and leaf.failcnt == 1


def test_forced_charge_ignores_max_and_moves_watermark():
    leaf, top = chain(5, 5)
    leaf.charge(8)
    assert leaf.usage == 8 and leaf.watermark == 8 and top.watermark == 8
    leaf.uncharge(8)
    assert leaf.usage == 0 and leaf.watermark == 8


def test_uncharge_below_zero_clamps_from_5_15_not_on_5_10():
    new, = chain(10, clamps=True)
    old, = chain(10, clamps=False)
    new.uncharge(3)
    old.uncharge(3)
    assert new.usage == 0 and new.warnings == 1
    assert old.usage == -3 and old.warnings == 1


def test_local_watermark_from_6_12():
    c, = chain(100, has_local_watermark=True)
    c.try_charge(7)
    assert c.local_watermark == 7 and c.watermark == 7
    c.uncharge(7)
    c.local_watermark = 0  # a memory.peak write resets it
    c.try_charge(3)
    assert c.local_watermark == 3 and c.watermark == 7


def test_track_failcnt_off_counts_nothing_anywhere():
    leaf, top = chain(100, 5, track_failcnt=False)
    assert not leaf.try_charge(6)[0]
    assert leaf.failcnt == top.failcnt == 0


def test_set_max_busy_and_ok():
    c, = chain(100)
    c.charge(50)
    assert c.set_max(49) == -errno.EBUSY and c.max == 100
    assert c.set_max(50) == 0 and c.max == 50


def test_set_max_race_retries_before_6_1_but_not_when_enlarging_on_6_1():
    grown = iter([1, 0])
    old, = chain(10, set_max_enlarge_ok=False)
    old.charge(5)
    assert old.set_max(20, lambda: next(grown)) == 0
    assert old.usage == 6 and old.max == 20  # retried once, then no growth
    calls = []
    new, = chain(10, set_max_enlarge_ok=True)
    new.charge(5)
    assert new.set_max(20, lambda: calls.append(1) or 1) == 0
    assert len(calls) == 1  # 6.1+: new ≥ old ends the loop at once


def test_set_max_shrink_loses_the_race_and_reports_busy():
    c, = chain(10, set_max_enlarge_ok=True)
    c.charge(5)
    # a concurrent charge lands after the swap: usage 5 → 8 > 7 → -EBUSY
    assert c.set_max(7, lambda: 3) == -errno.EBUSY
    assert c.max == 10


@pytest.mark.parametrize("text,word,expect", [
    ("4097", "-1", 1),            # rounded down
    ("4095", "-1", 0),
    ("1k", "-1", 0),
    ("8K", "-1", 2),
    ("1M", "max", 256),
    ("1m", "max", 256),
    ("2G", "max", 524288),
    ("0x2000", "-1", 2),          # base 0, like simple_strtoull
    ("010000", "-1", 1),          # octal 4096
    ("-1", "-1", PAGE_COUNTER_MAX),
    ("max", "max", PAGE_COUNTER_MAX),
    ("99999999999999999999K", "max", None),  # wraps at 64 bits; only the range is checked
])
def test_page_counter_memparse(text, word, expect):
    err, nr = page_counter_memparse(text, word)
    assert err == 0
    if expect is not None:
        assert nr == expect
    else:
        assert 0 <= nr <= PAGE_COUNTER_MAX


@pytest.mark.parametrize("text,word", [
    ("max", "-1"), ("-1", "max"), ("-2", "-1"), ("1.5M", "max"), ("12abc", "-1"),
    ("1MB", "max"), ("ten", "max"),
])
def test_page_counter_memparse_rejects(text, word):
    assert page_counter_memparse(text, word) == (-errno.EINVAL, None)


@pytest.mark.parametrize("cg,file,text,shown", [
    ("v1", "memory.limit_in_bytes", "4097", "4096\n"),
    ("v1", "memory.limit_in_bytes", " 8K\n", "8192\n"),
    ("v1", "memory.limit_in_bytes", "-1", "9223372036854771712\n"),
    ("v2", "memory.max", "4097", "4096\n"),
    ("v2", "memory.max", "max\n", "max\n"),
    ("v2", "memory.max", "9223372036854775807", "max\n"),   # capped at PAGE_COUNTER_MAX
])
def test_limit_write_rounds_like_the_kernel(cg, file, text, shown):
    k = Kernel("6.1", cgroup=cg)
    a = k.mkdir("a")
    assert k.write(a, file, text) == 0
    assert k.read(a, file) == shown


@pytest.mark.parametrize("cg,file,text", [
    ("v1", "memory.limit_in_bytes", "max"),
    ("v2", "memory.max", "-1"),
    ("v2", "memory.high", "1.5G"),
    ("v1", "memory.soft_limit_in_bytes", "lots"),
])
def test_limit_write_parse_errors(cg, file, text):
    k = Kernel("6.1", cgroup=cg)
    a = k.mkdir("a")
    before = k.read(a, file)
    assert k.write(a, file, text) == -errno.EINVAL
    assert k.read(a, file) == before
