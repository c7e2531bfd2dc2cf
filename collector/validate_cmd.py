"""`memcgscope validate`: check the model against this kernel (root).

Three forms:

  memcgscope validate [SCENARIO.toml ...]
      Each scenario (the files `simulate` runs; without any, the built-in
      suite in model/scenarios/) runs twice: on this kernel — scratch
      cgroups below your own, real processes, the probes watching — and
      through the model of this kernel's profile. Every episode goes
      through the cross-check, and the end state (each operation's result,
      who was killed, the cgroupfs counters) is compared field by field,
      each with a stated tolerance.
  memcgscope validate --vm KERNEL [SCENARIO.toml ...]
      The same inside a Debian guest kernel booted with virtme-ng (fetched
      into memcgscope's cache first); the report comes back here.
  memcgscope validate [--memory-max 30M] [--memory-high ...] [--swap-max ...] -- CMD ARGS...
      Runs your command in a scratch cgroup with those limits, under the
      probes, and reports its exit status, the cgroupfs end state, the
      episodes by kind and every divergence with its episode.
  memcgscope validate --recheck REPORT.json [--profile P]
      Offline, no root: the kernel side a `--json` report recorded (each
      operation's result, who was killed, the cgroupfs files) compared
      again with the model, under another profile: which kernel versions
      this kernel's behaviour tells apart.

Exit status: 0 when every applicable field agrees (a scenario that does not
apply says why: never a pass), 1 when any disagrees, 2 for a usage or
set-up error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EPILOG = """examples:
  memcgscope validate                                 the built-in suite on this kernel
  memcgscope validate model/scenarios/v1-resize-ebusy.toml --json
  memcgscope validate --profile 5.10                  a wrong profile must disagree
  memcgscope validate --vm 6.12 --cgroup v2           inside a Debian 6.12 guest
  memcgscope validate --memory-max 30M -- stress-ng --vm 1 --vm-bytes 100M -t 10
  memcgscope validate --vm 7.3 --json > r.json; memcgscope validate --recheck r.json --profile 7.2
