"""How fast the cross-checker checks recorded episodes, on this machine.

    python tests/bench/bench_replay.py [--count N] [FILE ...]

The episodes of the recordings (default: tests/unit/data/recordings/*.jsonl)
are cycled into a stream of N episodes per recording, in recorded order,
and checked by a fresh CrossChecker for that recording's kernel.  Two
figures, in episodes per second on one core:

* check: ``CrossChecker.check`` on already decoded episodes;
* decode+check: ``json.loads`` of the line, then the check (what
  ``memcgscope replay`` does per episode; the daemon gets dicts, not JSON).

Both for the recordings as they are (one of each rare shape: OOM episodes
and limit writes with hundreds of steps weigh a lot) and for the short
episodes only (at most 6 steps: >95% of what the VM workloads recorded).

The first occurrence of each episode shape runs the full model replay; the
rest hit the shape cache (``replays`` says how many full replays ran).
No pytest needed; ``run(count, files)`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    from memcgscope.collector.crosscheck import CrossChecker
except ImportError:  # run from a checkout without an install
    sys.exit("memcgscope is not importable: install the project (pip install -e .) "
             "or run with the project's venv python")

RECORDINGS = Path(__file__).resolve().parents[1] / "unit" / "data" / "recordings"


def _checker(header: dict) -> CrossChecker:
    cg = "v1" if (header.get("cgroup") or {}).get("v1_memory") else "v2"
    return CrossChecker(header["kernel"], cg, bool(header.get("memsw")))


def _stream(path: Path, count: int, short: bool) -> tuple[dict, list[str]]:
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    eps = [x for x in lines[1:] if json.loads(x).get("type") == "episode"
           and (not short or len(json.loads(x).get("steps") or ()) <= 6)]
    if not eps:
        raise SystemExit(f"{path}: no episodes")
    return header, [eps[i % len(eps)] for i in range(count)]


def run(count: int = 50_000, files=None, short: bool = False) -> dict:
    files = [Path(f) for f in files] if files else sorted(RECORDINGS.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no recordings in {RECORDINGS}")
    n = 0
    t_check = t_both = 0.0
    replays = divergences = 0
    for path in files:
        header, lines = _stream(path, count, short)
        decoded = [json.loads(x) for x in lines]
        cc = _checker(header)
        t0 = time.perf_counter()
        for ep in decoded:
            divergences += len(cc.check(ep).divergences)
        t_check += time.perf_counter() - t0
        replays += cc.replays
        cc = _checker(header)
        loads, check = json.loads, cc.check
        t0 = time.perf_counter()
        for line in lines:
            check(loads(line))
        t_both += time.perf_counter() - t0
        n += len(lines)
    return {"episodes": n, "check_per_s": n / t_check if t_check else float("inf"),
            "decode_check_per_s": n / t_both if t_both else float("inf"),
            "full_replays": replays, "divergences": divergences, "files": [p.name for p in files]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50_000, help="episodes per recording (default 50000)")
    ap.add_argument("files", nargs="*", help="recordings (default: the unit test recordings)")
    a = ap.parse_args(argv)
    if a.count < 1:
        ap.error("--count must be at least 1")
    for short in (False, True):
        r = run(a.count, a.files, short)
        print(f"{r['episodes']} {'short ' if short else ''}episodes from {len(r['files'])} recordings "
              f"({r['full_replays']} full model replays, {r['divergences']} divergences)")
        print(f"  check         {r['check_per_s']:>10,.0f} episodes/s")
        print(f"  decode+check  {r['decode_check_per_s']:>10,.0f} episodes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
