"""deploy/kubernetes: the manifests validate offline against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields refused), the
PodMonitor against a schema of the fields it uses (a CRD; the field types
follow prometheus-operator's monitoring.coreos.com/v1 PodMonitor), and the
pieces agree: one port from `memcgscope run` to the PodMonitor, and the host
mounts cover the paths the collector reads."""

from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import all_versions
import pytest
import yaml

from memcgscope.collector.run_cmd import DEFAULT_DIVERGENCE_LOG, DEFAULT_LISTEN

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
K8S = os.path.join(ROOT, "deploy", "kubernetes")
CORE = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
PODMONITOR = os.path.join(K8S, "prometheus-operator", "podmonitor.yaml")
# 1.30: the first release with securityContext.appArmorProfile (GA)
MIN_VERSION = (1, 30)
VERSIONS = [v for v in sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
            if tuple(int(x) for x in v.split(".")[:2]) >= MIN_VERSION]
RUN_PORT = int(DEFAULT_LISTEN.rsplit(":", 1)[1])


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def resources():
    return {d["kind"]: d for path in CORE for d in load(path)}


def k8s_errors(doc, version) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}: {e.message} at {'.'.join(map(str, e.path))}"
    return None


def test_the_manifest_set():
    assert sorted(resources()) == ["DaemonSet", "Namespace", "Service", "ServiceAccount"]
    assert len(VERSIONS) >= 2, f"kubernetes-validate ships no schema from {MIN_VERSION} on: {VERSIONS}"


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate(version):
    errors = [e for d in resources().values() if (e := k8s_errors(d, version))]
    assert not errors, f"Kubernetes {version}: " + "; ".join(errors)


def _daemonset():
    return copy.deepcopy(resources()["DaemonSet"])


def _container(ds):
    return ds["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate, where", [
    (lambda ds: _container(ds)["securityContext"].update(privilegd=True), "privilegd"),
    (lambda ds: _container(ds)["ports"][0].update(containerPort="10064"), "containerPort"),
    (lambda ds: _container(ds)["volumeMounts"][0].pop("mountPath"), "mountPath"),
    (lambda ds: ds["spec"]["template"]["spec"].update(hostPID="yes"), "hostPID"),
    (lambda ds: ds["spec"].pop("selector"), "selector"),
])
def test_validation_catches_a_bad_daemonset(mutate, where):
    ds = _daemonset()
    mutate(ds)
    error = k8s_errors(ds, VERSIONS[-1])
    assert error and where in error, error


# --- the PodMonitor (a CRD: not in the Kubernetes schemas) ---------------------

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                 "properties": {
                     "selector": LABEL_SELECTOR,
                     "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "required": ["port"],
                         "properties": {
                             "port": {"type": "string"},
                             "path": {"type": "string", "pattern": "^/"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": {"type": "string", "pattern": DURATION},
                             "relabelings": {"type": "array", "items": {
                                 "type": "object", "additionalProperties": False,
                                 "properties": {
                                     "sourceLabels": {"type": "array", "items": {
                                         "type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                                     "targetLabel": {"type": "string"},
                                     "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                                         "labelmap", "LabelMap", "labeldrop", "LabelDrop",
                                                         "labelkeep", "LabelKeep"]}}}}}}}}}}}


def podmonitor():
    (doc,) = load(PODMONITOR)
    return doc


def podmonitor_errors(doc) -> list[str]:
    v = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(doc)]


def test_podmonitor_validates():
    assert podmonitor_errors(podmonitor()) == []


@pytest.mark.parametrize("mutate", [
    lambda pm: pm["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"),
    lambda pm: pm["spec"]["podMetricsEndpoints"][0].update(targetPort=10064),   # not a PodMonitor field
    lambda pm: pm["spec"].update(podMetricsEndpoint=pm["spec"].pop("podMetricsEndpoints")),
    lambda pm: pm.update(apiVersion="monitoring.coreos.com/v1alpha1"),
])
def test_podmonitor_check_catches_a_bad_one(mutate):
    pm = podmonitor()
    mutate(pm)
    assert podmonitor_errors(pm)


# --- consistency ----------------------------------------------------------------

