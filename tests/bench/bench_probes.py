"""Probe overhead on a charge-heavy workload (tests/bench/faultloop.c: map,
touch, unmap in a scratch cgroup), with and without each probe mode, in one
run: rounds alternate bare / probed so drift hits both alike. Prints
ns per faulted page and the ratio (probed / bare) per mode. Root.

    python tests/bench/bench_probes.py [--modes tracepoint,kprobe,fentry]
                                       [--rounds 5] [--iters 200]

Targets on real hardware, worst case: fentry and tracepoint < 1.03,
kprobe < 1.08. Under QEMU TCG (the VM tier) every instruction is emulated,
so absolute costs and ratios are distorted; compare modes with each other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memcgscope.collector.scratch import ScratchCgroup  # noqa: E402
from memcgscope.probes.detect import detect  # noqa: E402
from memcgscope.probes.bpfsys import bpf_stats_enabled  # noqa: E402
from memcgscope.probes.session import Session  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultloop.c")


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "faultloop")
    subprocess.run([shutil.which("gcc") or "cc", "-O2", "-o", exe, SOURCE], check=True)
    return exe


PIN: list[str] = []  # ["taskset", "-c", "N"] with --cpu N


def one_run(cg: ScratchCgroup, exe: str, iters: int) -> float:
    r = cg.run([*PIN, exe, str(iters), "4"], timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"faultloop failed: {r.stderr}")
    return float(r.stdout.strip())


def bpf_stats():
    """kernel.bpf_stats_enabled on for the measurement (the kernel's own
    count of time spent in our programs), restored after."""
    return bpf_stats_enabled()


def measure(modes: list[str], rounds: int, iters: int, memcg_state: bool = False) -> dict[str, dict]:
    """mode -> medians of bare and probed ns/page and of the per-round
    ratios. Each round runs probed then bare back to back (probes paused,
    programs still loaded), so machine noise hits both alike."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp, ScratchCgroup("bench", "512M") as cg:
        exe = build(tmp)
        one_run(cg, exe, max(1, iters // 10))  # warm up page tables and caches
        for mode in modes:
            bare, probed, ratios = [], [], []
            bpf_ns = 0
            with Session(mode, memcg_state=memcg_state) as s, bpf_stats():
                for _ in range(rounds):
                    before = sum(ns for ns, _ in s.program_stats().values())
                    p = one_run(cg, exe, iters)
                    bpf_ns += sum(ns for ns, _ in s.program_stats().values()) - before
                    s.poll(timeout_ms=0)
                    s.pause()
                    b = one_run(cg, exe, iters)
                    s.resume()
                    probed.append(p)
                    bare.append(b)
                    ratios.append(p / b)
            pages = rounds * iters * (4 << 20) // 4096
            out[mode] = {"bare": statistics.median(bare), "probed": statistics.median(probed),
                         "bpf_ns_per_page": bpf_ns / pages,
                         "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=None, help="comma-separated modes (default: every usable one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200, help="map/touch/unmap cycles of 4 MiB per run")
    ap.add_argument("--memcg-state", action="store_true", help="also the per-page memcg:mod_memcg_lruvec_state")
    ap.add_argument("--cpu", type=int, help="pin the workload to this CPU (less noise from migrations)")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        PIN[:] = ["taskset", "-c", str(args.cpu)]
    report = detect()
    modes = args.modes.split(",") if args.modes else [m for m, v in report.modes.items() if v.usable]
    results = measure(modes, args.rounds, args.iters, args.memcg_state)
    print(f"kernel {report.kernel}, {os.cpu_count()} CPUs, {args.rounds} rounds of {args.iters} x 4 MiB"
          + (", with --memcg-state" if args.memcg_state else ""))
    print(f"{'mode':<11} {'bare ns/page':>13} {'probed ns/page':>15} {'ratio':>7} {'(min-max)':>14} "
          f"{'BPF ns/page':>12}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['bare']:>13.1f} {r['probed']:>15.1f} {r['ratio']:>7.3f} "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) {r['bpf_ns_per_page']:>12.1f}")
    print("ratio: median of per-round probed/bare; BPF ns/page: time the kernel accounts to our programs "
          "(kernel.bpf_stats_enabled), excluding the attach mechanism's own cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
