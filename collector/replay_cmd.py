"""`memcgscope replay`: cross-check a recording (written by `memcgscope
record`, schema in docs/recording-schema.md) against the model, offline,
without root.

The profile is the one the recording's header says `record` (or `run`)
resolved, so a recording replays as it was checked live; recordings older
than that field get the same resolver over the header's kernel release and
uname -v.  `--profile` overrides.  Every episode goes through the same
check pipeline `run` uses; a summary (or JSON with --json) says how many
checks passed and which divergences were found, and per cgroup its
episodes, reclaims, OOM kills and victims and divergences.  Cgroups are
named from the recording alone (its cgroup lines: path and workload as
the recording host saw them), never from this host; a recording without
names (schema /1) shows ids.  Exit status: 0 no divergence, 1
divergences, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  memcgscope replay episodes.jsonl
  memcgscope replay --json --divergences div.jsonl episodes.jsonl
  memcgscope replay --profile 6.1 episodes.jsonl
"""


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="cross-check a recording against the model (offline)",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a recording ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--profile", metavar="NAME",
                   help="model profile or kernel release instead of the one the recording names")
    p.add_argument("--divergences", metavar="FILE",
                   help="write each divergent episode as a JSON line to FILE")
    p.set_defaults(func=run)


def _err(msg: str) -> int:
    print(f"memcgscope replay: {msg}", file=sys.stderr)
    return 2


def profile_of(recording, override: str | None):
    """The recording's profile (model.profiles.Resolution).  Raises
    RecordingError naming the place."""
    from memcgscope.model.profiles import PROFILES, Resolution, resolve_profile
    from memcgscope.probes.episodes import RecordingError

    h, name = recording.header, recording.name
    if not h.get("kernel") and not override:
        raise RecordingError(f"{name}:1: the header has no 'kernel'; pass --profile")
    if override:
        try:
            return resolve_profile(h.get("kernel", ""), h.get("kernel_version"), override=override)
        except ValueError as e:
            raise RecordingError(f"--profile {override!r}: {e}") from None
    recorded = h.get("profile")
    if recorded:
        if recorded not in PROFILES:
            raise RecordingError(f"{name}:1: the recording was checked against profile {recorded!r}, which this "
                                 f"memcgscope does not have; pass --profile with one of {', '.join(PROFILES)}")
        return Resolution(PROFILES[recorded], h.get("kernel", ""), h.get("upstream"),
                          f"the profile the recording was checked against ({h.get('profile_reason') or recorded})")
    try:
        return resolve_profile(h["kernel"], h.get("kernel_version"))
    except ValueError as e:
        raise RecordingError(f"{name}:1: kernel {h['kernel']!r}: {e}; pass --profile") from None


#: cgroups listed in the text summary (--json lists all)
TOP_CGROUPS = 20


def cgroup_name(recording, cgid) -> dict:
    """How a recording names cgroup ``cgid``: ``{"id", "path", "workload",
    "identity", "named"}`` from its cgroup line; ``named`` false (path
    null) when it has none, and path null with ``named`` true when the
    recorder could not resolve the id (the cgroup was already removed)."""
    from .identity import LABELS, Identity
    line = recording.cgroups.get(cgid) if isinstance(cgid, int) else None
    if line is None:
        return {"id": cgid, "path": None, "workload": "", "identity": {}, "named": False}
    identity = line["identity"]
    workload = Identity(**{k: v for k, v in identity.items() if k in LABELS}).workload if line["path"] else ""
    return {"id": cgid, "path": line["path"], "workload": workload, "identity": identity, "named": True}


def shown(name: dict) -> str:
    """A cgroup as the text output shows it: its path, else its id."""
    if name["path"]:
        return name["path"]
    return f"id {name['id']}" + (" (gone)" if name["named"] else "")