def port_problems(ds, svc, pm) -> list[str]:
    out = []
    c = _container(ds)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if ports.get("metrics") != RUN_PORT:
        out.append(f"container port 'metrics' is {ports.get('metrics')}, memcgscope run listens on {RUN_PORT}")
    args = c.get("args", [])
    listen = args[args.index("--listen") + 1] if "--listen" in args else DEFAULT_LISTEN
    if listen != f":{RUN_PORT}":
        out.append(f"run --listen {listen}: the pod must listen on every interface, port {RUN_PORT}")
    (sp,) = svc["spec"]["ports"]
    if sp["port"] != RUN_PORT or sp["targetPort"] not in ("metrics", RUN_PORT):
        out.append(f"Service port {sp['port']} -> {sp['targetPort']}")
    ann = svc["metadata"]["annotations"]
    if ann.get("prometheus.io/port") != str(RUN_PORT) or ann.get("prometheus.io/path") != "/metrics":
        out.append(f"Service annotations {ann}")
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if ep["port"] not in ports or ports[ep["port"]] != RUN_PORT or ep.get("path", "/metrics") != "/metrics":
            out.append(f"PodMonitor endpoint {ep}")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    for name, sel in (("Service", svc["spec"]["selector"]), ("PodMonitor", pm["spec"]["selector"]["matchLabels"]),
                      ("DaemonSet", ds["spec"]["selector"]["matchLabels"])):
        if any(labels.get(k) != v for k, v in sel.items()):
            out.append(f"{name} selector {sel} does not select the pods ({labels})")
    return out


def test_ports_agree():
    r = resources()
    assert port_problems(r["DaemonSet"], r["Service"], podmonitor()) == []


@pytest.mark.parametrize("mutate", [
    lambda ds, svc, pm: _container(ds)["ports"][0].update(containerPort=9100),
    lambda ds, svc, pm: svc["spec"]["ports"][0].update(port=8080),
    lambda ds, svc, pm: pm["spec"]["podMetricsEndpoints"][0].update(port="http"),
    lambda ds, svc, pm: svc["metadata"]["annotations"].update({"prometheus.io/port": "9100"}),
    lambda ds, svc, pm: _container(ds).update(args=["run"]),   # run's default is loopback only
    lambda ds, svc, pm: svc["spec"].update(selector={"app": "memcgscope"}),
])
def test_port_check_catches_a_mismatch(mutate):
    r = resources()
    ds, svc, pm = copy.deepcopy(r["DaemonSet"]), copy.deepcopy(r["Service"]), podmonitor()
    mutate(ds, svc, pm)
    assert port_problems(ds, svc, pm)


# The host paths the collector reads, each with a file that reads it (so a
# path dropped from the code fails here too) and whether it writes there.
COLLECTOR_PATHS = [
    ("/sys/fs/cgroup", "collector/cgroups.py", False),           # via /proc/mounts: the hierarchy it walks
    ("/sys/kernel/btf/vmlinux", "probes/btf.py", False),
    ("/sys/kernel/tracing", "probes/sysroot.py", True),          # kprobe_events in kprobe mode
    ("/sys/kernel/kheaders.tar.xz", "probes/detect.py", False),
    ("/lib/modules", "probes/detect.py", False),
    ("/boot/config-", "probes/sysroot.py", False),
    ("/var/log/pods", "collector/identity.py", False),
    ("/var/log/containers", "collector/identity.py", False),
    (os.path.dirname(DEFAULT_DIVERGENCE_LOG), "collector/run_cmd.py", True),
]


HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                  "BlockDevice"}


