"""The cross-check under the profiles of what stable releases and 7.x
changed: an episode clean under a profile with the fact is divergent, with
a named reason, under one without (and the reverse where the observation
allows it); the v2 ``max`` count two-sided where forced charges are
visible; what the observation cannot tell apart, admitted under both."""

from __future__ import annotations

import pytest
from test_crosscheck import CG, GFP_KERNEL, GFP_NOWAIT, at, cf, charge, dr, limit, oom, rc

from memcgscope.collector.crosscheck import AggregateChecker, CrossChecker

pytestmark = pytest.mark.unit

ENOMEM, EBUSY = -12, -16
GFP_NOFS = 0xC40          # GFP_KERNEL without __GFP_FS


def reasons(res):
    return [d.reason for d in res.divergences]


def v2(profile, **kw):
    return CrossChecker(profile, "v2", False, **kw)


def v2ep(steps, **kw):
    return charge(steps, v1=False, **kw)


def fails(nr=64):
    """The batch attempt and its retry at one page fail, on v2."""
    return [cf(nr, v1=False), cf(1, v1=False)]


# -- MMF_OOM_SKIP: -ENOMEM right after the counter failures, for a gfp that reclaims ------

BAIL = ("6.12", "6.18.51", "7.2", "7.3.0", "7.3")
NO_BAIL = ("6.1", "6.12.109", "6.18", "6.18.50", "7.2.4")


@pytest.mark.parametrize("profile", BAIL + NO_BAIL)
def test_an_oom_reaped_victim_fails_without_reclaim_where_the_profile_bails(profile):
    ep = v2ep(fails(), ret=ENOMEM, gfp=GFP_KERNEL)
    res = v2(profile).check(ep)
    if profile in BAIL:
        assert res.ok and res.checks == [("charge", "ok")]
        # 7.3.4+: the rejection raised the one max event
        assert res.events == ({(CG, "max"): 1} if profile == "7.3" else {})
    else:
        assert reasons(res) == ["enomem_early"]


@pytest.mark.parametrize("profile", BAIL + NO_BAIL)
def test_after_a_reclaim_the_bail_explains_nothing(profile):
    # the bail comes before the max event and reclaim: an -ENOMEM after one
    # pass with no retry left is early under every profile
    ep = v2ep(fails() + [rc(v1=False)], ret=ENOMEM)
    assert reasons(v2(profile).check(ep)) == ["enomem_early"]


def test_the_bail_of_a_high_charge_is_forced():
    # nomem forces __GFP_HIGH (and NOFAIL): the charge went through at once
    ep = v2ep(fails(), ret=0, gfp=GFP_KERNEL | 0x20)
    for profile in BAIL + NO_BAIL:
        # the PF_MEMALLOC variant admits it anyway; the max event is the forced one
        res = v2(profile).check(ep)
        assert res.ok and res.events == {(CG, "max"): 1}, profile


# -- 7.3.4: a rejected charge raises max; the v2 max count two-sided where visible ---------

def rejections(profile, n, visible):
    agg = AggregateChecker(profile, "v2", False, forced_charges_visible=visible)
    cc = v2(profile, forced_charges_visible=visible)
    for _ in range(n):
        agg.observe(cc.check(v2ep(fails(), ret=ENOMEM, gfp=GFP_NOWAIT)))
    return agg


@pytest.mark.parametrize("visible", [True, False])
def test_rejected_charges_enter_the_implied_max_on_7_3_4(visible):
    for profile, implied in (("7.3", 6), ("7.3.0", 0), ("7.2", 0)):
        assert rejections(profile, 6, visible).events.get((CG, "max"), 0) == implied, profile
    # a 7.3.4 kernel counts them: clean under 7.3; under 7.2 a surplus, flagged
    # only where every forced charge is an episode (else one could explain it)
    assert rejections("7.3", 6, visible).check_v2(CG, {"max": 6}) == []
    surplus = [d.reason for d in rejections("7.2", 6, visible).check_v2(CG, {"max": 6})]
    assert surplus == (["events_max_mismatch"] if visible else [])
    # a kernel without the fact counts none: short under 7.3, both ways
    assert [d.reason for d in rejections("7.3", 6, visible).check_v2(CG, {"max": 0})] == \
        ["events_max_mismatch"]
    assert rejections("7.2", 6, visible).check_v2(CG, {"max": 0}) == []


