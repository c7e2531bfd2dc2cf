"""Recordings name their cgroups: `record` on "machine A" (a fake cgroupfs
tree and node files, resolved by the collector's own resolver) writes a
cgroup line per id before it is first mentioned; `replay` on "machine B",
where the tree is gone and every host lookup raises, names every cgroup
from the recording alone.  Also: HostNames walks again for a cgroup newer
than the resolver's last walk, make.py carries an artifact's `cgroups`
map, and recordings without names (schema /1) replay as ids."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from test_record import FakeSession, record

from memcgscope.collector import replay_cmd
from memcgscope.collector.cgroups import CgroupResolver, MemoryHierarchy
from memcgscope.collector.identity import NodeNames
from memcgscope.collector.record_cmd import HostNames
from memcgscope.probes.episodes import cgroup_ids, read_recording
from memcgscope.probes.sysroot import SysRoot

pytestmark = pytest.mark.unit

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"
SOURCE = RECORDINGS / "debian-6.1-v1-kprobe.jsonl"     # ids 35 (thp, OOMs), 67 (file), 99 (v1_limit)
UID = "0f5a4c1e-8d2b-4b7a-9a3e-2c6d1f0e9b77"
CID = "3f2a" + "b" * 60
POD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
CONTAINER = f"{POD}/cri-containerd-{CID}.scope"
NGINX = "/system.slice/nginx.service"
SESSION = "/user.slice/user-1000.slice/session-3.scope"


def replay(*argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    replay_cmd.add_parser(sub)
    args = ap.parse_args(["replay", *map(str, argv)])
    return args.func(args)


class MachineA:
    """A fake memory hierarchy (directories: their inodes are the ids) and
    node files naming the pod and its container."""

    def __init__(self, root: Path):
        self.root = root
        self.tree = root / "memory"
        self.ids = {}
        for path in (CONTAINER, NGINX, SESSION, "/doomed"):
            (self.tree / path.lstrip("/")).mkdir(parents=True)
        for path in (POD, CONTAINER, NGINX, SESSION, "/doomed"):
            self.ids[path] = (self.tree / path.lstrip("/")).stat().st_ino
        (self.tree / "doomed").rmdir()          # removed before it was named: path null
        (root / "node/var/log/pods" / f"shop_cart-7d9f_{UID}" / "app").mkdir(parents=True)
        (root / "node/var/log/containers").mkdir(parents=True)
        (root / f"node/var/log/containers/cart-7d9f_shop_app-{CID}.log").symlink_to("/nowhere")

    def names(self) -> HostNames:
        return HostNames(MemoryHierarchy(1, "/sys/fs/cgroup/memory", "/"), CgroupResolver(str(self.tree)),
                         NodeNames(SysRoot(str(self.root / "node"))))


def remapped_episodes(a: MachineA) -> list[dict]:
    """The committed recording's episodes on machine A's cgroups, plus an
    OOM kill triggered in the pod (the parent) whose victim is in the
    container, and a memcg reclaim of a cgroup removed before it was named."""
    m = {35: a.ids[CONTAINER], 67: a.ids[NGINX], 99: a.ids[SESSION]}
    out = []
    for line in SOURCE.read_text().splitlines():
        ep = json.loads(line)
        if ep.get("type") != "episode":
            continue
        ep["cgroup_id"] = m[ep["cgroup_id"]]
        for s in ep["steps"]:
            if s.get("cgroup_id") is not None:
                s["cgroup_id"] = m[s["cgroup_id"]]
        out.append(ep)
    out.append({"type": "episode", "kind": "oom_kill", "ts_ns": 1, "pid": 7, "tid": 7, "comm": "dd", "cpu": 0,
                "cgroup_id": a.ids[POD], "victim_pid": 77, "victim_cgroup_id": a.ids[CONTAINER],
                "victim_comm": "app", "steps": [], "ret": 0, "duration_ns": 0})
    out.append({"type": "episode", "kind": "reclaim", "ts_ns": 2, "pid": 8, "tid": 8, "comm": "kswapd", "cpu": 1,
                "cgroup_id": a.ids["/doomed"], "caller": "unknown", "attribution": "task", "gfp": 0xcc0,
                "steps": [], "ret": 3, "exit": {"usage": 1, "max": 2}, "duration_ns": 5})
    return out


def session_of(episodes):
    class Session(FakeSession):
        def __init__(self, mode=None, **kw):
            super().__init__(mode, **kw)
            self.batches = [episodes[i:i + 9] for i in range(0, len(episodes), 9)]
    return Session


def forbid_host(monkeypatch):
    """Machine B: any look at the host's cgroups or node files fails the test."""
    def boom(*a, **kw):
        raise AssertionError("replay looked at this host's cgroups")
    for target in ("memcgscope.collector.cgroups.CgroupResolver.path",
                   "memcgscope.collector.cgroups.CgroupResolver.rescan",
                   "memcgscope.collector.cgroups.CgroupResolver._scan",
                   "memcgscope.collector.cgroups.resolver_for",
                   "memcgscope.collector.cgroups.find_memory_hierarchy",
                   "memcgscope.collector.identity.NodeNames.refresh",
                   "memcgscope.collector.record_cmd.host_names"):
        monkeypatch.setattr(target, boom)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """A recording made on machine A, and what A knew."""
    a = MachineA(tmp_path / "a")
    eps = remapped_episodes(a)
    out = tmp_path / "named.jsonl"
    assert record(monkeypatch, "--out", out, session=session_of(eps), names=a.names) == 0
    return a, eps, out


