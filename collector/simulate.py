"""``memcgscope simulate SCENARIO``: run a scenario file through the model.

Prints, per operation, the result and the control files that changed;
``--json`` prints one JSON document instead.  Exit status: 0 when every
operation ran (and matched its ``expect``), 1 when an ``expect`` did not
match, 2 for a bad scenario file or usage (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  memcgscope simulate model/scenarios/anon-oom-v2.toml
  memcgscope simulate --json model/scenarios/v1-resize-ebusy.toml
  memcgscope simulate --steps model/scenarios/v2-max-shrink-oom.toml
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="run a scenario file through the model (no root needed)",
        description="Run a TOML scenario (profile, cgroup tree, operations) through the "
                    "memcg model and its simulated environment.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", help="scenario file (TOML); '-' reads stdin")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--steps", action="store_true",
                   help="also print every model step (long for touches)")
    p.set_defaults(func=run)
    return p


def _fmt_changed(changed: dict) -> list[str]:
    lines = []
    for path, files in changed.items():
        for fname, (old, new) in files.items():
            old_s = "(new)" if old is None else old.strip().replace("\n", "; ")
            new_s = new.strip().replace("\n", "; ")
            lines.append(f"      {path.rstrip('/') or '/'}{'' if path == '/' else '/'}{fname}: "
                         f"{old_s} -> {new_s}")
    return lines


def run(args) -> int:
    from memcgscope.model.scenario import ScenarioError, run_scenario

    name = args.scenario
    try:
        if name == "-":
            text, shown = sys.stdin.read(), "<stdin>"
        else:
            with open(name, "rb") as f:
                text = f.read().decode("utf-8")
            shown = name
    except OSError as e:
        print(f"memcgscope simulate: {name}: {e.strerror}; give the path of a scenario "
              f"file (see model/scenarios/)", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"memcgscope simulate: {name}: not UTF-8 text ({e.reason} at byte {e.start}); "
              f"save the scenario as UTF-8", file=sys.stderr)
        return 2
    try:
        results = run_scenario(text, shown)
    except ScenarioError as e:
        print(f"memcgscope simulate: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    if args.json:
        json.dump({"scenario": shown, "ok": not failed,
                   "ops": [r.as_dict() for r in results]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for r in results:
            mark = "" if r.ok else f"   << expected {r.expect!r}, got {r.ret!r}"
            print(f"[{r.index}] {r.op}: {r.summary}{mark}")
            if args.steps:
                for s in r.steps:
                    fields = ", ".join(f"{k}={v}" for k, v in s.as_dict().items() if k != "kind")
                    print(f"      . {s.kind}({fields})")
            for line in _fmt_changed(r.changed):
                print(line)
        if failed:
            print(f"{len(failed)} operation(s) did not match their expect", file=sys.stderr)
    return 1 if failed else 0
