"""The oracles through which the world decides for the model: page-counter
attempts, the counter reads decisions depend on, the set_max race, signals
and the 6.18 stock trylock.  Each is asked where the kernel decides, its
answer overrides the model's own state, and a bad answer is refused."""

import errno

import pytest
from model_helpers import ALL, fill, freeing, limited, pages

from memcgscope.model import GFP, Kernel, OomOutcome, Task
from memcgscope.model.context import SIGNAL_POINTS, USAGE_POINTS

pytestmark = pytest.mark.unit

ENOMEM = -errno.ENOMEM


def recorder(answer):
    """An oracle returning ``answer(*args)`` that records its calls."""
    calls = []

    def oracle(*args):
        calls.append(args)
        return answer(*args)
    oracle.calls = calls
    return oracle


# -- attempt: page_counter_try_charge ----------------------------------------------

def test_attempt_passes_over_a_full_limit():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    failcnt = a.memory.failcnt
    att = recorder(lambda m, c, n: True)
    r = k.charge(a, 1, attempt=att)
    # other CPUs uncharged meanwhile: the batch passes, nothing is reclaimed
    assert r.ret == 0 and att.calls == [(a, "memory", 64)]
    assert r.kinds()[0] == "counter_charge" and r.of("reclaim") == []
    assert a.memory.usage == 74 and a.memory.failcnt == failcnt


def test_attempt_fails_at_an_ancestor_whatever_the_counts():
    k = Kernel("6.1", cgroup="v1")
    p = k.mkdir("p")
    c = k.mkdir("p/c")
    answers = iter([p, p, True])
    att = recorder(lambda m, cnt, n: next(answers) if cnt == "memory" else True)
    r = k.charge(c, 1, reclaim=freeing(0), attempt=att)
    assert r.ret == 0
    fails = r.of("counter_fail")
    assert [(f.counter, f.nr, f.owner) for f in fails] == [("memory", 64, "/p"), ("memory", 1, "/p")]
    # the failing level counts it and is the one reclaimed; memsw passed each time
    assert p.memory.failcnt == 2 and c.memory.failcnt == 0
    assert [s.target for s in r.of("reclaim")] == ["/p"]
    assert [x[1] for x in att.calls] == ["memsw", "memory"] * 3
    assert c.memory.usage == 1 and c.memsw.usage == 1 and p.memory.usage == 1


def test_attempt_none_is_the_arithmetic():
    for oracle in (None, lambda m, c, n: None):
        k, a = limited("6.1", "v1", 10)
        fill(k, a, 10)
        r = k.charge(a, 1, attempt=oracle)
        assert r.ret == ENOMEM and len(r.of("counter_fail")) == 19


def test_attempt_answer_outside_the_ancestry_is_refused():
    k = Kernel("6.1", cgroup="v2")
    a, b = k.mkdir("a"), k.mkdir("b")
    other = Kernel("6.1", cgroup="v2").mkdir("a")
    for bad in (b, other, False, "a"):
        with pytest.raises(ValueError, match="attempt oracle"):
            k.charge(a, 1, attempt=lambda m, c, n, bad=bad: bad)
        assert a.memory.usage == 0


# -- usage: the reads decisions depend on ------------------------------------------

def test_usage_points_are_the_documented_ones():
    readme = (__import__("pathlib").Path(__file__).resolve().parents[3] / "model" / "README.md").read_text()
    for where in USAGE_POINTS + tuple(SIGNAL_POINTS):
        assert f"`{where}`" in readme, where


def test_usage_after_reclaim_decides_the_margin_retry():
    k, a = limited("6.1", "v1", 10)
    fill(k, a, 10)
    seen = []

    def usage(m, counter, where):
        seen.append((m.path, counter, where))
        # the first read after reclaim: another CPU had just uncharged
        return 0 if len(seen) <= 2 else None
    r = k.charge(a, 1, reclaim=freeing(0), usage=usage)
    assert seen[:2] == [("/a", "memory", "charge_margin"), ("/a", "memsw", "charge_margin")]
    assert r.of("retry")[1].reason == "margin"          # [0] is the batch shrink
    # later reads are the model's counts: the charge goes on to -ENOMEM
    assert r.ret == ENOMEM and a.memory.usage == 10


