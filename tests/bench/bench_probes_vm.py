"""Runs bench_probes.py inside the Debian guests (tests/vm/harness.py), for
the kprobe and fentry modes this host cannot load. Root, QEMU.

    python tests/bench/bench_probes_vm.py [--guests debian-6.1-v2,debian-7.3-v2]
                                          [--modes kprobe,fentry] [--rounds 5] [--iters 50]
                                          [--baseline-ref REF] [--lean]

--baseline-ref REF: in the same boot, the same benchmark script (this
checkout's) also measures the code of git REF, unpacked below the checkout
(the guest sees the host's files read-only; bench_rss.baseline_tree) and
imported from there: before/after, same guest, same run.

The guests run under TCG (software emulation): every instruction costs
more than on hardware, so ratios are indicative; compare modes side by side.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vm"))
sys.path.insert(0, HERE)

from harness import GUESTS, REPO, run_in_guest  # noqa: E402


def guest_command(bench_args: str, baseline: str | None = None, ref: str = "") -> str:
    """The guest's shell line: this checkout's benchmark, then (with a
    baseline tree) the same script over REF's code."""
    script = os.path.join(HERE, "bench_probes.py")
    cmd = f"echo '=== this checkout ==='; .venv/bin/python {shlex.quote(script)} {bench_args}"
    if baseline:
        cmd += (f"; echo '=== {ref} ==='; PYTHONPATH={shlex.quote(baseline)} .venv/bin/python "
                f"{shlex.quote(script)} {bench_args}")
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", default="debian-6.1-v2,debian-7.3-v2")
    ap.add_argument("--modes", default="tracepoint,kprobe,fentry")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--baseline-ref", metavar="REF", help="also measure git REF's code in the same boot")
    ap.add_argument("--lean", action="store_true", help="bench_probes.py --lean: each mode also without the "
                                                        "per-page probes run --no-probe can leave out")
    args = ap.parse_args(argv)
    by_name = {g.name: g for g in GUESTS}
    unknown = [n for n in args.guests.split(",") if n not in by_name]
    if unknown:
        ap.error(f"--guests: no guest {unknown[0]!r}; guests: {', '.join(by_name)}")
    bench_args = (f"--modes {shlex.quote(args.modes)} --rounds {args.rounds} --iters {args.iters}"
                  + (" --lean" if args.lean else ""))
    tmp = baseline = None
    if args.baseline_ref:
        import bench_rss
        # below the checkout: the guest's /tmp and /var/tmp are its own
        tmp = tempfile.mkdtemp(prefix=".bench-baseline-", dir=REPO)
        try:
            baseline = bench_rss.baseline_tree(args.baseline_ref, tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            ap.error(f"--baseline-ref {args.baseline_ref}: {e}")
    status = 0
    try:
        for name in args.guests.split(","):
            r = run_in_guest(by_name[name], guest_command(bench_args, baseline, args.baseline_ref or ""),
                             timeout=2400)
            print(f"== {name} (TCG), exit {r.returncode}, {r.seconds:.0f}s")
            print(r.stdout.strip() or r.stderr[-2000:])
            status |= r.returncode
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
