"""Workload identity from cgroup paths (every layout the module names) and
names from the node's own files (a fake root)."""

from __future__ import annotations

import json

import pytest

from memcgscope.collector.identity import Identity, NodeNames, identify
from memcgscope.probes.sysroot import SysRoot

pytestmark = pytest.mark.unit

UID = "0f5a4c1e-8d2b-4b7a-9a3e-2c6d1f0e9b77"
CID = "3f2a" + "b" * 60
CID2 = "9c1d" + "e" * 60
REAL = "7aa73f478f6c261e14dd626e73d4f1afef26ca4c37d747f2e975d32c53319834"


@pytest.mark.parametrize("path,want", [
    ("/system.slice/nginx.service", Identity(unit="nginx.service", slice="system.slice")),
    ("/user.slice/user-1000.slice/session-3.scope", Identity(unit="session-3.scope", slice="user-1000.slice")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
     f"/cri-containerd-{CID}.scope",
     Identity(unit=f"cri-containerd-{CID}.scope", slice=f"kubepods-burstable-pod{UID.replace('-', '_')}.slice",
              pod_uid=UID, container_id=CID, runtime="containerd")),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope",
     Identity(unit=f"crio-{CID}.scope", slice=f"kubepods-pod{UID.replace('-', '_')}.slice", pod_uid=UID,
              container_id=CID, runtime="cri-o")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice"
     f"/crio-conmon-{CID}.scope",
     Identity(unit=f"crio-conmon-{CID}.scope", slice=f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice",
              pod_uid=UID, container="conmon", container_id=CID, runtime="cri-o")),
    (f"/kubepods/burstable/pod{UID}/{CID}", Identity(pod_uid=UID, container_id=CID)),
    (f"/kubepods/pod{UID}", Identity(pod_uid=UID)),
    (f"/system.slice/docker-{CID}.scope",
     Identity(unit=f"docker-{CID}.scope", slice="system.slice", container_id=CID, runtime="docker")),
    (f"/docker/{CID}", Identity(container_id=CID, runtime="docker")),
    (f"/machine.slice/libpod-{CID}.scope",
     Identity(unit=f"libpod-{CID}.scope", slice="machine.slice", container_id=CID, runtime="podman")),
    (f"/machine.slice/libpod-conmon-{CID}.scope",
     Identity(unit=f"libpod-conmon-{CID}.scope", slice="machine.slice", container="conmon", container_id=CID,
              runtime="podman")),
    (f"/libpod_parent/libpod-{CID}", Identity(container_id=CID, runtime="podman")),
    # what podman 4.3.1 (cgroupfs manager, runc) made on this project's cgroup v1 host for
    # --cgroup-parent=/process_api/0b3b…/memcgscope-podexp-19294: the container, then its conmon
    (f"/process_api/0b3b2f2b8de9bf245b608ec7a8d2b151/memcgscope-podexp-19294/libpod-{REAL}",
     Identity(container_id=REAL, runtime="podman")),
    ("/process_api/0b3b2f2b8de9bf245b608ec7a8d2b151/memcgscope-podexp-19294/conmon", Identity()),
    (f"/scratch/libpod-{REAL[:12]}", Identity()),          # not a full id
    (f"/scratch/libpod-{REAL}x", Identity()),
    ("/", Identity()),
    ("/process_api/fd0eba84dc9df87b99e79a8f4f9ee55f", Identity()),
])
def test_layouts(path, want):
    assert identify(path) == want


def node(tmp_path):
    (tmp_path / "var/log/pods" / f"shop_cart-7d9f_{UID}" / "app").mkdir(parents=True)
    (tmp_path / "var/log/pods" / "junk").mkdir(parents=True)
    logs = tmp_path / "var/log/containers"
    logs.mkdir(parents=True)
    (logs / f"cart-7d9f_shop_app-{CID}.log").symlink_to("/nowhere")
    store = tmp_path / "var/lib/containers/storage/overlay-containers"
    store.mkdir(parents=True)
    (store / "containers.json").write_text(json.dumps([{"id": CID2, "names": ["web"]}]))
    d = tmp_path / "var/lib/docker/containers" / ("a" * 64)
    d.mkdir(parents=True)
    (d / "config.v2.json").write_text(json.dumps({"Name": "/db"}))
    return NodeNames(SysRoot(str(tmp_path)))


def test_names_from_the_node(tmp_path):
    names = node(tmp_path)
    names.refresh()
    k8s = identify(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
                   f"/cri-containerd-{CID}.scope", names)
    assert (k8s.namespace, k8s.pod, k8s.container) == ("shop", "cart-7d9f", "app")
    assert k8s.workload == "shop/cart-7d9f/app"
    assert identify(f"/machine.slice/libpod-{CID2}.scope", names).container == "web"
    assert identify(f"/docker/{'a' * 64}", names).container == "db"
    assert identify("/system.slice/nginx.service", names).workload == "nginx.service"


