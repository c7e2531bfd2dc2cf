"""The `memcgscope` command line: one subcommand per job.

Each subcommand lives in its own module with `add_parser(subparsers)` and
`run(args) -> int`. Modules import only argparse at load time and the
rest inside `run`, so `memcgscope simulate` works on a machine without bcc.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from memcgscope import __version__

# command name -> module under memcgscope.collector
COMMANDS = {
    "doctor": "doctor_cmd",
    "simulate": "simulate",
    "record": "record_cmd",
    "run": "run_cmd",
    "replay": "replay_cmd",
    "validate": "validate_cmd",
    "trace": "trace_cmd",
    "kernels": "kernels",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memcgscope",
        description="Watch the memory-cgroup charge path with eBPF and check it against a model.",
    )
    parser.add_argument("--version", action="version", version=f"memcgscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"memcgscope.collector.{module}")
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv   # argparse drops '--'; `validate -- CMD` needs to know it was there
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
