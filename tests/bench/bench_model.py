"""How fast the model simulates charges, on this machine.

    python tests/bench/bench_model.py [--count N] [--profile 6.1] [--cgroup v2]

Three figures, each in simulated charges per second:

* stock hits: 1-page charges served by the per-cpu stock (the fast path);
* stock misses: charges that take the counters and refill the stock;
* slow paths: charges that hit the limit, reclaim (the oracle frees a
  page each call), and retry.

No pytest needed; ``run(count)`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    from memcgscope.model import GFP, Kernel
except ImportError:  # run from a checkout without an install
    sys.exit("memcgscope is not importable: install the project (pip install -e .) "
             "or run with the project's venv python")


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_stock_hits(count: int, profile: str, cgroup: str) -> float:
    k = Kernel(profile, cgroup=cgroup)
    a = k.mkdir("a")
    batch = k.profile.charge_batch
    elapsed = 0.0
    done = 0
    while done < count:
        k.charge(a, 1, GFP.KERNEL)          # a miss fills the stock (not timed)
        t0 = time.perf_counter()
        for _ in range(batch - 1):          # every one of these hits
            k.charge(a, 1, GFP.KERNEL)
        elapsed += time.perf_counter() - t0
        k.uncharge(a, a.charged)
        done += batch - 1
    return _rate(done, elapsed)


def bench_stock_misses(count: int, profile: str, cgroup: str) -> float:
    k = Kernel(profile, cgroup=cgroup)
    a, b = k.mkdir("a"), k.mkdir("b")
    t0 = time.perf_counter()
    for i in range(count):
        # alternate memcgs on one CPU: every charge misses (≤ 6.14 it also
        # drains the other memcg's stock; 6.18 keeps both in slots)
        m = a if i % 2 else b
        r = k.charge(m, k.profile.charge_batch, GFP.KERNEL)
        assert r.ret == 0
        k.uncharge(m, k.profile.charge_batch)
    return _rate(count, time.perf_counter() - t0)


def bench_slow_paths(count: int, profile: str, cgroup: str) -> float:
    k = Kernel(profile, cgroup=cgroup)
    a = k.mkdir("a")
    limit = "memory.max" if cgroup == "v2" else "memory.limit_in_bytes"
    assert k.write(a, limit, str(100 * 4096)) == 0
    r = k.charge(a, 100, GFP.KERNEL)
    assert r.ret == 0

    def reclaim(target, nr, gfp):
        return 1  # one page of cache each time: enough for a 1-page charge

    t0 = time.perf_counter()
    for _ in range(count):
        r = k.charge(a, 1, GFP.KERNEL, 0, reclaim)
        assert r.ret == 0 and r.of("reclaim")
    return _rate(count, time.perf_counter() - t0)


def run(count: int = 200_000, profile: str = "6.1", cgroup: str = "v2") -> dict:
    slow = max(1, count // 10)
    return {
        "profile": profile,
        "cgroup": cgroup,
        "stock_hits_per_s": bench_stock_hits(count, profile, cgroup),
        "stock_misses_per_s": bench_stock_misses(max(1, count // 4), profile, cgroup),
        "slow_paths_per_s": bench_slow_paths(slow, profile, cgroup),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000, help="stock-hit charges (others scaled)")
    p.add_argument("--profile", default="6.1")
    p.add_argument("--cgroup", default="v2", choices=["v1", "v2"])
    args = p.parse_args(argv)
    r = run(args.count, args.profile, args.cgroup)
    print(f"memcgscope model, profile {r['profile']} cgroup {r['cgroup']}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"  stock hits     {r['stock_hits_per_s']:>12,.0f} charges/s")
    print(f"  stock misses   {r['stock_misses_per_s']:>12,.0f} charges/s")
    print(f"  slow paths     {r['slow_paths_per_s']:>12,.0f} charges/s  "
          f"(limit hit, reclaim, retry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
