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