@pytest.mark.parametrize("profile", ["6.1", "6.12", "6.18", "7.3"])
def test_a_max_surplus_is_flagged_when_forced_charges_are_visible(profile):
    """Item 7: the kernel may not count more max events than the episodes
    imply (± the tolerance) where the charge core and
    page_counter_try_charge are probed."""
    def agg(visible):
        a = AggregateChecker(profile, "v2", False, forced_charges_visible=visible)
        # 20 charges that reclaimed once (20 max events), one forced right
        # after its failures (PF_MEMALLOC: one more), replayed here
        a.observe_episodes([v2ep(fails() + [rc(3, v1=False)]) for _ in range(20)]
                           + [v2ep(fails())])
        return a
    assert agg(True).events[(CG, "max")] == agg(False).events[(CG, "max")] == 21
    for delta, visible_verdict in ((21, []), (23, []), (24, ["events_max_mismatch"]),
                                   (40, ["events_max_mismatch"]), (18, ["events_max_mismatch"])):
        assert [d.reason for d in agg(True).check_v2(CG, {"max": delta})] == visible_verdict, delta
    # not visible: more is admitted (unseen forced charges), fewer is not
    assert agg(False).check_v2(CG, {"max": 40}) == []
    assert [d.reason for d in agg(False).check_v2(CG, {"max": 18})] == ["events_max_mismatch"]
    # the lost-event tolerance widens the visible window
    assert agg(True).check_v2(CG, {"max": 30}, lost=7) == []


def test_5_15_was_two_sided_already():
    a = AggregateChecker("5.15", "v2", False, forced_charges_visible=False)
    a.observe(v2("5.15").check(v2ep([cf(32, v1=False), cf(1, v1=False), rc(3, v1=False)])))
    assert [d.reason for d in a.check_v2(CG, {"max": 5})] == ["events_max_mismatch"]


def test_the_daemon_interface_takes_the_visibility():
    class Snap:
        def __init__(self, events):
            self.events, self.failcnt = events, {}
    for visible, want in ((True, ["events_max_mismatch"]), (False, [])):
        a = AggregateChecker("6.12", "v2", False, forced_charges_visible=visible)
        assert a.check({"/m": Snap({"max": 0, "oom": 0})}, {CG: "/m"}, []).checks == []   # baseline
        window = [v2ep(fails() + [rc(3, v1=False)])]
        res = a.check({"/m": Snap({"max": 10, "oom": 0})}, {CG: "/m"}, window)
        assert [d.reason for d in res.divergences] == want


# -- 7.3: a v1 resize keeps set_max's -EBUSY when the memcg is dying -----------------------

@pytest.mark.parametrize("profile", ["6.12", "7.2", "7.3.0", "7.3"])
def test_a_dying_memcg_ends_a_v1_resize_with_ebusy(profile):
    cc = CrossChecker(profile, "v1", True)
    dying = profile in ("7.3.0", "7.3")
    at_once = limit("memory.limit_in_bytes", [], EBUSY, 4096)
    after_progress = limit("memory.limit_in_bytes", [dr(), rc(4, cg=99, caller="v1_limit")], EBUSY, 4096)
    assert reasons(cc.check(at_once)) == ([] if dying else ["ret_mismatch"])
    assert reasons(cc.check(after_progress)) == ([] if dying else ["ebusy_after_progress"])
    # -EBUSY after a reclaim that freed nothing: every profile's loop ends so
    assert cc.check(limit("memory.limit_in_bytes", [dr(), rc(0, cg=99)], EBUSY, 4096)).ok
    # the break keeps -EBUSY: it does not make a resize succeed or fail otherwise
    assert reasons(cc.check(limit("memory.limit_in_bytes", [dr(), rc(4, cg=99)], -4, 4096))) == []
    assert reasons(cc.check(limit("memory.limit_in_bytes", [dr(), rc(4, cg=99), oom(cg=99)],
                                  EBUSY, 4096))) == ["unexpected_oom"]