def test_a_named_recording_replays_named_on_another_machine(recorded, monkeypatch, capsys):
    a, eps, out = recorded
    rec = read_recording(out.read_text(), str(out))
    assert rec.named and rec.warnings == [] and len(rec.episodes) == len(eps)
    assert rec.header["cgroup_names"] == {"relative_to": "/sys/fs/cgroup/memory", "source": "cgroupfs"}
    capsys.readouterr()

    # machine B: the tree is gone and every host lookup raises
    shutil.rmtree(a.root)
    monkeypatch.undo()
    forbid_host(monkeypatch)
    assert replay("--json", out) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["cgroup_names"] == "recording" and s["divergences"] == 0
    by_id = {c["id"]: c for c in s["cgroups"]}
    assert set(by_id) == {a.ids[p] for p in (POD, CONTAINER, NGINX, SESSION, "/doomed")}
    want = {POD: (POD, "shop/cart-7d9f"), CONTAINER: (CONTAINER, "shop/cart-7d9f/app"),
            NGINX: (NGINX, "nginx.service"), SESSION: (SESSION, "session-3.scope"), "/doomed": (None, "")}
    for path, (p, workload) in want.items():
        c = by_id[a.ids[path]]
        assert (c["path"], c["workload"], c["named"]) == (p, workload, True), path
    assert by_id[a.ids[CONTAINER]]["identity"] == {
        "unit": f"cri-containerd-{CID}.scope", "slice": POD.rsplit("/", 1)[1], "pod_uid": UID, "namespace": "shop",
        "pod": "cart-7d9f", "container": "app", "container_id": CID, "runtime": "containerd"}
    # trigger and victim counted apart: the pod's OOM killed in the container
    assert (by_id[a.ids[POD]]["oom_kills"], by_id[a.ids[POD]]["oom_victims"]) == (1, 0)
    assert by_id[a.ids[CONTAINER]]["oom_victims"] == 1
    assert sum(c["episodes"] for c in s["cgroups"]) == len(eps)

    assert replay(out) == 0
    text = capsys.readouterr().out
    assert "5 cgroups (named from the recording):" in text
    for name in ("shop/cart-7d9f/app", NGINX, "nginx.service", SESSION, f"id {a.ids['/doomed']} (gone)"):
        assert name in text, name
    assert f"  {CONTAINER}\n" in text                  # a path is shown whole


def test_replay_of_the_named_recording_checks_as_the_unnamed_one(recorded, monkeypatch, capsys):
    """Names change no verdict: the same episodes without their cgroup
    lines (and with the /1 header) give the same checks."""
    a, eps, out = recorded
    forbid_host(monkeypatch)
    assert replay("--json", out) == 0
    named = json.loads(capsys.readouterr().out)
    lines = [x for x in out.read_text().splitlines() if json.loads(x)["type"] != "cgroup"]
    h = json.loads(lines[0])
    h["schema"] = "memcgscope.episodes/1"
    del h["cgroup_names"]
    bare = out.with_name("bare.jsonl")
    bare.write_text("\n".join([json.dumps(h)] + lines[1:]) + "\n")
    assert replay("--json", bare) == 0
    unnamed = json.loads(capsys.readouterr().out)
    assert named["checks"] == unnamed["checks"] and named["episodes"] == unnamed["episodes"]
    assert unnamed["cgroup_names"] == "none"
    assert [c["id"] for c in unnamed["cgroups"]] == [c["id"] for c in named["cgroups"]]
    assert all(not c["named"] and c["path"] is None for c in unnamed["cgroups"])


