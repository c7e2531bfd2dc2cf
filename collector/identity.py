"""Which workload a cgroup is: systemd unit and slice, Kubernetes pod and
container, container runtime and id — from the cgroup path, with names
from the node's own files where they exist (no API server).

Path layouts recognised (cgroup v1 memory hierarchy paths and v2 paths
alike; the examples are v2):

* systemd: ``/system.slice/nginx.service`` (unit nginx.service, slice
  system.slice), ``/user.slice/user-1000.slice/session-3.scope``;
* the kubelet's systemd driver: ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid, '_' for '-'>.slice/cri-containerd-<id>.scope``
  (also ``kubepods-pod<uid>.slice`` for Guaranteed pods);
* the kubelet's cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>``,
  ``/kubepods/pod<uid>/<id>``;
* containerd ``cri-containerd-<id>.scope``, CRI-O ``crio-<id>.scope``
  (``crio-conmon-<id>.scope`` is its monitor), Docker ``docker-<id>.scope``
  and ``/docker/<id>``, Podman ``libpod-<id>.scope`` (``libpod-conmon-``…)
  and ``/libpod_parent/libpod-<id>``.

Names: Kubernetes pods from ``/var/log/pods/<namespace>_<pod>_<uid>/`` and
containers from the kubelet's ``/var/log/containers/<pod>_<namespace>_
<container>-<id>.log`` links; Podman from its containers.json; Docker from
``/var/lib/docker/containers/<id>/config.v2.json``.  Unreadable files just
leave the names out.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass

from memcgscope.probes.sysroot import SysRoot

__all__ = ["Identity", "identify", "NodeNames", "LABELS"]

#: the info metric's labels, besides `cgroup`
LABELS = ("unit", "slice", "pod_uid", "namespace", "pod", "container", "container_id", "runtime")

_UNIT = re.compile(r"\.(service|scope|socket|mount|swap|timer|target|path|device|automount)$")
_SCOPE = re.compile(r"^(?:(cri-containerd|crio|crio-conmon|docker|libpod|libpod-conmon)-)([0-9a-f]{12,64})\.scope$")
_POD_SLICE = re.compile(r"^kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod([0-9a-f_]{32,36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{32,36})$")
_ID = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME = {"cri-containerd": "containerd", "crio": "cri-o", "crio-conmon": "cri-o", "docker": "docker",
            "libpod": "podman", "libpod-conmon": "podman"}


@dataclass(frozen=True)
class Identity:
    unit: str = ""
    slice: str = ""
    pod_uid: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""
    container_id: str = ""
    runtime: str = ""

    def labels(self) -> dict:
        return asdict(self)

    @property
    def workload(self) -> str:
        """A short name for people: namespace/pod/container, unit, or ''."""
        if self.pod:
            return "/".join(x for x in (self.namespace, self.pod, self.container) if x)
        if self.container_id:
            return f"{self.runtime or 'container'}:{self.container or self.container_id[:12]}"
        return self.unit or self.slice


def _parse(path: str) -> dict:
    parts = [p for p in path.split("/") if p]
    out: dict = {}
    for i, p in enumerate(parts):
        if p.endswith(".slice"):
            out["slice"] = p
            m = _POD_SLICE.match(p)
            if m:
                out["pod_uid"] = m.group(1).replace("_", "-")
            continue
        m = _SCOPE.match(p)
        if m:
            out["runtime"] = _RUNTIME[m.group(1)]
            out["container_id"] = m.group(2)
            out["unit"] = p
            if "conmon" in m.group(1):
                out["container"] = "conmon"
            continue
        m = _POD_DIR.match(p)
        if m and i > 0 and parts[0] == "kubepods":
            out["pod_uid"] = m.group(1)
            continue
        if _ID.match(p) and i > 0 and (parts[i - 1] in ("docker", "libpod_parent") or "pod_uid" in out):
            out["container_id"] = p
            if parts[i - 1] == "docker":
                out["runtime"] = "docker"
            elif parts[i - 1] == "libpod_parent":
                out["runtime"] = "podman"
            continue
        if p.startswith("libpod-") and i > 0 and parts[i - 1] == "libpod_parent":
            cid = p[len("libpod-"):]
            if _ID.match(cid):
                out["container_id"], out["runtime"] = cid, "podman"
            continue
        if _UNIT.search(p):
            out["unit"] = p
    return out


class NodeNames:
    """Names from the node's files, re-read at most every ``ttl`` seconds
    (pods come and go; reading /var/log/pods per scrape would be wasteful)."""

    def __init__(self, sysroot: SysRoot | None = None, ttl: float = 30.0, clock=time.monotonic):
        self.sysroot = sysroot or SysRoot("/")
        self.ttl = ttl
        self.clock = clock
        self._at: float | None = None
        self.pods: dict[str, tuple[str, str]] = {}     # uid -> (namespace, pod)
        self.containers: dict[str, str] = {}           # container id -> name

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if not force and self._at is not None and now - self._at < self.ttl:
            return
        self._at = now
        pods, containers = {}, {}
        for d in self.sysroot.listdir("/var/log/pods"):
            parts = d.split("_")
            if len(parts) >= 3:
                ns, uid = parts[0], parts[-1]
                pods[uid] = (ns, "_".join(parts[1:-1]))
        for f in self.sysroot.listdir("/var/log/containers"):
            m = re.match(r"^(.+)_(.+)_(.+)-([0-9a-f]{64})\.log$", f)
            if m:
                containers[m.group(4)] = m.group(3)
        text = self.sysroot.read_text("/var/lib/containers/storage/overlay-containers/containers.json")
        if text:
            try:
                for c in json.loads(text):
                    if c.get("id") and c.get("names"):
                        containers.setdefault(c["id"], c["names"][0])
            except (ValueError, TypeError, AttributeError):
                pass
        for cid in self.sysroot.listdir("/var/lib/docker/containers"):
            text = self.sysroot.read_text(f"/var/lib/docker/containers/{cid}/config.v2.json")
            if text:
                try:
                    name = json.loads(text).get("Name", "")
                except ValueError:
                    continue
                if name:
                    containers.setdefault(cid, name.lstrip("/"))
        self.pods, self.containers = pods, containers


def identify(path: str, names: NodeNames | None = None) -> Identity:
    """The identity of the cgroup at ``path`` (relative to its hierarchy's
    mount); labels not known stay empty."""
    p = _parse(path)
    ns = pod = container = ""
    uid = p.get("pod_uid", "")
    cid = p.get("container_id", "")
    if names is not None:
        if uid and uid in names.pods:
            ns, pod = names.pods[uid]
        if cid and cid in names.containers:
            container = names.containers[cid]
    return Identity(unit=p.get("unit", ""), slice=p.get("slice", ""), pod_uid=uid, namespace=ns, pod=pod,
                    container=container or p.get("container", ""), container_id=cid,
                    runtime=p.get("runtime", ""))