# -- v2 limit loops: the superseded and dying breaks sit next to the signal test ---------

def v2max(steps, exit_max=None, text="16M"):
    ep = limit("memory.max", steps, 3, len(text), text=text, cg=93, v1=False)
    if exit_max is not None:
        ep["exit"] = at(5000, exit_max, v1=False)
    return ep


@pytest.mark.parametrize("profile", ["5.10", "6.1.56", "6.1", "6.12.0", "6.12.109", "6.18",
                                     "6.18.50", "7.2", "7.3"])
def test_a_v2_limit_loop_ending_early_is_admitted_under_every_profile(profile):
    """A pass ends at its top when the limit was superseded (6.1.188+, …),
    the memcg is dying (7.3), a signal is pending or the usage read fits:
    the observation cannot tell these apart, so no profile is wrong for it."""
    cc = v2(profile)
    r = rc(2, nr=1000, cg=93, caller="v2_max", options=None, v1=False)
    for steps in ([], [dr()], [dr(), r, r]):
        for exit_max in (None, 4096, 1 << 40):
            assert cc.check(v2max(steps, exit_max)).ok, (steps, exit_max)


# -- 6.1.56: the sync memory.high reclaim after a charge takes the charge's gfp -----------

@pytest.mark.parametrize("profile,tail_gfp_ok", [("6.1.0", GFP_KERNEL), ("6.1.56", GFP_NOFS),
                                                 ("6.1", GFP_NOFS), ("6.12", GFP_NOFS)])
def test_the_high_reclaim_tail_gfp(profile, tail_gfp_ok):
    def tail(gfp):
        return v2ep([rc(0, nr=128, gfp=gfp, caller="high", v1=False),
                     rc(0, nr=32, gfp=gfp, caller="high", v1=False)], gfp=GFP_NOFS)
    cc = v2(profile)
    assert cc.check(tail(tail_gfp_ok)).ok
    other = GFP_KERNEL if tail_gfp_ok == GFP_NOFS else GFP_NOFS
    assert reasons(cc.check(tail(other))) == ["reclaim_without_failure"]


# -- memsw.failcnt: not counted on 6.15–6.18.49 and 7.2.0–7.2.3 ---------------------------

@pytest.mark.parametrize("profile,counts", [("6.12", True), ("6.18", False), ("6.18.36", False),
                                            ("6.18.50", True), ("7.2.0", False), ("7.2.4", True),
                                            ("7.3", True)])
def test_memsw_failcnt_by_range(profile, counts):
    agg = AggregateChecker(profile, "v1", True)
    cc = CrossChecker(profile, "v1", True)
    for _ in range(5):
        agg.observe(cc.check(charge([cf(64, counter="memsw"), cf(1, counter="memsw"),
                                     rc(3, options=0)])))
    assert agg.failures[(CG, "memsw")] == 10
    for delta, ok_when_counted in ((10, True), (0, False)):
        got = [d.reason for d in agg.check_v1(CG, 0, memsw_failcnt_delta=delta)]
        want_ok = ok_when_counted if counts else delta == 0
        assert got == ([] if want_ok else ["memsw_failcnt_mismatch"]), (delta, got)


def test_a_divergent_rejection_still_counts_its_7_3_4_max():
    # an -ENOMEM that no variant replays (a third failure where the model
    # gives up after two) has not reclaimed: on 7.3.4+ it raised one max
    ep = v2ep(fails() + [cf(1, v1=False)], ret=ENOMEM, gfp=GFP_NOWAIT)
    for profile, n in (("7.3", 1), ("7.3.0", 0), ("7.2", 0)):
        res = v2(profile).check(ep)
        assert reasons(res) == ["reclaim_not_allowed"] and res.events.get((CG, "max"), 0) == n, profile
    # another return is not a rejection
    assert v2("7.3").check(dict(ep, ret=-4)).events == {}