def test_names_are_cached_for_ttl(tmp_path):
    t = [0.0]
    names = NodeNames(SysRoot(str(tmp_path)), ttl=30, clock=lambda: t[0])
    names.refresh()
    assert names.pods == {}
    node(tmp_path).refresh()   # files appear
    names.refresh()
    assert names.pods == {}    # within the ttl: not read again
    t[0] = 31
    names.refresh()
    assert UID in names.pods


def test_unreadable_state_is_left_out(tmp_path):
    store = tmp_path / "var/lib/containers/storage/overlay-containers"
    store.mkdir(parents=True)
    (store / "containers.json").write_text("{not json")
    names = NodeNames(SysRoot(str(tmp_path)))
    names.refresh()
    assert names.containers == {}


def conmon(tmp_path, pid, cid, name, exit_command="/usr/bin/podman", comm="conmon"):
    """A /proc/<pid> with comm and cmdline as podman 4.3.1 started conmon
    2.1.6 on this host (podman --root /tmp/pexp/root …, runtime runc)."""
    d = tmp_path / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    u = f"/tmp/pexp/root/vfs-containers/{cid}/userdata"
    argv = ["/usr/bin/conmon", "--api-version", "1", "-c", cid, "-u", cid, "-r", "/usr/bin/runc", "-b", u,
            "-p", f"{u}/pidfile", "-n", name, "--exit-dir", "/tmp/pexp/tmp/exits", "--full-attach",
            "--runtime-arg", "--root=/tmp/pexp/runc", "-l", f"k8s-file:{u}/ctr.log", "--log-level", "warning",
            "--runtime-arg", "--log-format=json", "--conmon-pidfile", f"{u}/conmon.pid"]
    if exit_command:
        argv += ["--exit-command", exit_command, "--exit-command-arg", "--root", "--exit-command-arg",
                 "/tmp/pexp/root", "--exit-command-arg", "-n", "--exit-command-arg", "not-the-name",
                 "--exit-command-arg", "container", "--exit-command-arg", "cleanup", "--exit-command-arg", cid]
    (d / "cmdline").write_text("\0".join(argv) + "\0")


def test_podman_names_from_any_store(tmp_path):
    # the default store with the vfs driver, and a running container of a private --root
    store = tmp_path / "var/lib/containers/storage/vfs-containers"
    store.mkdir(parents=True)
    (store / "containers.json").write_text(json.dumps([{"id": CID2, "names": ["web"]}]))
    conmon(tmp_path, 25273, REAL, "memcgscope-oom")
    conmon(tmp_path, 300, CID, "k8s_app_cart_shop_x_0", exit_command=None)   # CRI-O's conmon: no podman
    conmon(tmp_path, 301, "a" * 64, "imposter", comm="bash")                 # not a conmon
    (tmp_path / "proc/self").mkdir()
    names = NodeNames(SysRoot(str(tmp_path)))
    names.refresh()
    assert names.containers == {CID2: "web", REAL: "memcgscope-oom"}
    ident = identify(f"/process_api/0b3b/memcgscope-podexp-19294/libpod-{REAL}", names)
    assert (ident.runtime, ident.container, ident.container_id) == ("podman", "memcgscope-oom", REAL)
    assert ident.workload == "podman:memcgscope-oom"
    assert identify(f"/libpod_parent/libpod-{CID2}", names).container == "web"


@pytest.mark.parametrize("argv,want", [
    (["-c", REAL, "-n", "a"], {"cid": REAL, "name": "a"}),
    ([f"--cid={REAL}", "--name", "a"], {"cid": REAL, "name": "a"}),
    ([f"-c{REAL}", "-na"], {"cid": REAL, "name": "a"}),
    (["--runtime-arg", "-n", "-n", "b"], {"runtime-arg": "-n", "name": "b"}),
    (["-n"], {"name": ""}),
])
def test_conmon_options(argv, want):
    from memcgscope.collector.identity import _options
    assert _options(argv) == want


def test_a_new_container_is_named_at_once_and_kept_after_it_goes(tmp_path):
    t = [0.0]
    (tmp_path / "proc").mkdir()
    names = NodeNames(SysRoot(str(tmp_path)), ttl=30, clock=lambda: t[0])
    names.refresh()
    path = f"/scratch/libpod-{REAL}"
    conmon(tmp_path, 25273, REAL, "memcgscope-oom")
    t[0] = 0.5
    assert identify(path, names).container == ""      # read 0.5 s ago: not again yet
    t[0] = 1.5
    assert identify(path, names).container == "memcgscope-oom"   # early, not at the 30 s ttl
    # an id no source names costs one early read, not one per tick
    t[0] = 3.0
    assert identify(f"/scratch/libpod-{CID}", names).container == ""
    at = names._at
    t[0] = 5.0
    assert identify(f"/scratch/libpod-{CID}", names).container == "" and names._at == at
    # the container exits (its conmon with it): named for `keep`, then not
    (tmp_path / "proc/25273/comm").unlink()
    t[0] = 40.0
    names.refresh()
    assert identify(path, names).container == "memcgscope-oom"
    t[0] = 3.0 + names.keep    # last named by the early read at 3.0
    names.refresh()
    assert names.containers == {}
