"""The cross-checker's verdicts on every committed recording, under every
model profile, are the ones in ``data/recordings/verdicts.json``.

The file pins the checker's behaviour: per episode line, the checks and
their verdicts, the divergences (check, reason, detail) and the counts the
aggregate checks take (``events``, ``failures``, ``kills``).  Each
recording is checked the way ``memcgscope replay --profile P`` checks it:
cgroup version, memsw, drain visibility and forced-charge visibility from
the header, and profile P.  Besides the episodes as recorded, each is also
checked with a few deterministic mutations (a step dropped, duplicated or
swapped, another return value), which drive the replay through its
divergence paths.

A deliberate change of behaviour regenerates the file:

    .venv/bin/python tests/unit/collector/test_crosscheck_golden.py --write

and the diff of verdicts.json is part of the change's review.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest

from memcgscope.collector.crosscheck import CrossChecker

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "recordings"
GOLDEN = RECORDINGS / "verdicts.json"
PROFILES = ("5.10", "5.10.0", "5.15", "6.1.0", "6.1.56", "6.1", "6.6", "6.12.0", "6.12.109", "6.12",
            "6.18", "6.18.36", "6.18.50", "6.18.51", "7.2.0", "7.2.4", "7.2", "7.3.0", "7.3")
MUTATIONS = 3          # per episode


def _config(header: dict) -> dict:
    """The checker options ``memcgscope replay`` derives from a header."""
    cg = header.get("cgroup") or {}
    cgroup = "v1" if cg.get("v1_memory") else "v2"
    drains_visible = any(p.get("role") == "drain_all_stock" and p.get("attached")
                         and "." not in str(p.get("target", "")) and not p.get("reason")
                         for p in header.get("probes") or ())
    return {"cgroup": cgroup, "memsw": bool(header.get("memsw")) and cgroup == "v1",
            "drains_visible": drains_visible,
            "forced_charges_visible": bool(header.get("forced_charges"))}


def _episodes(path: Path):
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    eps = []
    for no, line in enumerate(lines, 1):
        obj = json.loads(line)
        if obj.get("type") == "episode":
            eps.append((no, obj))
    return header, eps


def _mutate(ep: dict, rng: random.Random) -> dict:
    m = copy.deepcopy(ep)
    steps = m.get("steps") or []
    op = rng.choice(("drop", "dup", "swap", "ret")) if steps else "ret"
    i = rng.randrange(len(steps)) if steps else 0
    if op == "drop":
        del steps[i]
    elif op == "dup":
        steps.insert(i, copy.deepcopy(steps[i]))
    elif op == "swap" and i + 1 < len(steps):
        steps[i], steps[i + 1] = steps[i + 1], steps[i]
    else:
        m["ret"] = rng.choice((0, -12, -16, -4, -22, 3))
    return m


def _summary(no, res) -> list:
    return [no,
            [list(c) for c in res.checks],
            [[d.check, d.reason, d.detail] for d in res.divergences],
            sorted([g, n, c] for (g, n), c in res.events.items()),
            sorted([g, n, c] for (g, n), c in res.failures.items()),
            res.kills]


def verdicts_of(path: Path) -> dict:
    """The golden entry of one recording, computed now."""
    header, eps = _episodes(path)
    cfg = _config(header)
    mutated = []
    for no, ep in eps:
        rng = random.Random(f"{path.name}:{no}")
        mutated += [(f"{no}.{j}", _mutate(ep, rng)) for j in range(MUTATIONS)]
    per_profile = {}
    for profile in PROFILES:
        runs = {}
        for name, stream in (("episodes", eps), ("mutated", mutated)):
            cc = CrossChecker(profile, cfg["cgroup"], cfg["memsw"],
                              drains_visible=cfg["drains_visible"],
                              forced_charges_visible=cfg["forced_charges_visible"])
            runs[name] = [_summary(no, cc.check(ep)) for no, ep in stream]
        per_profile[profile] = runs
    return {"kernel": header.get("kernel"), "config": cfg, "profiles": per_profile}


def compute() -> dict:
    return {p.name: verdicts_of(p) for p in sorted(RECORDINGS.glob("*.jsonl"))}


def _dump(data: dict) -> str:
    """One line per episode, so that a diff shows which episode changed."""
    parts = ["{"]
    files = list(data.items())
    for fi, (fname, rec) in enumerate(files):
        parts.append(f" {json.dumps(fname)}: {{\"kernel\": {json.dumps(rec['kernel'])}, "
                     f"\"config\": {json.dumps(rec['config'], sort_keys=True)}, \"profiles\": {{")
        profs = list(rec["profiles"].items())
        for pi, (prof, runs) in enumerate(profs):
            parts.append(f"  {json.dumps(prof)}: {{")
            rl = list(runs.items())
            for ri, (run, rows) in enumerate(rl):
                parts.append(f"   {json.dumps(run)}: [")
                for i, row in enumerate(rows):
                    parts.append("    " + json.dumps(row, ensure_ascii=False)
                                 + ("," if i + 1 < len(rows) else ""))
                parts.append("   ]" + ("," if ri + 1 < len(rl) else ""))
            parts.append("  }" + ("," if pi + 1 < len(profs) else ""))
        parts.append(" }}" + ("," if fi + 1 < len(files) else ""))
    parts.append("}")
    return "\n".join(parts) + "\n"


def test_golden_file_covers_every_recording():
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(p.name for p in RECORDINGS.glob("*.jsonl"))
    for rec in golden.values():
        assert sorted(rec["profiles"]) == sorted(PROFILES)


@pytest.mark.parametrize("path", sorted(RECORDINGS.glob("*.jsonl")), ids=lambda p: p.stem)
def test_verdicts_match_the_golden_file(path):
    golden = json.loads(GOLDEN.read_text())[path.name]
    now = json.loads(json.dumps(verdicts_of(path)))
    assert now["config"] == golden["config"]
    for profile in PROFILES:
        for run in ("episodes", "mutated"):
            want = {row[0]: row for row in golden["profiles"][profile][run]}
            got = {row[0]: row for row in now["profiles"][profile][run]}
            assert got.keys() == want.keys(), (profile, run)
            diff = [(k, want[k], got[k]) for k in want if want[k] != got[k]]
            assert not diff, f"{path.name} profile {profile} {run}: first change {diff[0]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    GOLDEN.write_text(_dump(compute()))
    print(f"wrote {GOLDEN}")