def mount_problems(ds) -> list[str]:
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = []
    out = []
    for v in spec["volumes"]:
        # the OpenAPI schema leaves hostPath.type a free string; the API server does not
        if "hostPath" in v and v["hostPath"].get("type", "") not in HOSTPATH_TYPES:
            out.append(f"{v['name']}: hostPath type {v['hostPath']['type']!r} is none of {sorted(HOSTPATH_TYPES)}")
    for m in _container(ds)["volumeMounts"]:
        v = volumes[m["name"]]
        if "hostPath" in v and v["hostPath"]["path"] != m["mountPath"]:
            out.append(f"{m['name']}: host {v['hostPath']['path']} at {m['mountPath']}; "
                       "the collector reads host paths where they are on the host")
        mounts.append((m["mountPath"], "hostPath" in v, bool(m.get("readOnly"))))
    for path, _, writes in COLLECTOR_PATHS:
        # the deepest mount holding the path is the one the collector sees
        holding = [m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")]
        if not holding:
            out.append(f"{path}: no mount gives the host's")
            continue
        mount_path, host, read_only = max(holding, key=lambda m: len(m[0]))
        if not host:
            out.append(f"{path}: mounted at {mount_path} from a pod volume, not the host")
        elif writes and read_only:
            out.append(f"{path}: the collector writes there, {mount_path} is read-only")
    for mount_path, host, read_only in mounts:
        if host and not read_only and not any(w and (p == mount_path or p.startswith(mount_path + "/"))
                                              for p, _, w in COLLECTOR_PATHS):
            out.append(f"{mount_path}: writable, but the collector writes nothing there")
    if not spec.get("hostPID"):
        out.append("hostPID is off: /proc would not show the host's tasks the probes report")
    if any(m["mountPath"] == "/proc" for m in _container(ds)["volumeMounts"]):
        out.append("/proc: a read-only host /proc over the pod's makes /proc/sys/kernel/bpf_stats_enabled "
                   "unwritable; hostPID already gives the host's tasks")
    return out


def test_collector_paths_are_read_by_the_code():
    for path, source, _ in COLLECTOR_PATHS:
        if path == os.path.dirname(DEFAULT_DIVERGENCE_LOG):
            path = DEFAULT_DIVERGENCE_LOG
        text = open(os.path.join(ROOT, source)).read()
        assert path in text or (path == "/sys/fs/cgroup" and "cgroup2" in text), f"{path} not in {source}"


def test_mounts_cover_what_the_collector_reads():
    assert mount_problems(_daemonset()) == []


def _drop_mount(ds, name):
    c = _container(ds)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != name]


@pytest.mark.parametrize("mutate, problem", [
    (lambda ds: _drop_mount(ds, "pod-logs"), "/var/log/pods: no mount"),
    (lambda ds: next(m for m in _container(ds)["volumeMounts"] if m["name"] == "tracing").update(readOnly=True),
     "/sys/kernel/tracing: the collector writes there"),
    (lambda ds: next(m for m in _container(ds)["volumeMounts"] if m["name"] == "sys").update(mountPath="/host/sys"),
     "host /sys at /host/sys"),
    (lambda ds: next(m for m in _container(ds)["volumeMounts"] if m["name"] == "modules").update(readOnly=False),
     "/lib/modules: writable"),
    (lambda ds: ds["spec"]["template"]["spec"].pop("hostPID"), "hostPID is off"),
    (lambda ds: ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"].update(type="Folder"),
     "hostPath type 'Folder'"),
    (lambda ds: (_container(ds)["volumeMounts"].append({"name": "proc", "mountPath": "/proc", "readOnly": True}),
                 ds["spec"]["template"]["spec"]["volumes"].append(
                     {"name": "proc", "hostPath": {"path": "/proc", "type": "Directory"}})),
     "/proc: a read-only host /proc"),
])
def test_mount_check_catches_a_gap(mutate, problem):
    ds = _daemonset()
    mutate(ds)
    problems = mount_problems(ds)
    assert any(problem in p for p in problems), problems


def test_capabilities_match_the_systemd_unit():
    caps = _container(_daemonset())["securityContext"]["capabilities"]
    unit = open(os.path.join(ROOT, "deploy", "systemd", "memcgscope.service")).read()
    line = next(x for x in unit.splitlines() if x.startswith("CapabilityBoundingSet="))
    assert caps["drop"] == ["ALL"]
    assert ["CAP_" + c for c in caps["add"]] == line.split("=", 1)[1].split()


# --- the image --------------------------------------------------------------------

def test_containerfile_copies_what_the_package_needs(tmp_path):
    """The Containerfile's COPY set builds the project's wheel (no image
    build: no registry here)."""
    text = open(os.path.join(ROOT, "deploy", "Containerfile")).read()
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    src = tmp_path / "src"
    src.mkdir()
    for sources in copies:
        for s in sources:
            p = os.path.join(ROOT, s)
            (shutil.copytree if os.path.isdir(p) else shutil.copy)(p, src / s)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert glob.glob(str(tmp_path / "wheel" / "memcgscope-*.whl"))
    image = _container(_daemonset())
    assert image["args"][0] == "run" and 'ENTRYPOINT ["/opt/memcgscope/.venv/bin/memcgscope"]' in text