def _tally(ep: dict, rows: dict) -> None:
    """Counts one episode into the per-cgroup rows (id -> counters)."""
    from memcgscope.probes.episodes import cgroup_ids

    def row(cgid):
        return rows.setdefault(cgid, {"episodes": 0, "reclaims": 0, "oom_kills": 0, "oom_victims": 0,
                                      "divergences": 0})
    for cgid in cgroup_ids(ep):
        row(cgid)
    kind = ep.get("kind")
    cgid = ep.get("cgroup_id")
    row(cgid)["episodes"] += 1
    if kind == "reclaim":
        row(cgid)["reclaims"] += 1
    kills = [ep] if kind == "oom_kill" else []
    for s in ep.get("steps") or ():
        if not isinstance(s, dict):
            continue
        if s.get("kind") == "reclaim":
            row(s.get("cgroup_id"))["reclaims"] += 1
        elif s.get("kind") == "oom_kill":
            kills.append(s)
    for k in kills:
        row(k.get("cgroup_id"))["oom_kills"] += 1
        if k.get("victim_cgroup_id") is not None:
            row(k.get("victim_cgroup_id"))["oom_victims"] += 1


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def run(args) -> int:
    import json

    from memcgscope.probes.episodes import RecordingError, load_recording

    from .pipeline import CheckPipeline

    try:
        rec = load_recording(args.file)
        resolution = profile_of(rec, args.profile)
        cgroup, memsw = rec.cgroup, rec.memsw
    except RecordingError as e:
        return _err(str(e))
    name = rec.name
    for w in rec.warnings:
        print(f"memcgscope replay: {w}", file=sys.stderr)
    if resolution.warning:
        print(f"memcgscope replay: {resolution.warning}", file=sys.stderr)

    out = None
    if args.divergences:
        try:
            out = open(args.divergences, "w", encoding="utf-8")
        except OSError as e:
            return _err(f"--divergences {args.divergences}: {e.strerror}; give a writable path")

    line_of = {}
    rows: dict = {}

    def write_divergence(d, ep):
        cgid = ep.get("cgroup_id") if isinstance(ep, dict) else None
        if cgid in rows:
            rows[cgid]["divergences"] += 1
        if out is not None:
            name = cgroup_name(rec, cgid)
            out.write(json.dumps({"type": "divergence", "line": line_of.get(id(ep)), "check": d.check,
                                  "reason": d.reason, "detail": d.detail,
                                  "cgroup": {k: name[k] for k in ("id", "path", "workload")},
                                  "episode": ep}) + "\n")

    pipeline = CheckPipeline(resolution.profile, cgroup, memsw, rec.visibility, on_divergence=write_divergence)
    try:
        for no, ep in rec.episodes:
            line_of[id(ep)] = no
            _tally(ep, rows)
            pipeline.feed(ep)
    finally:
        if out is not None:
            out.close()

    counts = pipeline.counts()
    ndiv = counts.total_divergences
    profile = resolution.profile.name
    summary = {
        "file": name, "kernel": rec.header.get("kernel"), "profile": profile,
        "profile_reason": resolution.reason, "cgroup": cgroup, "memsw": memsw,
        "episodes": len(rec.episodes), "episodes_by_kind": dict(sorted(counts.episodes.items())),
        "checks": {f"{c}/{v}": n for (c, v), n in sorted(counts.checks.items())},
        "divergences": ndiv,
        "divergences_by_reason": {f"{c}/{r}": n for (c, r), n in sorted(counts.divergences.items())},
        "warnings": rec.warnings + ([resolution.warning] if resolution.warning else []),
        "cgroup_names": "recording" if rec.named else "none",
        "cgroups": [{**cgroup_name(rec, cgid), **row} for cgid, row in
                    sorted(rows.items(), key=lambda x: (-x[1]["episodes"], str(x[0])))],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from collections import Counter
        print(f"{name}: kernel {rec.header.get('kernel')} (profile {profile}), cgroup {cgroup}"
              f"{' with memsw' if memsw else ''}; {len(rec.episodes)} episodes")
        by_check: dict = {}
        for (c, v), n in counts.checks.items():
            by_check.setdefault(c, Counter())[v] += n
        for c in sorted(by_check):
            parts = ", ".join(f"{v} {n}" for v, n in sorted(by_check[c].items()))
            print(f"  {c:<12} {parts}")
        if ndiv:
            print(f"{ndiv} divergences:")
            for (c, r), n in sorted(counts.divergences.items(), key=lambda x: (-x[1], x[0])):
                print(f"  {c}/{r}: {n}")
        else:
            print("no divergence")
        cgroups = summary["cgroups"]
        if cgroups:
            where = ("named from the recording" if rec.named
                     else "ids only: the recording does not name its cgroups")
            print(f"{len(cgroups)} cgroup{'' if len(cgroups) == 1 else 's'} ({where}):")
            top = cgroups[:TOP_CGROUPS]
            # the path last and whole: it is what a user searches for
            w = min(32, max(len("WORKLOAD"), *(len(c["workload"] or "-") for c in top)))
            print(f"  {'EPIS':>5} {'RECL':>5} {'KILL':>4} {'VICT':>4} {'DIV':>5}  {'WORKLOAD':<{w}}  CGROUP")
            for c in top:
                print(f"  {c['episodes']:>5} {c['reclaims']:>5} {c['oom_kills']:>4} {c['oom_victims']:>4} "
                      f"{c['divergences']:>5}  {_cell(c['workload'] or '-', w):<{w}}  {shown(c)}")
            if len(cgroups) > TOP_CGROUPS:
                print(f"  ... {len(cgroups) - TOP_CGROUPS} more (--json lists every cgroup)")
    return 1 if ndiv else 0