def test_divergences_file_names_the_cgroup(recorded, monkeypatch, tmp_path, capsys):
    a, eps, out = recorded
    lines = out.read_text().splitlines()
    # a charge of the nginx cgroup edited to fail right after its first reclaim
    for i, line in enumerate(lines):
        ep = json.loads(line)
        if ep.get("kind") == "charge" and ep["cgroup_id"] == a.ids[NGINX] and ep["nr_pages"] == 1:
            j = next(k for k, st in enumerate(ep["steps"]) if st["kind"] == "reclaim")
            ep["steps"] = ep["steps"][:j + 1]
            ep["steps"][-1]["freed"] = 0
            ep["ret"] = -12
            lines[i] = json.dumps(ep)
            break
    else:
        raise AssertionError("no 1-page charge of the nginx cgroup")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    forbid_host(monkeypatch)
    div = tmp_path / "div.jsonl"
    assert replay("--divergences", div, bad) == 1
    (d,) = [json.loads(x) for x in div.read_text().splitlines()]
    assert d["cgroup"] == {"id": a.ids[NGINX], "path": NGINX, "workload": "nginx.service"}
    assert d["line"] == i + 1
    assert "nginx.service" in capsys.readouterr().out
    assert replay("--json", bad) == 1
    rows = {c["id"]: c for c in json.loads(capsys.readouterr().out)["cgroups"]}
    assert rows[a.ids[NGINX]]["divergences"] == 1 and sum(c["divergences"] for c in rows.values()) == 1


def test_text_lists_the_busiest_cgroups_and_says_how_many_more(tmp_path, monkeypatch, capsys):
    from memcgscope.probes.episodes import RecordingWriter, make_header
    lines = SOURCE.read_text().splitlines()
    h = json.loads(lines[0])
    header = make_header(kernel=h["kernel"], kernel_version=h.get("kernel_version"), mode=h["mode"],
                         cgroup=h["cgroup"], memsw=h["memsw"], probes=h["probes"], profile="6.1",
                         cgroup_names={"relative_to": "/sys/fs/cgroup/memory", "source": "cgroupfs"})
    ep = next(json.loads(x) for x in lines if json.loads(x).get("kind") == "limit_write")
    p = tmp_path / "many.jsonl"
    with open(p, "w") as f:
        w = RecordingWriter(f, header, lambda cgid: (f"/job-{cgid}.scope", {"unit": f"job-{cgid}.scope"}))
        for cgid in range(1, 26):
            for _ in range(cgid):                      # job-25 the busiest
                w.episode(dict(ep, cgroup_id=cgid))
        w.finish([0])
    forbid_host(monkeypatch)
    assert replay(p) == 0
    text = capsys.readouterr().out
    rows = text.split("25 cgroups (named from the recording):\n")[1].splitlines()
    assert rows[1].split() == ["25", "0", "0", "0", "0", "job-25.scope", "/job-25.scope"]
    assert len(rows) == 1 + 20 + 1 and rows[-1] == "  ... 5 more (--json lists every cgroup)"
    assert "/job-5.scope" not in text and "/job-6.scope" in text


@pytest.mark.parametrize("path", sorted(RECORDINGS.glob("*.jsonl")), ids=lambda p: p.stem)
def test_schema_1_recordings_replay_with_ids(path, monkeypatch, capsys):
    forbid_host(monkeypatch)
    assert replay("--json", path) == 0
    s = json.loads(capsys.readouterr().out)
    ids = set()
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        if obj["type"] == "episode":
            ids.update(cgroup_ids(obj))
    assert s["cgroup_names"] == "none" and {c["id"] for c in s["cgroups"]} == ids
    assert all(c["path"] is None and not c["named"] for c in s["cgroups"])
    assert replay(path) == 0
    text = capsys.readouterr().out
    assert "ids only: the recording does not name its cgroups" in text
    assert all(f"  id {i}\n" in text for i in ids)


# --- HostNames: the recorder's side -------------------------------------------------

class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_host_names_walk_again_for_a_cgroup_newer_than_the_last_walk(tmp_path):
    tree = tmp_path / "memory"
    (tree / "old").mkdir(parents=True)
    clock = Clock()
    resolver = CgroupResolver(str(tree), rescan_interval=3600, clock=clock)
    names = HostNames(MemoryHierarchy(2, "/sys/fs/cgroup", "/"), resolver, NodeNames(SysRoot(str(tmp_path))))
    assert names((tree / "old").stat().st_ino) == ("/old", {})
    (tree / "new").mkdir()
    (tree / "newer").mkdir()
    new, newer = ((tree / n).stat().st_ino for n in ("new", "newer"))
    gone = max(new, newer) + 10**6       # a removed cgroup (a real tree never reuses the id; tmp_path may)
    # the resolver alone, rate-limited, would not see them yet: the recording would say null for good
    other = CgroupResolver(str(tree), rescan_interval=3600, clock=clock)
    other.rescan()
    (tree / "newest").mkdir()
    assert other.path((tree / "newest").stat().st_ino) is None
    names.batch()
    scans = resolver.scans
    assert names(new) == ("/new", {})
    assert resolver.scans == scans + 1                   # one walk, after the batch's events
    assert names(newer) == ("/newer", {})
    assert names(gone) == (None, {})
    assert resolver.scans == scans + 1                   # no second walk in the same batch
    assert names((tree / "newest").stat().st_ino) == ("/newest", {})   # that walk found it too
    (tree / "later").mkdir()
    names.batch()
    assert names((tree / "later").stat().st_ino) == ("/later", {})
    assert resolver.scans == scans + 2
    assert names(0)[0] == "/"                            # as the collector labels a charge without a memcg


