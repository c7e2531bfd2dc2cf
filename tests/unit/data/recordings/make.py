#!/usr/bin/env python3
"""Turn a VM probe artifact (/tmp/memcgscope-artifacts/<guest>/probes-<mode>.json,
or the older flat probes-<guest>-<mode>.json:
{"episodes": [...], "probes": [...], "version": "v1"|"v2", "mode", "lost",
"kernel", "kernel_version", "profile", ...}) into a recording (written
with the contract's RecordingWriter: header, episodes, lost lines,
trailer), small enough to commit.

    make.py ARTIFACT [--kernel RELEASE] [--per-shape N] [--out FILE]

The kernel release comes from --kernel or from the doctor-<guest>.txt
next to the artifact.  At most N episodes (default 8) of each shape
(kind, gfp, nr_pages, step kinds, ret) are kept, in recorded order, so
common shapes stay represented without making the file large (steps also
lose their ts_ns and duration_ns, which no check reads); except that
every episode of a workload whose cgroupfs counters the artifact carries
(failcnt_delta, events) is kept, and the workloads go to the trailer, so
the aggregate checks can be tested against the real counters.

When the artifact has a ``cgroups`` map ({id: path relative to the guest's
memory hierarchy mount}), the recording names its cgroups: a cgroup line
per id mentioned (path from the map, identity derived from the path; an
id missing from the map gets path null), as `memcgscope record` writes
them.  Without the map it holds ids only.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from memcgscope.collector.identity import identify  # noqa: E402
from memcgscope.probes.episodes import RecordingWriter, make_header  # noqa: E402


def shape(ep):
    return (ep.get("kind"), ep.get("gfp"), ep.get("nr_pages"),
            tuple(s.get("kind") for s in ep.get("steps") or ()), ep.get("ret"))


def guest_of(artifact: Path) -> str:
    m = re.match(r"probes-(.+)-(kprobe|fentry|tracepoint)\.json$", artifact.name)
    if m:
        return m.group(1)
    return artifact.parent.name   # <guest>/probes-<mode>.json


def mode_of(artifact: Path) -> str:
    return artifact.stem.rsplit("-", 1)[-1]


def kernel_of(artifact: Path, guest: str) -> str | None:
    doctor = artifact.with_name(f"doctor-{guest}.txt")
    if doctor.exists():
        m = re.search(r"kernel (\S+)", doctor.read_text())
        if m:
            return m.group(1)
    return None


def names_of(artifact: Path, data: dict):
    """The artifact's ``cgroups`` map as RecordingWriter names, or None."""
    table = data.get("cgroups")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise SystemExit(f"{artifact}: 'cgroups' must map cgroup ids to paths, not a {type(table).__name__}")
    paths = {}
    for k, v in table.items():
        try:
            cgid = int(k)
        except ValueError:
            raise SystemExit(f"{artifact}: cgroups key {k!r} is not a cgroup id; give {{id: path}}") from None
        if v is not None and not (isinstance(v, str) and v.startswith("/")):
            raise SystemExit(f"{artifact}: cgroups[{k}] = {v!r}: a path relative to the mount starts with '/'")
        paths[cgid] = v

    def names(cgid):
        path = paths.get(cgid)
        return path, (identify(path).labels() if path else {})
    return names


def convert(artifact: Path, kernel: str | None, per_shape: int) -> str:
    data = json.loads(artifact.read_text())
    guest = guest_of(artifact)
    kernel = kernel or data.get("kernel") or kernel_of(artifact, guest)
    if not kernel:
        raise SystemExit(f"{artifact}: no kernel release; pass --kernel or put doctor-{guest}.txt next to it")
    version = data["version"]
    eps = data["episodes"]
    memsw = any("memsw_usage" in (e.get("entry") or e.get("exit") or {}) for e in eps)
    names = names_of(artifact, data)
    mount = "/run/memcg-v1" if version == "v1" else "/sys/fs/cgroup"
    header = make_header(
        kernel=kernel, kernel_version=data.get("kernel_version"), upstream=data.get("upstream"),
        profile=data.get("profile"), profile_reason=data.get("profile_reason"), mode=data.get("mode"),
        cgroup={"v1_memory": mount if version == "v1" else None, "v2_mount": "/sys/fs/cgroup",
                "v2_memory": version == "v2", "swap_accounting": memsw},
        memsw=memsw, probes=data.get("probes", []), memcgscope="0.1.0", machine="x86_64", hostname=guest,
        source=artifact.name,
        cgroup_names={"relative_to": mount, "source": "artifact"} if names is not None else None)
    workloads = data.get("workloads") or {}
    whole = {w["cgroup_id"] for w in workloads.values()
             if isinstance(w, dict) and (w.get("events") or w.get("failcnt_delta") is not None)}
    kept, count = [], {}
    for e in eps:
        k = shape(e)
        count[k] = count.get(k, 0) + 1
        if count[k] <= per_shape or e.get("cgroup_id") in whole:
            e = dict(e, steps=[{f: v for f, v in st.items() if f not in ("ts_ns", "duration_ns")}
                               for st in e.get("steps") or ()])
            kept.append(e)
    buf = io.StringIO()
    w = RecordingWriter(buf, header, names)
    for e in kept:
        w.episode(e)
    for wl in workloads.values():   # the trailer mentions them: named before it
        if isinstance(wl, dict) and isinstance(wl.get("cgroup_id"), int):
            w.name(wl["cgroup_id"])
    w.finish(data.get("lost") or [], orphans=data.get("orphans", 0), events=None,
             episodes_in_artifact=len(eps), workloads=workloads)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--kernel")
    ap.add_argument("--per-shape", type=int, default=8)
    ap.add_argument("--out", type=Path, help="default: <guest>-<mode>.jsonl next to this script")
    a = ap.parse_args(argv)
    text = convert(a.artifact, a.kernel, a.per_shape)
    out = a.out or Path(__file__).with_name(f"{guest_of(a.artifact)}-{mode_of(a.artifact)}.jsonl")
    out.write_text(text)
    n = text.count('"type":"episode"')   # the writer's compact separators
    print(f"{out}: {n} episodes, {out.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
