"""The collector's loop and metrics without a kernel: a fake session feeds
episodes and in-kernel aggregates; a temporary tree stands in for the
cgroup mount. Checks labels, the --cgroup filter, --max-cgroups 'other'
sums, cgroupfs gauges, removed cgroups, divergence logging, the text
format Prometheus reads, and that a scrape changes no state."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memcgscope.collector.cgroupfs import CgroupfsReader
from memcgscope.collector.cgroups import CgroupResolver
from memcgscope.collector.daemon import Daemon, DivergenceLog, Facts
from memcgscope.collector.metrics import MemcgCollector, log2_histogram
from memcgscope.collector.pipeline import CheckPipeline
from memcgscope.collector.watch import WatchList
from memcgscope.probes.session import Aggregates, CgroupAggregate

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeSession:
    mode = "kprobe"

    def __init__(self, aggregates):
        self._agg = aggregates
        self.forgotten = []

    def aggregates(self):
        return self._agg

    def status(self):
        return [SimpleNamespace(role="charge_core", target="try_charge_memcg", kind="kprobe", attached=True)]

    def lost(self):
        return [0, 3]

    def forget_cgroups(self, cgids):
        self.forgotten.append(set(cgids))
        return len(cgids)

    def forget_tasks(self, alive):
        return 0


def make_tree(tmp_path, names):
    ids = {}
    for name in names:
        d = tmp_path / name.lstrip("/")
        d.mkdir(parents=True)
        ids[name] = d.stat().st_ino
    return ids


def write_v1(tmp_path, name, usage, limit, failcnt):
    d = tmp_path / name.lstrip("/")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.failcnt").write_text(f"{failcnt}\n")


def scrape(daemon) -> dict:
    registry = CollectorRegistry()
    registry.register(MemcgCollector(daemon))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def charge_agg(calls, pages, enomem=0, slots=None):
    a = CgroupAggregate()
    a.charges = {"calls": calls, "pages": pages, "slow": 1, "fail_enomem": enomem, "fail_eintr": 0,
                 "fail_other": 0, "ns": 2000}
    a.charge_latency = slots or {10: calls}
    return a


@pytest.fixture
def tree(tmp_path):
    ids = make_tree(tmp_path, ["/a", "/b", "/c", "/sys/x"])
    for name in ("/a", "/b", "/c", "/sys/x"):
        write_v1(tmp_path, name, 4096 * 10, 9223372036854771712 if name == "/c" else 32 << 20, 5)
    return tmp_path, ids


class Pipeline(CheckPipeline):
    """The real pipeline with a stand-in checker (``check(episode)``)."""

    def __init__(self, checker):
        super().__init__("6.1", "v1", True)
        self.checker = checker


def daemon_for(tmp_path, ids, *, globs=None, max_cgroups=None, checker=None, log=None, clock=None):
    clock = clock or Clock()
    agg = Aggregates({ids["/a"]: charge_agg(10, 12, enomem=2), ids["/b"]: charge_agg(5, 5),
                      ids["/c"]: charge_agg(1, 1), ids["/sys/x"]: charge_agg(7, 7)}, [0, 3])
    resolver = CgroupResolver(str(tmp_path), rescan_interval=0, clock=clock)
    watch = WatchList(resolver, globs=globs or (), max_cgroups=max_cgroups, grace=10, clock=clock)
    return Daemon(FakeSession(agg), watch=watch, reader=CgroupfsReader(str(tmp_path), 1),
                  pipeline=Pipeline(checker) if checker else None, divergence_log=log, interval=15,
                  facts=Facts(version="0.1.0", kernel="6.1.0-56-amd64", upstream="6.1.192", profile="6.1",
                              cgroup_version=1), clock=clock)


def test_kernel_maps_become_labelled_series(tree):
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids)
    d.tick()   # the maps' cgroups are learnt by the main loop, not by scrapes
    s = scrape(d)
    assert s[("memcgscope_charges_total", (("cgroup", "/a"),))] == 10
    assert s[("memcgscope_charged_pages_total", (("cgroup", "/a"),))] == 12
    assert s[("memcgscope_charge_failures_total", (("cgroup", "/a"), ("errno", "ENOMEM")))] == 2
    assert s[("memcgscope_charge_latency_seconds_count", (("cgroup", "/a"),))] == 10
    assert s[("memcgscope_charge_latency_seconds_bucket", (("cgroup", "/a"), ("le", "1.024e-06")))] == 0
    assert s[("memcgscope_charge_latency_seconds_bucket", (("cgroup", "/a"), ("le", "4.096e-06")))] == 10
    assert s[("memcgscope_events_lost_total", (("cpu", "1"),))] == 3
    assert s[("memcgscope_build_info", (("cgroup_version", "v1"), ("kernel", "6.1.0-56-amd64"), ("mode", "kprobe"),
                                        ("profile", "6.1"), ("profile_exact", "true"), ("upstream", "6.1.192"),
                                        ("version", "0.1.0")))] == 1


def test_scrape_changes_no_state(tree):
    """Review bug: a scrape labelled and watched the cgroups it met in the
    maps. Now only the main loop does; a scrape reads what it published."""
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids, max_cgroups=2)
    s = scrape(d)
    assert not [k for k in s if k[0] == "memcgscope_charges_total"]   # nothing published yet
    assert d.watch.watched() == {} and d.watch.limiter.tracked() == set()
    d.tick()
    before = (d.watch.watched(), d.watch.limiter.tracked(), dict(d.view().labels), d.episode_counts())
    for _ in range(3):
        scrape(d)
    assert (d.watch.watched(), d.watch.limiter.tracked(), dict(d.view().labels), d.episode_counts()) == before


def test_filter_and_other(tree):
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids, globs=["/a", "/b", "/c"], max_cgroups=2)
    d.tick()
    s = scrape(d)
    labels = {dict(k[1]).get("cgroup") for k in s if k[0] == "memcgscope_charges_total"}
    assert labels == {"/a", "/b", "other"}  # /sys/x filtered out; /c beyond the first two
    assert s[("memcgscope_charges_total", (("cgroup", "other"),))] == 1


def test_cgroupfs_gauges_and_removed_cgroups(tree):
    tmp_path, ids = tree
    clock = Clock()
    d = daemon_for(tmp_path, ids, clock=clock)
    d.tick()
    s = scrape(d)
    assert s[("memcgscope_cgroup_usage_bytes", (("cgroup", "/a"),))] == 40960
    assert s[("memcgscope_cgroup_limit_bytes", (("cgroup", "/a"),))] == 32 << 20
    assert s[("memcgscope_cgroup_limit_bytes", (("cgroup", "/c"),))] == float("inf")
    assert s[("memcgscope_cgroup_failcnt_total", (("cgroup", "/a"), ("counter", "memory")))] == 5
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    (tmp_path / "b").rmdir()
    d.tick()
    assert d.session.forgotten == []  # within the grace period
    clock.now += 11
    d.tick()
    assert d.session.forgotten == [{ids["/b"]}]
    assert ("memcgscope_cgroup_usage_bytes", (("cgroup", "/b"),)) not in scrape(d)


def test_removed_cgroups_lose_their_episode_series(tree):
    """Review bug: per-cgroup episode counts of removed cgroups were never
    dropped; now they go when the label's slot is freed (after --grace)."""
    tmp_path, ids = tree
    clock = Clock()
    d = daemon_for(tmp_path, ids, clock=clock)
    d.handle({"kind": "charge", "cgroup_id": ids["/b"], "ret": 0, "steps": []})
    d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": 0, "steps": []})
    d.tick()
    key = ("memcgscope_episodes_total", (("cgroup", "/b"), ("kind", "charge")))
    assert scrape(d)[key] == 1
    for f in (tmp_path / "b").iterdir():
        f.unlink()
    (tmp_path / "b").rmdir()
    d.tick()
    clock.now += 11
    d.tick()
    s = scrape(d)
    assert key not in s
    assert s[("memcgscope_episodes_total", (("cgroup", "/a"), ("kind", "charge")))] == 1