"""


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check the model against this kernel: scenarios or your command (root)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="SCENARIO.toml | -- CMD",
                   help="scenario files (default: the built-in suite), or after '--' a command to run")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--profile", help="model profile to compare with (default: the one this kernel resolves to)")
    p.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"), help="probe mode (default: the best usable)")
    p.add_argument("--parent", metavar="DIR",
                   help="cgroup directory to make scratch cgroups in (default: your own memory cgroup; "
                        "required when you run in the root cgroup)")
    p.add_argument("--workdir", default="/var/tmp", metavar="DIR",
                   help="a directory on a local filesystem for page-cache files (default /var/tmp)")
    p.add_argument("--scratch-limit", default="1G", metavar="SIZE",
                   help="hard limit of the scratch cgroup holding a scenario (default 1G)")
    p.add_argument("--no-probes", action="store_true",
                   help="compare end states only, without probing (no root BPF; episodes unchecked)")
    p.add_argument("--recheck", metavar="REPORT",
                   help="compare a --json report's kernel side with the model again (offline; --profile P)")
    v = p.add_argument_group("in a guest kernel")
    v.add_argument("--vm", metavar="KERNEL",
                   help="validate inside this kernel under QEMU: a Debian family or version (5.10, 6.1, 7.3, "
                        "6.18.15; fetched into memcgscope's cache) or a vmlinuz path")
    v.add_argument("--cgroup", choices=("v1", "v2"), help="the guest's memory hierarchy (default v2)")
    v.add_argument("--vm-timeout", type=float, default=3600.0, metavar="S",
                   help="kill the guest after S seconds (default 3600)")
    g = p.add_argument_group("your command (after --)")
    g.add_argument("--memory-max", metavar="SIZE", help="memory.max (v2) / memory.limit_in_bytes (v1)")
    g.add_argument("--memory-high", metavar="SIZE", help="memory.high (v2 only)")
    g.add_argument("--swap-max", metavar="SIZE", help="memory.swap.max (v2) / memsw limit = max + this (v1)")
    g.add_argument("--out", metavar="REC", help="keep the command's episodes as a recording")
    g.add_argument("--timeout", type=float, default=600.0, metavar="S", help="kill the command after S seconds")
    p.set_defaults(func=run)


def _fail(msg: str, code: int = 2) -> int:
    print(f"memcgscope validate: {msg}", file=sys.stderr)
    return code


class _Interrupted(Exception):
    pass


def run(args) -> int:
    from .validate.setup import SetupError, environment

    command = args.items if "--" in (getattr(args, "argv", None) or []) else None
    args.command = command   # validate.setup: a command needs no --workdir
    if args.recheck:
        if args.vm or command is not None or args.items:
            return _fail("--recheck takes a report only (and --profile, --json)")
        return _recheck(args)
    if args.vm and command is not None:
        return _fail("--vm takes scenarios, not a command after '--'")
    if args.cgroup and not args.vm:
        return _fail("--cgroup chooses a guest's hierarchy: it goes with --vm (here the host's is used)")
    if command is not None and not command:
        return _fail("'--' needs a command after it, e.g. -- stress-ng --vm 1 --vm-bytes 100M")
    if command is None and (args.memory_max or args.memory_high or args.swap_max or args.out):
        return _fail("--memory-max/--memory-high/--swap-max/--out go with a command: ... -- CMD ARGS")
    if os.geteuid() != 0:
        return _fail("needs root (scratch cgroups, BPF); run it as root", 2)

    def on_signal(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.vm:
            return _in_vm(args)
        with environment(args) as env:
            if command is not None:
                from .validate.command import run_command
                return run_command(env, args, command)
            return _scenarios(env, args)
    except SetupError as e:
        return _fail(str(e))
    except _Interrupted as e:
        print(f"memcgscope validate: {e}: stopped; scratch cgroups removed, probes detached", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _recheck(args) -> int:
    import json

    from memcgscope.model.profiles import get_profile

    from .validate.compare import recheck
    from .validate.plan import PlanError, load_plan
    from .validate.report import format_table, to_json
    from .validate.suite import ScenarioReport

    try:
        with open(args.recheck, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        return _fail(f"--recheck {args.recheck}: {e}; give a report written by validate --json")
    if not isinstance(doc, dict) or not isinstance(doc.get("scenarios"), list):
        return _fail(f"--recheck {args.recheck}: no 'scenarios' list; give a report written by validate --json")
    name = args.profile or doc.get("profile")
    try:
        profile = get_profile(name)
    except (KeyError, ValueError) as e:
        return _fail(f"--profile {name}: {e}")
    reports = []
    for s in doc["scenarios"]:
        rep = ScenarioReport(s.get("scenario", "?"), s.get("description", ""))
        if s.get("kernel_side") is None or not s.get("source"):
            rep.not_applicable = s.get("not_applicable") or "the report kept no kernel side for it"
        else:
            try:
                plan = load_plan(s["source"], rep.name)
                rep.rows = recheck(plan, s["kernel_side"], profile)
            except (PlanError, ValueError) as e:
                rep.error = str(e)
        reports.append(rep)
    facts = {k: doc.get(k) for k in ("kernel", "kernel_version", "upstream")}
    facts.update(profile=profile.name, recheck_of=args.recheck, recorded_profile=doc.get("profile"))
    if args.json:
        print(to_json(reports, facts))
    else:
        print(format_table(reports, f"memcgscope validate --recheck {args.recheck}: kernel {doc.get('kernel')} "
                                    f"against model profile {profile.name} (recorded: {doc.get('profile')}); "
                                    f"end states only"))
    return 1 if any(r.verdict in ("disagree", "error") for r in reports) else 0


def _progress(msg: str) -> None:
    print(f"memcgscope validate: {msg}", file=sys.stderr, flush=True)


def _paths(args) -> list[str] | None:
    from .validate.suite import builtin_scenarios
    paths = args.items or builtin_scenarios()
    for path in paths:
        if not os.path.isfile(path):
            _fail(f"{path}: no such scenario file; give a TOML scenario (see model/scenarios/)")
            return None
    return paths


def _in_vm(args) -> int:
    import json

    from .validate.report import format_table, reports_from_json
    from .validate.vm import run_vm

    paths = _paths(args)
    if paths is None:
        return 2
    doc = run_vm(args, paths, _progress)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        g = doc["guest"]
        header = (f"memcgscope validate --vm: guest {g['release']} ({g['cgroup']}, {g['accel']}, "
                  f"{g['seconds']:.0f}s): model profile {doc['profile']}, {doc['mode'] or 'no probes'}")
        print(format_table(reports_from_json(doc), header))
    return 0 if doc.get("agree") else 1


def _scenarios(env, args) -> int:
    from .validate.plan import PlanError
    from .validate.report import format_table, to_json

    paths = _paths(args)
    if paths is None:
        return 2
    env.validator.progress = _progress
    reports = []
    for path in paths:
        try:
            reports.append(env.validator.validate(path))
        except PlanError as e:
            return _fail(str(e))
    if args.json:
        print(to_json(reports, env.facts_json()))
    else:
        print(format_table(reports, env.header()))
    return 1 if any(r.verdict in ("disagree", "error") for r in reports) else 0
