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
  and, with its cgroupfs manager, ``<cgroup parent>/libpod-<id>``
  (``/libpod_parent`` unless ``--cgroup-parent``).

Names: Kubernetes pods from ``/var/log/pods/<namespace>_<pod>_<uid>/`` and
containers from the kubelet's ``/var/log/containers/<pod>_<namespace>_
<container>-<id>.log`` links; Podman from the containers.json of its default
store and, for running containers of any store, from their conmon's
arguments; Docker from ``/var/lib/docker/containers/<id>/config.v2.json``.
Unreadable files just leave the names out.
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
        # podman's cgroupfs manager: <cgroup parent>/libpod-<id>, no .scope, below
        # /libpod_parent or any --cgroup-parent (its conmon goes to <parent>/conmon);
        # seen with podman 4.3.1 + runc 1.1.5 on a cgroup v1 host
        if p.startswith("libpod-") and _ID.match(p[len("libpod-"):]):
            out["container_id"], out["runtime"] = p[len("libpod-"):], "podman"
            continue
        if _UNIT.search(p):
            out["unit"] = p
    return out


class NodeNames:
    """Names from the node's files, re-read at most every ``ttl`` seconds
    (pods come and go; reading /var/log/pods per scrape would be wasteful),
    and early (at most every ``miss_ttl`` s) when a container id not named
    yet turns up, so a container started since the last read is named at
    its first tick.  A container name whose source went away (a Podman
    container's conmon exits with it) is kept ``keep`` seconds, so the
    cgroup's series keep their labels through the collector's grace."""

    def __init__(self, sysroot: SysRoot | None = None, ttl: float = 30.0, clock=time.monotonic,
                 miss_ttl: float = 1.0, keep: float = 300.0):
        self.sysroot = sysroot or SysRoot("/")
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self.keep = keep
        self.clock = clock
        self._at: float | None = None
        self.pods: dict[str, tuple[str, str]] = {}     # uid -> (namespace, pod)
        self.containers: dict[str, str] = {}           # container id -> name
        self._seen: dict[str, float] = {}              # container id -> when a source last named it
        self._missed: set[str] = set()                 # ids an early refresh did not name

    def container(self, cid: str) -> str:
        """The name of container ``cid``, or ''."""
        name = self.containers.get(cid)
        if name is None and cid not in self._missed:
            if self._at is None or self.clock() - self._at >= self.miss_ttl:
                self.refresh(force=True)
                name = self.containers.get(cid)
                if name is None:
                    if len(self._missed) >= 4096:   # bounded: ids of unnamed containers come and go
                        self._missed.clear()
                    self._missed.add(cid)
        return name or ""

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
        # Podman's default store (root): <graphroot>/<driver>-containers/containers.json,
        # overlay-containers or vfs-containers (the driver podman picked)
        store = "/var/lib/containers/storage"
        for d in self.sysroot.listdir(store):
            if d.endswith("-containers"):
                for cid, name in _podman_store(self.sysroot.read_text(f"{store}/{d}/containers.json")).items():
                    containers.setdefault(cid, name)
        for cid, name in self._podman_conmons().items():
            containers.setdefault(cid, name)
        for cid in self.sysroot.listdir("/var/lib/docker/containers"):
            text = self.sysroot.read_text(f"/var/lib/docker/containers/{cid}/config.v2.json")
            if text:
                try:
                    name = json.loads(text).get("Name", "")
                except ValueError:
                    continue
                if name:
                    containers.setdefault(cid, name.lstrip("/"))
        for cid in containers:
            self._seen[cid] = now
        for cid, name in self.containers.items():
            if cid not in containers and cid in self._seen and now - self._seen[cid] < self.keep:
                containers[cid] = name
        self._seen = {cid: t for cid, t in self._seen.items() if cid in containers}
        self.pods, self.containers = pods, containers

    def _podman_conmons(self) -> dict[str, str]:
        """Running Podman containers from their conmon's arguments (``-c ID``,
        ``-n NAME``): found whatever store they use (``podman --root``, a
        rootless user's), which containers.json at the default root is not.
        Only conmons whose ``--exit-command`` is podman (CRI-O's conmon has
        none and names its containers k8s_…)."""
        out = {}
        for pid in self.sysroot.listdir("/proc"):
            if not pid.isdigit() or (self.sysroot.read_text(f"/proc/{pid}/comm") or "").strip() != "conmon":
                continue
            args = _options((self.sysroot.read_text(f"/proc/{pid}/cmdline") or "").split("\0")[1:])
            if os.path.basename(args.get("exit-command", "")) == "podman" and _ID.match(args.get("cid", "")):
                if args.get("name"):
                    out[args["cid"]] = args["name"]
        return out


def _podman_store(text: str | None) -> dict[str, str]:
    out = {}
    if text:
        try:
            for c in json.loads(text):
                if c.get("id") and c.get("names"):
                    out[c["id"]] = c["names"][0]
        except (ValueError, TypeError, AttributeError):
            pass
    return out


_CONMON_SHORT = {"c": "cid", "n": "name"}
_CONMON_VALUED = ("cid", "name", "exit-command", "exit-command-arg", "runtime-arg")


def _options(argv: list[str]) -> dict[str, str]:
    """conmon's ``-c ID``, ``--cid ID``, ``--cid=ID`` (glib option syntax):
    the first of cid, name and exit-command; the values of --runtime-arg and
    --exit-command-arg are skipped (they can look like options)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        key = value = None
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
        elif a.startswith("--"):
            key = a[2:]
        elif a.startswith("-") and len(a) >= 2:
            key = _CONMON_SHORT.get(a[1], a[1])
            if len(a) > 2:
                value = a[2:]
        if key is not None and value is None and key in _CONMON_VALUED:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        if key is not None and value is not None:
            out.setdefault(key, value)
        i += 1
    return out


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
        if cid:
            container = names.container(cid)
    return Identity(unit=p.get("unit", ""), slice=p.get("slice", ""), pod_uid=uid, namespace=ns, pod=pod,
                    container=container or p.get("container", ""), container_id=cid,
                    runtime=p.get("runtime", ""))