def test_unwatched_cgroups_are_pruned_from_the_maps(tree):
    """Review bug: with --cgroup, map entries of cgroups outside the filter
    were never pruned, so the maps filled; they are dropped at each tick."""
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids, globs=["/a"])
    d.handle({"kind": "charge", "cgroup_id": ids["/sys/x"], "ret": 0, "steps": []})
    d.tick()
    assert d.session.forgotten == [{ids["/b"], ids["/c"], ids["/sys/x"]}]
    assert set(d.view().labels) == {ids["/a"]}


def test_scrapes_survive_an_episode_flood(tree):
    """Review bug: /metrics iterated the episode and check counters while
    the main loop inserted keys ("dictionary changed size during
    iteration"). Scrapes now read copies taken under the lock."""
    tmp_path, ids = tree

    class Checker:
        def check(self, episode):
            return SimpleNamespace(checks=[(f"c{episode['n']}", "ok")], divergences=[],
                                   events={}, failures={}, kills=0)

    d = daemon_for(tmp_path, ids, checker=Checker())
    d.tick()
    stop = threading.Event()
    errors = []

    def flood():
        n = 0
        while not stop.is_set():
            # every key new: the counters grow while the scrape iterates them
            d.handle({"kind": f"k{n}", "cgroup_id": ids["/a"], "ret": 0, "steps": [], "n": n})
            n += 1

    t = threading.Thread(target=flood)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                scrape(d)
            except RuntimeError as e:
                errors.append(e)
                break
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_episodes_checks_and_divergence_log(tree, tmp_path_factory):
    tmp_path, ids = tree
    log_path = tmp_path_factory.mktemp("log") / "div.jsonl"

    class Checker:
        def check(self, episode):
            div = SimpleNamespace(check="charge", reason="enomem_without_oom", detail="no OOM before -ENOMEM",
                                  episode=episode)
            bad = episode["ret"] == -12
            return SimpleNamespace(checks=[("charge", "divergent" if bad else "ok")], divergences=[div] if bad else [],
                                   events={}, failures={}, kills=0)

    d = daemon_for(tmp_path, ids, checker=Checker(), log=DivergenceLog(str(log_path)))
    d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": 0, "steps": []})
    d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": -12, "steps": []})
    d.handle({"kind": "charge", "cgroup_id": 999999999, "ret": 0, "steps": []})  # unknown id: waits for a walk
    d.tick()
    s = scrape(d)
    assert s[("memcgscope_episodes_total", (("cgroup", "/a"), ("kind", "charge")))] == 2
    assert s[("memcgscope_model_checks_total", (("check", "charge"), ("verdict", "ok")))] == 1
    assert s[("memcgscope_divergences_total", (("check", "charge"), ("reason", "enomem_without_oom")))] == 1
    assert s[("memcgscope_unresolved_cgroup_events_total", ())] == 1
    (line,) = log_path.read_text().splitlines()
    rec = json.loads(line)
    assert rec["reason"] == "enomem_without_oom" and rec["episode"]["cgroup"] == "/a" and rec["profile"] == "6.1"


