"""`memcgscope doctor`: what this kernel allows and which mode `run` uses.

Exit status: 0 when at least one probe mode is usable, 1 when none is,
2 for usage errors (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

EPILOG = """examples:
  memcgscope doctor              a table for people
  memcgscope doctor --json       the same for machines
  memcgscope doctor --root DIR   read /proc and /sys captured below DIR
  memcgscope doctor --capture DIR  save what doctor read, for a bug report
"""

STATE_MARK = {"ok": "ok", "absent": "NO", "refused": "REFUSED", "unknown": "?", "error": "ERROR",
              "unsupported": "NO"}


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="what this kernel allows and which mode run will use",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="read /proc and /sys below DIR (captured files); live checks are skipped unless DIR is /")
    p.add_argument("--capture", metavar="DIR",
                   help="also write the files doctor read (trimmed) and the live answers to DIR, for tests or a bug report")
    p.set_defaults(func=run)


def run(args) -> int:
    from memcgscope.probes.detect import Finding, RecordedChecks, detect
    from memcgscope.probes.sysroot import SysRoot
    import os

    if not os.path.isdir(args.root):
        print(f"memcgscope doctor: --root {args.root}: not a directory; give the folder holding proc/ and sys/",
              file=sys.stderr)
        return 2
    sysroot = SysRoot(args.root)
    active = None
    if not sysroot.live:
        not_live = Finding("unknown", "not checked: --root is not the live system")
        active = RecordedChecks(not_live, not_live)
    report = detect(sysroot, active)
    profile = profile_section(report)
    if args.capture:
        from memcgscope.probes.capture import capture
        capture(args.capture, sysroot, active)
    if args.json:
        d = report.to_dict()
        d["profile"] = profile
        json.dump(d, sys.stdout, indent=2)
        print()
    else:
        print(format_table(report, profile))
    return 0 if report.mode else 1


def profile_section(report) -> dict:
    """Which model profile run/replay/validate will check this kernel
    against, and why (model.profiles.resolve_profile, the one resolver)."""
    from .run_cmd import resolution_for
    try:
        res = resolution_for(report)
    except ValueError as e:
        return {"profile": None, "upstream": None, "reason": str(e), "warning": str(e)}
    return {"profile": res.profile.name, "upstream": res.upstream, "reason": res.reason,
            "warning": res.warning}


def format_table(report, profile: dict | None = None) -> str:
    out: list[str] = []
    w = out.append
    w(f"memcgscope doctor: kernel {report.kernel}")
    if report.kernel_version:
        _wrapped(w, "uname -v: ", report.kernel_version)
    if profile is not None:
        if profile["profile"]:
            _wrapped(w, f"model profile: {profile['profile']}: ", profile["reason"])
        if profile["warning"]:
            _wrapped(w, "  warning: ", profile["warning"])
    w("")
    w(f"{'CHECK':<10} {'STATE':<8} DETAIL")
    for name, c in report.checks.items():
        _wrapped(w, f"{name:<10} {STATE_MARK.get(c.state, c.state):<8} ", c.detail)
    w("")
    w(f"{'FUNCTION':<30} {'SYMBOL':<34} PROBE")
    for f in report.functions:
        wanted = "/".join(f.names)
        symbol = f.symbol or "absent"
        probe = {True: "yes", False: "no", None: "?"}[f.probeable]
        if len(wanted) > 30:
            w(wanted)
            wanted = ""
        w(f"{wanted:<30} {symbol:<34} {probe}")
    if any(f.probeable is None for f in report.functions):
        w("  (? = available_filter_functions not readable; kallsyms says present)")
    w("")
    w(f"{'TRACEPOINT':<50} STATE")
    for name, present in report.tracepoints.items():
        w(f"{name:<50} {'ok' if present else 'absent'}")
    w("")
    _wrapped(w, "cgroups:  ", report.cgroups.detail)
    if report.cgroups.own_memory_cgroup:
        _wrapped(w, "own:      ", report.cgroups.own_memory_cgroup)
    w("")
    w(f"{'MODE':<11} {'USABLE':<7} WHY")
    for mode, v in report.modes.items():
        _wrapped(w, f"{mode:<11} {'yes' if v.usable else 'no':<7} ", v.reason)
    w("")
    if report.mode:
        _wrapped(w, f"run will use: {report.mode}: ", report.mode_reason)
    else:
        _wrapped(w, "run cannot start: ", report.mode_reason)
    if report.fixes:
        w("")
        w("to fix:")
        for fix in report.fixes:
            _wrapped(w, "  - ", fix)
    return "\n".join(out)


def _wrapped(w, head: str, text: str, width: int = 80) -> None:
    lines = textwrap.wrap(text, width=width - len(head)) or [""]
    w(head + lines[0])
    for line in lines[1:]:
        w(" " * len(head) + line)
