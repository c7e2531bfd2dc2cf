"""The collector's loop and metrics without a kernel: a fake session feeds
episodes and in-kernel aggregates; a temporary tree stands in for the
cgroup mount. Checks labels, the --cgroup filter, --max-cgroups 'other'
sums, cgroupfs gauges, removed cgroups, divergence logging and the text
format Prometheus reads."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from memcgscope.collector.cgroups import CgroupResolver
from memcgscope.collector.daemon import Daemon, DivergenceLog, profile_for_kernel
from memcgscope.collector.metrics import MemcgCollector, log2_histogram
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

    def forget_cgroup(self, cgid):
        self.forgotten.append(cgid)


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


def daemon_for(tmp_path, ids, *, globs=None, max_cgroups=None, checker=None, log=None, clock=None):
    clock = clock or Clock()
    agg = Aggregates({ids["/a"]: charge_agg(10, 12, enomem=2), ids["/b"]: charge_agg(5, 5),
                      ids["/c"]: charge_agg(1, 1), ids["/sys/x"]: charge_agg(7, 7)}, [0, 3])
    resolver = CgroupResolver(str(tmp_path), rescan_interval=0, clock=clock)
    return Daemon(FakeSession(agg), resolver=resolver, cgroup_version=1, mountpoint=str(tmp_path),
                  globs=globs, max_cgroups=max_cgroups, grace=10, checker=checker, divergence_log=log,
                  interval=15, profile="6.1", kernel="6.1.0-56-amd64", version="0.1.0", clock=clock)


def test_kernel_maps_become_labelled_series(tree):
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids)
    s = scrape(d)
    assert s[("memcgscope_charges_total", (("cgroup", "/a"),))] == 10
    assert s[("memcgscope_charged_pages_total", (("cgroup", "/a"),))] == 12
    assert s[("memcgscope_charge_failures_total", (("cgroup", "/a"), ("errno", "ENOMEM")))] == 2
    assert s[("memcgscope_charge_latency_seconds_count", (("cgroup", "/a"),))] == 10
    assert s[("memcgscope_charge_latency_seconds_bucket", (("cgroup", "/a"), ("le", "1.024e-06")))] == 0
    assert s[("memcgscope_charge_latency_seconds_bucket", (("cgroup", "/a"), ("le", "4.096e-06")))] == 10
    assert s[("memcgscope_events_lost_total", (("cpu", "1"),))] == 3
    assert s[("memcgscope_build_info", (("cgroup_version", "v1"), ("kernel", "6.1.0-56-amd64"), ("mode", "kprobe"),
                                        ("profile", "6.1"), ("version", "0.1.0")))] == 1


def test_filter_and_other(tree):
    tmp_path, ids = tree
    d = daemon_for(tmp_path, ids, globs=["/a", "/b", "/c"], max_cgroups=2)
    s = scrape(d)
    labels = {dict(k[1]).get("cgroup") for k in s if k[0] == "memcgscope_charges_total"}
    assert labels == {"/a", "/b", "other"}  # /sys/x filtered out; /c beyond the first two
    assert s[("memcgscope_charges_total", (("cgroup", "other"),))] == 1


def test_cgroupfs_gauges_and_removed_cgroups(tree):
    tmp_path, ids = tree
    clock = Clock()
    d = daemon_for(tmp_path, ids, clock=clock)
    scrape(d)  # learns the watched cgroups
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
    assert d.session.forgotten == [ids["/b"]]
    assert ("memcgscope_cgroup_usage_bytes", (("cgroup", "/b"),)) not in scrape(d)


def test_episodes_checks_and_divergence_log(tree, tmp_path_factory):
    tmp_path, ids = tree
    log_path = tmp_path_factory.mktemp("log") / "div.jsonl"

    class Checker:
        def check(self, episode):
            div = SimpleNamespace(check="charge", reason="enomem_without_oom", detail="no OOM before -ENOMEM")
            bad = episode["ret"] == -12
            return SimpleNamespace(checks=[("charge", "divergent" if bad else "ok")], divergences=[div] if bad else [])

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


def test_profile_for_kernel():
    assert profile_for_kernel("6.1.0-56-amd64") == ("6.1", None)
    assert profile_for_kernel("6.12.117+deb12-amd64")[0] == "6.12"
    profile, warning = profile_for_kernel("6.8.0-45-generic")
    assert profile == "6.6" and "nearest older" in warning


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

        def check(self, raw, watched, window, agg):
            checked.append(window)
            return SimpleNamespace(checks=[("failcnt", "ok")], divergences=[])

    d = daemon_for(tmp_path, ids, checker=Checker())
    d.aggregate_checker = Aggregate()
    for ret in (0, -12, 0):
        d.handle({"kind": "charge", "cgroup_id": ids["/a"], "ret": ret, "steps": []})
    d.tick()
    assert observed == [0, -12, 0]
    assert checked == [None]  # nothing handed over to replay a second time
    assert d.counts.checks[("failcnt", "ok")] == 1 and d.counts.checks[("charge", "ok")] == 3