def test_divergence_log_rotates(tmp_path):
    log = DivergenceLog(str(tmp_path / "d.jsonl"), max_bytes=200)
    for i in range(20):
        log.write({"n": i, "pad": "x" * 20})
    log.close()
    assert os.path.exists(tmp_path / "d.jsonl.1")
    assert os.path.getsize(tmp_path / "d.jsonl") <= 200 + 50


def test_log2_histogram_bounds_are_exact():
    b = dict(log2_histogram({9: 1, 10: 2, 11: 4, 40: 8}))
    assert b["1.024e-06"] == 1      # slot 9 = [512, 1024) ns
    assert b["4.096e-06"] == 7
    assert b["+Inf"] == 15


def test_aggregate_check_uses_the_episode_replays_already_done(tree):
    """Every episode is replayed once: the aggregate checker is fed the
    per-episode results and checks the interval without replaying again."""
    tmp_path, ids = tree
    observed, checked = [], []

    class Checker:
        def check(self, episode):
            return SimpleNamespace(checks=[("charge", "ok")], divergences=[], tag=episode["ret"])

    class Aggregate:
        def observe(self, result):
            observed.append(result.tag)

        def check(self, raw, watched, window, agg, busy=()):
            checked.append(window)
            return SimpleNamespace(checks=[("failcnt", "ok")], divergences=[])

    d = daemon_for(tmp_path, ids, checker=Checker())
    d.pipeline.aggregates = Aggregate()
    for ret in (0, -12, 0):
        d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": ret, "steps": []})
    d.tick()
    assert observed == [0, -12, 0]
    assert checked == [None]  # nothing handed over to replay a second time
    counts = d.check_counts()
    assert counts.checks[("failcnt", "ok")] == 1 and counts.checks[("charge", "ok")] == 3


def test_a_checker_bug_is_a_replay_error_and_never_stops_the_loop(tree):
    tmp_path, ids = tree

    class Checker:
        def check(self, episode):
            raise ZeroDivisionError("a bug of ours")

    d = daemon_for(tmp_path, ids, checker=Checker())
    d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": 0, "steps": []})
    d.tick()
    s = scrape(d)
    assert s[("memcgscope_divergences_total", (("check", "charge"), ("reason", "replay_error")))] == 1
    assert s[("memcgscope_replay_errors_total", ())] == 1


def test_cgroup_info_names_the_workload(tmp_path):
    uid = "0f5a4c1e-8d2b-4b7a-9a3e-2c6d1f0e9b77"
    cid = "3f2a" + "b" * 60
    pod = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    ids = make_tree(tmp_path, ["/system.slice/nginx.service", pod, f"{pod}/cri-containerd-{cid}.scope"])
    (tmp_path / "var/log/pods" / f"shop_cart_{uid}").mkdir(parents=True)
    from memcgscope.collector.identity import NodeNames
    from memcgscope.probes.sysroot import SysRoot
    clock = Clock()
    resolver = CgroupResolver(str(tmp_path), rescan_interval=0, clock=clock)
    agg = Aggregates({i: charge_agg(1, 1) for i in ids.values()}, [0])
    d = Daemon(FakeSession(agg), watch=WatchList(resolver, clock=clock), reader=CgroupfsReader(str(tmp_path), 2),
               names=NodeNames(SysRoot(str(tmp_path))), clock=clock)
    d.tick()
    s = scrape(d)
    info = {dict(k[1])["cgroup"]: dict(k[1]) for k in s if k[0] == "memcgscope_cgroup_info"}
    assert info["/system.slice/nginx.service"]["unit"] == "nginx.service"
    c = info[f"{pod}/cri-containerd-{cid}.scope"]
    assert (c["namespace"], c["pod"], c["pod_uid"], c["container_id"], c["runtime"]) == \
        ("shop", "cart", uid, cid, "containerd")
