"""Runs bench_probes.py inside the Debian guests (tests/vm/harness.py), for
the kprobe and fentry modes this host cannot load. Root, QEMU.

    python tests/bench/bench_probes_vm.py [--guests debian-6.1-v2,debian-7.3-v2]
                                          [--rounds 5] [--iters 50]

The guests run under TCG (software emulation): every instruction costs
more than on hardware, so ratios are indicative; compare modes side by side.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vm"))

from harness import GUESTS, run_in_guest  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", default="debian-6.1-v2,debian-7.3-v2")
    ap.add_argument("--modes", default="tracepoint,kprobe,fentry")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    by_name = {g.name: g for g in GUESTS}
    status = 0
    for name in args.guests.split(","):
        r = run_in_guest(by_name[name], f".venv/bin/python tests/bench/bench_probes.py --modes {args.modes} "
                                        f"--rounds {args.rounds} --iters {args.iters}", timeout=1800)
        print(f"== {name} (TCG), exit {r.returncode}, {r.seconds:.0f}s")
        print(r.stdout.strip() or r.stderr[-2000:])
        status |= r.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