def test_usage_in_mem_cgroup_out_of_memory_finds_a_margin():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    usage = recorder(lambda m, c, where: 0 if where == "oom_margin" else None)
    r = k.charge(a, 1, usage=usage, oom=lambda *x: pytest.fail("no out_of_memory() expected"),
                 task=Task(dying=True))
    # the margin read under oom_lock: another CPU uncharged, no kill needed;
    # the retries that follow end at passed_oom (the task is dying)
    assert r.of("oom")[0].result == "margin" and r.steps[-1].reason == "passed_oom_dying"
    assert [c[2] for c in usage.calls].count("oom_margin") == 1


@pytest.mark.parametrize("fname,where", [("memory.max", "max_write"), ("memory.high", "high_write")])
def test_usage_at_the_top_of_the_v2_write_loops(fname, where):
    k, a = limited("6.1", "v2", 1000)
    fill(k, a, 600)
    reads = iter([650, 620, 0])
    usage = recorder(lambda m, c, w: next(reads))
    rec = freeing(0, 0)
    r = k.write_ex(a, fname, pages(200), usage=usage, reclaim=rec)
    assert r.ret == 0 and {c[2] for c in usage.calls} == {where}
    # read 1: drain; read 2: reclaim what that read says is over; read 3: fits
    assert len(r.of("drain")) == 1 and [x[1] for x in rec.calls] == [420]


def test_usage_inside_page_counter_set_max():
    k, a = limited("6.1", "v1", 1000)
    usage = recorder(lambda m, c, w: 300 if w == "set_max" else None)
    # the model's usage is 0, the read says 300 > 200: -EBUSY after the passes
    r = k.write_ex(a, "memory.limit_in_bytes", pages(200), usage=usage, reclaim=freeing(0))
    assert r.ret == -errno.EBUSY and a.memory.max == 1000
    assert usage.calls[0] == (a, "memory", "set_max")
    assert k.write(a, "memory.limit_in_bytes", pages(400), usage=usage) == 0
    assert a.memory.max == 400


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_usage_answer_must_be_pages(bad):
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    with pytest.raises(ValueError, match="usage oracle"):
        k.charge(a, 1, usage=lambda m, c, w: bad)


# -- set_max_race --------------------------------------------------------------

def test_set_max_race_is_asked_with_the_counter():
    k, a = limited("6.1", "v1", 100)
    fill(k, a, 50)
    grown = iter([3, 0])
    race = recorder(lambda m, c: next(grown))
    # memsw.max goes from "max" down to 200: 3 pages landed after the swap, so
    # set_max restores the old max and tries again
    assert k.write(a, "memory.memsw.limit_in_bytes", pages(200), set_max_race=race) == 0
    assert race.calls == [(a, "memsw")] * 2 and a.memsw.usage == 53 and a.memsw.max == 200
    with pytest.raises(ValueError, match="set_max_race oracle"):
        k.write(a, "memory.limit_in_bytes", pages(90), set_max_race=lambda m, c: None)


# -- signal ---------------------------------------------------------------------

def points(oracle):
    return [c[1] for c in oracle.calls]


@pytest.mark.parametrize("profile,asked", [
    ("5.10.0", ["force_dying", "oom_dying"]),
    ("5.10", ["oom_dying", "passed_oom"]),
    ("6.12.109", ["oom_dying", "passed_oom"]),
    # 6.12.117+, 7.x: the MMF_OOM_SKIP test comes first, before any reclaim
    ("6.12", ["oom_skip", "oom_dying", "passed_oom"]),
    ("6.18", ["passed_oom"]),
    ("7.2", ["oom_skip", "passed_oom"]),
    ("7.3", ["oom_skip", "passed_oom"]),
])
def test_signal_points_of_a_charge(profile, asked):
    k, a = limited(profile, "v2", 10)
    fill(k, a, 10)
    sig = recorder(lambda m, where: False)
    kills = iter([True, False])
    r = k.charge(a, 1, signal=sig, oom=lambda t, o, g: OomOutcome(next(kills)))
    got = list(dict.fromkeys(points(sig)))
    assert got == asked and all(c[0] is a for c in sig.calls)
    # 5.10.0–5.10.79 retries after an OOM without remembering it: no passed_oom
    assert len(r.of("oom")) == 2


