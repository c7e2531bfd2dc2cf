"""`memcgscope replay`: cross-check a recording (memcgscope.episodes/1 JSON
lines, written by `memcgscope record`) against the model, offline, without
root.

The header says the kernel (→ model profile), the cgroup version and
whether v1 swap accounting is on; every episode is checked; a summary (or
JSON with --json) says how many checks passed and which divergences were
found.  Exit status: 0 no divergence, 1 divergences, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  memcgscope replay episodes.jsonl
  memcgscope replay --json --divergences div.jsonl episodes.jsonl
  memcgscope replay --profile 6.1 episodes.jsonl
"""

SCHEMA = "memcgscope.episodes/1"


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="cross-check a recording against the model (offline)",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a recording ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--profile", metavar="NAME",
                   help="model profile or kernel release instead of the header's kernel")
    p.add_argument("--divergences", metavar="FILE",
                   help="write each divergent episode as a JSON line to FILE")
    p.set_defaults(func=run)


class BadInput(Exception):
    """One line: what is wrong, where, and what to do."""


def _err(msg: str) -> int:
    print(f"memcgscope replay: {msg}", file=sys.stderr)
    return 2


def read_recording(text: str, name: str):
    """→ (header, [(line number, episode)], warnings).  Raises BadInput."""
    import json

    lines = text.split("\n")
    ends_with_newline = text.endswith("\n")
    if ends_with_newline:
        lines.pop()
    header = None
    episodes = []
    warnings = []
    last = len(lines)
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if no == last and not ends_with_newline:
                warnings.append(f"{name}:{no}: last line is truncated (not JSON: {e.msg}); "
                                f"it was skipped, the rest was checked")
                continue
            raise BadInput(f"{name}:{no}: not JSON ({e.msg} at column {e.colno}); "
                           f"fix or drop the line") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{name}:{no}: a JSON {type(obj).__name__}, not an object; fix or drop the line")
        kind = obj.get("type")
        if header is None:
            if kind != "header":
                raise BadInput(f"{name}:{no}: the first line must be the header "
                               f"({{\"type\": \"header\", \"schema\": \"{SCHEMA}\", ...}}), "
                               f"not type {kind!r}; is this a recording from 'memcgscope record'?")
            if obj.get("schema") != SCHEMA:
                raise BadInput(f"{name}:{no}: schema {obj.get('schema')!r} is not {SCHEMA!r}; "
                               f"record it again with this memcgscope")
            header = obj
            continue
        if kind == "episode":
            if not isinstance(obj.get("kind"), str):
                raise BadInput(f"{name}:{no}: episode without a 'kind'; fix or drop the line")
            episodes.append((no, obj))
        elif kind in ("lost", "trailer"):
            continue
        elif kind == "header":
            raise BadInput(f"{name}:{no}: a second header; split the file at this line")
        else:
            raise BadInput(f"{name}:{no}: unknown line type {kind!r}; fix or drop the line")
    if header is None:
        raise BadInput(f"{name}: empty, no header line; is this a recording from 'memcgscope record'?")
    return header, episodes, warnings


def _setup(header: dict, profile_arg: str | None, name: str):
    from memcgscope.model.profiles import get_profile

    release = profile_arg or header.get("kernel")
    if not release:
        raise BadInput(f"{name}:1: the header has no 'kernel'; pass --profile")
    try:
        profile = get_profile(release)
    except ValueError as e:
        where = "--profile" if profile_arg else f"{name}:1: kernel"
        raise BadInput(f"{where} {release!r}: {e}" + ("" if profile_arg else "; pass --profile")) from None
    cg = header.get("cgroup") or {}
    if cg.get("v1_memory"):
        cgroup = "v1"
    elif cg.get("v2_memory"):
        cgroup = "v2"
    else:
        raise BadInput(f"{name}:1: the header's 'cgroup' names no memory controller (v1_memory, v2_memory)")
    memsw = bool(header.get("memsw")) and cgroup == "v1"
    # drains are always seen only when drain_all_stock itself (not a .part
    # clone entered past its trylock) is probed, with no caveat (6.12 fentry:
    # "calls that go straight to drain_all_stock.part.0 are not seen")
    drains_visible = any(p.get("role") == "drain_all_stock" and p.get("attached")
                         and "." not in str(p.get("target", "")) and not p.get("reason")
                         for p in header.get("probes") or ())
    return profile, cgroup, memsw, drains_visible, bool(header.get("forced_charges"))


def run(args) -> int:
    import json
    from collections import Counter

    from memcgscope.collector.crosscheck import CrossChecker

    name = args.file
    try:
        if name == "-":
            text = sys.stdin.read()
            name = "<stdin>"
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        return _err(f"{name}: no such file; give the path of a recording")
    except IsADirectoryError:
        return _err(f"{name}: is a directory; give the path of a recording")
    except UnicodeDecodeError as e:
        return _err(f"{name}: not UTF-8 text (byte {e.start}); give a JSON lines recording")
    except OSError as e:
        return _err(f"{name}: {e.strerror}")
    try:
        header, episodes, warnings = read_recording(text, name)
        profile, cgroup, memsw, drains_visible, forced_visible = _setup(header, args.profile, name)
    except BadInput as e:
        return _err(str(e))
    for w in warnings:
        print(f"memcgscope replay: {w}", file=sys.stderr)

    out = None
    if args.divergences:
        try:
            out = open(args.divergences, "w", encoding="utf-8")
        except OSError as e:
            return _err(f"--divergences {args.divergences}: {e.strerror}; give a writable path")

    cc = CrossChecker(profile, cgroup, memsw, drains_visible=drains_visible, forced_charges_visible=forced_visible)
    checks: Counter = Counter()
    reasons: Counter = Counter()
    kinds: Counter = Counter()
    try:
        for no, ep in episodes:
            kinds[ep["kind"]] += 1
            res = cc.check(ep)
            checks.update(res.checks)
            for d in res.divergences:
                reasons[(d.check, d.reason)] += 1
                if out is not None:
                    out.write(json.dumps({"type": "divergence", "line": no, "check": d.check,
                                          "reason": d.reason, "detail": d.detail,
                                          "episode": ep}) + "\n")
    finally:
        if out is not None:
            out.close()

    ndiv = sum(reasons.values())
    summary = {
        "file": name, "kernel": header.get("kernel"), "profile": profile.name, "cgroup": cgroup,
        "memsw": memsw, "episodes": len(episodes), "episodes_by_kind": dict(sorted(kinds.items())),
        "checks": {f"{c}/{v}": n for (c, v), n in sorted(checks.items())},
        "divergences": ndiv,
        "divergences_by_reason": {f"{c}/{r}": n for (c, r), n in sorted(reasons.items())},
        "warnings": warnings,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{name}: kernel {header.get('kernel')} (profile {profile.name}), cgroup {cgroup}"
              f"{' with memsw' if memsw else ''}; {len(episodes)} episodes")
        by_check: dict = {}
        for (c, v), n in checks.items():
            by_check.setdefault(c, Counter())[v] += n
        for c in sorted(by_check):
            parts = ", ".join(f"{v} {n}" for v, n in sorted(by_check[c].items()))
            print(f"  {c:<12} {parts}")
        if ndiv:
            print(f"{ndiv} divergences:")
            for (c, r), n in sorted(reasons.items(), key=lambda x: (-x[1], x[0])):
                print(f"  {c}/{r}: {n}")
        else:
            print("no divergence")
    return 1 if ndiv else 0
