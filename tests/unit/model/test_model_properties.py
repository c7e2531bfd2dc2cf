"""Invariants over random operation sequences (hypothesis).

* a counter only ends above its max after growing if the charge was forced;
* a parent's usage is its own charges + its stock + its children's usage
  (memsw adds swapped pages; the root counter holds only its children's);
* failcnt and watermarks never decrease except on a reset write;
* every uncharge matches an earlier charge (an unmatched one is refused and
  changes nothing), and the pages charged, minus those uncharged, reclaimed
  or freed by OOM kills, are what the cgroups hold.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memcgscope.model import GFP, Kernel, OomOutcome, Task

pytestmark = pytest.mark.unit

PROFILES = ["5.10.0", "5.10", "5.15", "6.1", "6.6", "6.12", "6.18"]
PATHS = ["a", "a/b", "c"]
GFPS = [GFP.KERNEL, GFP.HIGHUSER_MOVABLE, GFP.NOWAIT, GFP.KERNEL | GFP.NORETRY,
        GFP.KERNEL | GFP.NOFAIL, GFP.KERNEL | GFP.RETRY_MAYFAIL, GFP.TRANSHUGE,
        GFP.TRANSHUGE_LIGHT, 0xa20, 0x820, GFP.KERNEL | GFP.HIGH]

charge_op = st.tuples(
    st.just("charge"), st.integers(0, len(PATHS) - 1),
    st.one_of(st.integers(1, 10), st.sampled_from([31, 32, 63, 64, 65, 100, 512])),
    st.sampled_from(GFPS), st.integers(0, 2),
    st.tuples(st.booleans(), st.booleans()),            # pf_memalloc, dying
    st.lists(st.integers(0, 40), max_size=4),           # reclaim answers
    st.sampled_from(["all", "local", "skipped"]),
    st.booleans())                                      # the OOM may kill
uncharge_op = st.tuples(st.just("uncharge"), st.integers(0, len(PATHS) - 1),
                        st.integers(1, 100))
limit_op = st.tuples(st.just("limit"), st.integers(0, len(PATHS) - 1),
                     st.one_of(st.integers(0, 400), st.just(-1)),
                     st.lists(st.integers(0, 40), max_size=3), st.booleans())
high_op = st.tuples(st.just("high"), st.integers(0, len(PATHS) - 1), st.integers(0, 400))
reset_op = st.tuples(st.just("reset"), st.integers(0, len(PATHS) - 1))
swap_op = st.tuples(st.just("swap"), st.integers(0, len(PATHS) - 1), st.integers(1, 50))
ops_strategy = st.lists(st.one_of(charge_op, charge_op, uncharge_op, limit_op, high_op,
                                  reset_op, swap_op), max_size=25)


def counters(k):
    for m in k.cgroups:
        for c in (m.memory, m.memsw, m.swap):
            if c is not None:
                yield (m.path, c.name), c


def check_hierarchy(k):
    for m in k.cgroups:
        kids = m.children
        own = 0 if m.is_root else m.charged + k.stocked(m)
        assert m.memory.usage == own + sum(c.memory.usage for c in kids), m
        if m.memsw is not None:
            own_sw = 0 if m.is_root else own + m.swapped
            assert m.memsw.usage == own_sw + sum(c.memsw.usage for c in kids), m
        if m.swap is not None:
            own_swap = 0 if m.is_root else m.swapped
            assert m.swap.usage == own_swap + sum(c.swap.usage for c in kids), m
    for _, c in counters(k):
        assert c.usage >= 0 and c.warnings == 0


def make_oracles(k, answers, kills):
    it = iter(answers)

    def reclaim(target, nr, gfp):
        # an honest oracle: never more than the subtree holds
        return min(next(it, 0), sum(m.charged for m in target.subtree()))

    def oom(target, order, gfp):
        victims = [m for m in target.subtree() if m.charged]
        if not kills or not victims:
            return False
        return OomOutcome(True, victim=victims[0], freed=victims[0].charged)
    return reclaim, oom


def freed_by(steps):
    return (sum(s.uncharged for s in steps if s.kind == "reclaim")
            + sum(s.freed for s in steps if s.kind == "oom_kill"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(PROFILES), cgroup=st.sampled_from(["v1", "v2"]),
       cpus=st.integers(1, 3), ops=ops_strategy)
def test_invariants_hold_over_random_operations(profile, cgroup, cpus, ops):
    k = Kernel(profile, cgroup=cgroup, cpus=cpus)
    cg = [k.mkdir(p) for p in PATHS]
    limit_file = "memory.limit_in_bytes" if cgroup == "v1" else "memory.max"
    net = 0  # pages charged and not yet given back, by the test's own count
    for op in ops:
        before = {key: (c.usage, c.failcnt, c.watermark) for key, c in counters(k)}
        reset = None
        steps = []
        kind, m = op[0], cg[op[1]]
        if kind == "charge":
            _, _, nr, gfp, cpu, (memalloc, dying), answers, drain, kills = op
            reclaim, oom = make_oracles(k, answers, kills)
            r = k.charge(m, nr, gfp, cpu % cpus, reclaim,
                         task=Task(pf_memalloc=memalloc, dying=dying),
                         oom=oom, drain=lambda t, c, d=drain: d)
            steps = r.steps
            assert r.ret in (0, -12)
            if r.ret == 0:
                net += nr
            forced = bool(r.of("force"))
            if not forced:
                for key, c in counters(k):
                    if c.usage > before[key][0]:
                        assert c.usage <= c.max, (key, r.steps)
        elif kind == "uncharge":
            want = op[2]
            snapshot = {key: c.usage for key, c in counters(k)}
            if want > m.charged:
                with pytest.raises(ValueError):
                    k.uncharge(m, want)
                assert snapshot == {key: c.usage for key, c in counters(k)}
            else:
                k.uncharge(m, want)
                net -= want
        elif kind == "limit":
            _, _, nr, answers, kills = op
            reclaim, oom = make_oracles(k, answers, kills)
            value = "-1" if nr < 0 and cgroup == "v1" else ("max" if nr < 0 else str(nr * 4096))
            w = k.write_ex(m, limit_file, value, reclaim=reclaim, oom=oom)
            steps = w.steps
            if cgroup == "v1" and w.ret == 0:
                assert m.memory.usage <= m.memory.max
        elif kind == "high":
            if cgroup == "v2":
                reclaim, _ = make_oracles(k, [op[2] % 7], False)
                steps = k.write_ex(m, "memory.high", str(op[2] * 4096), reclaim=reclaim).steps
        elif kind == "reset":
            if cgroup == "v1":
                assert k.write(m, "memory.failcnt", "0") == 0
                assert k.write(m, "memory.max_usage_in_bytes", "0") == 0
                reset = m.path
        elif kind == "swap":
            n = min(op[2], m.charged)
            if n:
                k.swap_out(m, n)
                net -= n
        net -= freed_by(steps)
        check_hierarchy(k)
        assert net == sum(x.charged for x in k.cgroups)
        for key, c in counters(k):
            if key[0] == reset and key[1] == "memory":
                continue
            _, failcnt, watermark = before[key]
            assert c.failcnt >= failcnt and c.watermark >= watermark, key


env_op = st.one_of(
    st.tuples(st.just("touch"), st.integers(0, 2), st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("exit"), st.integers(0, 2)),
    st.tuples(st.just("limit"), st.integers(0, len(PATHS) - 1), st.integers(50, 600)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(PROFILES), cgroup=st.sampled_from(["v1", "v2"]),
       swap=st.sampled_from([0, 200]), ops=st.lists(env_op, max_size=12))
def test_environment_pools_match_the_model(profile, cgroup, swap, ops):
    from memcgscope.model.environment import Environment
    env = Environment(Kernel(profile, cgroup=cgroup, cpus=2), swap_pages=swap)
    k = env.kernel
    cg = [k.mkdir(p) for p in PATHS]
    limit_file = "memory.limit_in_bytes" if cgroup == "v1" else "memory.max"
    names = ["t0", "t1", "t2"]
    for i, name in enumerate(names):
        env.spawn(name, cg[i])
    for op in ops:
        if op[0] == "touch":
            t = env.tasks[names[op[1]]]
            if t.alive:
                env.touch(t.name, anon=op[2], file=op[3])
        elif op[0] == "exit":
            t = env.tasks[names[op[1]]]
            if t.alive:
                env.exit(t.name)
        else:
            k.write(cg[op[1]], limit_file, str(op[2] * 4096), reclaim=env.reclaim, oom=env.oom)
        check_hierarchy(k)
        for m in k.cgroups:
            anon = sum(t.anon for t in env.tasks.values() if t.cgroup is m)
            swapped = sum(t.swapped for t in env.tasks.values() if t.cgroup is m)
            assert m.charged == anon + env.file.get(m, 0) + env.other.get(m, 0)
            assert m.swapped == swapped
        assert env.swap_free_pages == swap - sum(t.swapped for t in env.tasks.values())