def test_host_names_read_the_node_files_again_for_a_new_pod(tmp_path):
    tree = tmp_path / "memory"
    (tree / CONTAINER.lstrip("/")).mkdir(parents=True)
    (tmp_path / "var/log/pods").mkdir(parents=True)
    clock = Clock()
    names = HostNames(MemoryHierarchy(2, "/sys/fs/cgroup", "/"), CgroupResolver(str(tree)),
                      NodeNames(SysRoot(str(tmp_path)), ttl=3600, clock=clock))
    assert names((tree / POD.lstrip("/")).stat().st_ino)[1]["pod_uid"] == UID
    assert "pod" not in names((tree / POD.lstrip("/")).stat().st_ino)[1]
    (tmp_path / "var/log/pods" / f"shop_cart-7d9f_{UID}").mkdir()
    names.batch()
    path, ident = names((tree / CONTAINER.lstrip("/")).stat().st_ino)
    assert path == CONTAINER and (ident["namespace"], ident["pod"]) == ("shop", "cart-7d9f")


def test_record_says_how_many_cgroups_it_named(recorded, capsys):
    a, eps, out = recorded
    trailer = read_recording(out.read_text()).trailer
    assert (trailer["cgroups"], trailer["cgroups_unresolved"]) == (5, 1)


# --- make.py: artifacts from the VM workload ------------------------------------------

def make_module():
    spec = importlib.util.spec_from_file_location("make_recording", RECORDINGS / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def artifact_from(recording: Path, tmp_path: Path, cgroups=None) -> Path:
    lines = [json.loads(x) for x in recording.read_text().splitlines()]
    h = lines[0]
    data = {"episodes": [x for x in lines if x["type"] == "episode"], "probes": h["probes"],
            "version": "v1" if h["cgroup"]["v1_memory"] else "v2", "mode": h["mode"], "lost": [],
            "kernel": h["kernel"], "workloads": lines[-1].get("workloads") or {}}
    if cgroups is not None:
        data["cgroups"] = cgroups
    p = tmp_path / f"probes-{recording.stem}.json"
    p.write_text(json.dumps(data))
    return p


def test_make_carries_the_artifacts_cgroup_map(tmp_path, monkeypatch, capsys):
    src = RECORDINGS / "debian-6.12-v2-fentry.jsonl"       # ids 28, 66, 104; the trailer names them
    art = artifact_from(src, tmp_path, {"28": "/memcgscope/thp", "66": "/system.slice/file.service"})
    text = make_module().convert(art, None, 8)
    rec = read_recording(text, "made.jsonl")
    assert rec.named and rec.warnings == [] and rec.header["cgroup_names"]["source"] == "artifact"
    assert {i: c["path"] for i, c in rec.cgroups.items()} == {28: "/memcgscope/thp",
                                                              66: "/system.slice/file.service", 104: None}
    assert rec.cgroups[66]["identity"] == {"unit": "file.service", "slice": "system.slice"}
    # named before the trailer, which mentions all three
    assert max(c["line"] for c in rec.cgroups.values()) < len(text.splitlines())
    forbid_host(monkeypatch)
    made = tmp_path / "made.jsonl"
    made.write_text(text)
    assert replay(made) == 0
    assert "/memcgscope/thp" in capsys.readouterr().out


def test_make_without_a_map_writes_ids_only(tmp_path):
    src = RECORDINGS / "debian-6.12-v2-fentry.jsonl"
    rec = read_recording(make_module().convert(artifact_from(src, tmp_path), None, 8))
    assert not rec.named and rec.cgroups == {} and rec.warnings == []
    assert rec.header["schema"] == "memcgscope.episodes/2" and rec.header["cgroup_names"] is None


@pytest.mark.parametrize("cgroups,message", [
    (["/a"], "'cgroups' must map cgroup ids to paths, not a list"),
    ({"x": "/a"}, "cgroups key 'x' is not a cgroup id"),
    ({"28": "memcgscope/thp"}, "cgroups[28] = 'memcgscope/thp': a path relative to the mount starts with '/'"),
])
def test_make_rejects_a_bad_map(tmp_path, cgroups, message):
    art = artifact_from(RECORDINGS / "debian-6.12-v2-fentry.jsonl", tmp_path, cgroups)
    with pytest.raises(SystemExit) as e:
        make_module().convert(art, None, 8)
    assert message in str(e.value) and str(art) in str(e.value)
