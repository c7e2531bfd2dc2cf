"""Runs bench_rss.py inside Debian guests (tests/vm/harness.py), in the
modes this host cannot load: resident memory of `memcgscope run`, this
checkout against a git ref, side by side in one guest run. Root, QEMU.

    python tests/bench/bench_rss_vm.py [--guests debian-6.12-v2:fentry,debian-5.10-v2:kprobe]
                                       [--minutes 5] [--baseline-ref main]

The workload writes through the page cache of an ext4 on a RAM disk (the
guest's / is 9p, its /tmp tmpfs: neither is page cache reclaim can drop).
Under TCG start-up times are those of an emulated CPU (the bcc compile
dominates); the resident-memory figures are not inflated by it.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vm"))

from harness import GUESTS, REPO, find_kernel  # noqa: E402

from memcgscope.collector import guest as _guest  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", default="debian-6.12-v2:fentry,debian-5.10-v2:kprobe",
                    help="GUEST:MODE,... (default %(default)s)")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--baseline-ref", default="main")
    args = ap.parse_args(argv)
    by_name = {g.name: g for g in GUESTS}
    status = 0
    for item in args.guests.split(","):
        name, _, mode = item.partition(":")
        g = by_name[name]
        kf = find_kernel(g)
        cmd = (f".venv/bin/python tests/bench/bench_rss.py --mode {mode or 'fentry'} --minutes {args.minutes} "
               f"--baseline-ref {args.baseline_ref} --workdir {_guest.PAGE_CACHE_DIR}")
        r = _guest.run_in_guest(_guest.GuestKernel(kf.release, kf.vng_args(), kf), cmd, cgroup=g.cgroup,
                                timeout=3600 + args.minutes * 60, cwd=REPO, page_cache=True)
        print(f"== {name} ({r.kernel}, {r.accel}), exit {r.returncode}, {r.seconds:.0f}s", flush=True)
        print(r.stdout.strip() or r.stderr[-3000:], flush=True)
        status |= 1 if r.returncode else 0
    return status


if __name__ == "__main__":
    sys.exit(main())