def test_signal_at_passed_oom_ends_the_charge_there():
    k, a = limited("6.1", "v2", 10)
    fill(k, a, 10)
    # the fatal signal arrives after the first OOM, not before it
    sig = recorder(lambda m, where: where == "passed_oom")
    r = k.charge(a, 1, signal=sig, oom=lambda t, o, g: True, task=Task(dying=False))
    assert r.ret == ENOMEM and r.steps[-1].reason == "passed_oom_dying"
    assert len(r.of("oom")) == 1 and r.of("oom")[0].result == "victim_exiting"


def test_signal_oracle_overrides_the_task_fields():
    k, a = limited("6.12", "v2", 10)
    fill(k, a, 10)
    # a dying task for which the oracle says no signal at mem_cgroup_out_of_memory
    # (nor an OOM reaper done with its mm)
    sig = recorder(lambda m, where: where not in ("oom_dying", "oom_skip"))
    r = k.charge(a, 1, task=Task(dying=True), signal=sig, oom=lambda t, o, g: False)
    assert r.of("oom")[0].result == "no_victim" and r.ret == ENOMEM


@pytest.mark.parametrize("cgroup,fname,where,ret", [
    ("v1", "memory.limit_in_bytes", "resize", -errno.EINTR),
    ("v2", "memory.max", "max_write", 0),
    ("v2", "memory.high", "high_write", 0),
    ("v2", "memory.reclaim", "reclaim_write", -errno.EINTR),
])
def test_signal_points_of_the_write_loops(cgroup, fname, where, ret):
    k, a = limited("6.1", cgroup, 1000)
    fill(k, a, 600)
    n = []
    # the signal arrives before the third pass
    sig = recorder(lambda m, w: n.append(1) or len(n) >= 3)
    r = k.write_ex(a, fname, pages(200), signal=sig, reclaim=freeing(1, 1, 1, 1))
    assert set(points(sig)) == {where} and len(sig.calls) == 3
    assert r.ret == ret
    assert len(r.of("reclaim")) == (2 if where == "reclaim_write" else 1)


def test_signal_answer_must_be_a_bool():
    k, a = limited("6.1", "v1", 1000)
    with pytest.raises(ValueError, match="signal oracle"):
        k.write(a, "memory.limit_in_bytes", pages(10), signal=lambda m, w: 1)


def test_signal_points_default_to_task_fields():
    assert set(SIGNAL_POINTS.values()) == {"dying", "signal_pending", "oom_reaped"}
    for where, fieldname in SIGNAL_POINTS.items():
        assert hasattr(Task(), fieldname), where


# -- defaults: no oracle and oracles that defer give the same run ----------------------

@pytest.mark.parametrize("profile", ALL)
def test_deferring_oracles_change_nothing(profile):
    def run(**oracles):
        k, a = limited(profile, "v1", 10)
        fill(k, a, 10)
        r = k.charge(a, 1, GFP.KERNEL, reclaim=freeing(0, 2), **oracles)
        w = k.write_ex(a, "memory.limit_in_bytes", pages(5), reclaim=freeing(1, 0),
                       **{x: y for x, y in oracles.items() if x in ("usage", "signal")})
        return r.as_dict(), w.as_dict(), k.snapshot()
    deferring = dict(attempt=lambda m, c, n: None, usage=lambda m, c, w: None,
                     signal=lambda m, w: False, stock_locked=lambda cpu: False)
    assert run() == run(**deferring)
