"""Which kernel versions the guest runs tell apart: every committed
recording (kernel x probe mode, tests/unit/data/recordings/matrix/) replayed
under every model profile, and every guest's validate report
(tests/unit/data/validate/) rechecked under every profile (`validate
--recheck`: the end state the kernel produced against each profile's
model).

- Each artifact is clean under the profile the resolver picks from its
  header (the kernel's release and uname -v).
- Each other cell is pinned: the divergence reasons (recordings) or the
  disagreeing fields (reports) it gives are the ones in DIVERGENT, no more
  and no fewer.
- A clean off-diagonal cell where the two profiles differ names, for each
  fact in which they differ, why no workload of that artifact reaches it
  (UNREACHED).

    python tests/unit/test_discrimination.py      # print the table

The data comes from a VM tier run: tests/unit/data/import_vm.py ARTIFACTS.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from memcgscope.collector import cli
from memcgscope.collector.validate.compare import recheck, run_model
from memcgscope.collector.validate.plan import load_plan
from memcgscope.model.profiles import PROFILES, get_profile, resolve_profile

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent / "data"
RECORDINGS = sorted((DATA / "recordings" / "matrix").glob("*.jsonl"))
REPORTS = sorted((DATA / "validate").glob("*.json"))
NAMES = tuple(PROFILES)


# -- the cells ----------------------------------------------------------------------------

def header(path: Path) -> dict:
    with open(path) as f:
        return json.loads(f.readline())


def own_profile(path: Path) -> str:
    h = header(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    return resolve_profile(h["kernel"], h.get("kernel_version")).profile.name


@functools.lru_cache(maxsize=None)
def replay_cell(path: Path, profile: str) -> tuple:
    """(reason, count) pairs `memcgscope replay --profile` finds."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(["replay", "--json", "--profile", profile, str(path)])
    return tuple(sorted(json.loads(buf.getvalue())["divergences_by_reason"].items()))


@functools.lru_cache(maxsize=None)
def _plan(source: str, name: str):
    return load_plan(source, name)


_MODEL: dict = {}


def recheck_cell(path: Path, profile: str) -> tuple:
    """The fields ("scenario: field") that disagree under ``profile``."""
    doc = json.loads(path.read_text())
    bad = []
    for s in doc["scenarios"]:
        if not s.get("kernel_side"):
            continue
        plan = _plan(s["source"], s["scenario"])
        # the model's side depends on the scenario and the profile only: once per pair
        key = (s["source"], profile)
        if key not in _MODEL:
            _MODEL[key] = run_model(plan, get_profile(profile))
        rows = recheck(plan, s["kernel_side"], get_profile(profile), model=_MODEL[key])
        bad += [f"{s['scenario'].removesuffix('.toml')}: {r.field}" for r in rows if r.verdict == "disagree"]
    return tuple(sorted(bad))


def cell(path: Path, profile: str) -> tuple:
    return replay_cell(path, profile) if path.suffix == ".jsonl" else recheck_cell(path, profile)


def differing_facts(a: str, b: str) -> set[str]:
    pa, pb = get_profile(a), get_profile(b)
    return {f.name for f in fields(pa) if f.name != "name" and getattr(pa, f.name) != getattr(pb, f.name)}


# -- what the table must say ----------------------------------------------------------------

#: why a fact in which two profiles differ leaves a cell clean, per artifact
#: kind. A recording holds episodes (the charge path's calls and their
#: steps), a report the end state of the validate scenarios.
UNREACHED = {
    "recording": {
        "charge_core": "the function's name: a recording holds what it did, not where",
        "nofail_forces_before_oom": "__GFP_NOFAIL charges are the kernel's own; no workload here makes one fail",
        "uncharge_clamps": "uncharges are not probed",
        "has_gfp_atomic": "no GFP_ATOMIC charge meets a limit in these workloads (softirq socket buffers would)",
        "force_on_gfp_atomic": "no GFP_ATOMIC charge meets a limit in these workloads",
        "nomem_forces_on_high": "no __GFP_HIGH charge fails in these workloads",
        "forced_charge_raises_max": "an event count, not an episode: recordings keep no cgroupfs counters",
        "rejected_charge_raises_max": "an event count, not an episode (the 7.3 report's thp-rejected shows it)",
        "sync_high_reclaim": "no probe workload sets memory.high below a charging task (the node workload's "
                             "throttling is not recorded)",
        "sync_high_charge_gfp": "no probe workload sets memory.high below a charging task",
        "charge_move_wait": "no v1 charge move (memory.move_charge_at_immigrate) in these workloads",
        "batch_is_nr_without_reclaim": "a charge that fails its batch always reclaims here (GFP_KERNEL/USER)",
        "oom_dying_shortcut": "the OOM victim does not charge again before it dies here",
        "oom_returns_enum": "the OOM's result is recorded as true/false either way",
        "local_watermark": "memory.peak write-reset is a cgroupfs behaviour",
        "failcnt_counters": "a v1 counter (aggregate check), and every such kernel is v2-only in Debian",
        "set_max_enlarge_ok": "no limit write raises a limit while over it here",
        "nonblock_limit_writes": "no O_NONBLOCK limit write here",
        "reclaim_signature": "reclaim steps record pages, gfp and freed alike for every signature",
        "memory_events_keys": "cgroupfs keys, not an episode",
        "has_peak": "a cgroupfs file", "has_swap_peak": "a cgroupfs file", "peak_writable": "a cgroupfs file",
        "has_memory_reclaim": "a cgroupfs file (the report's memory-reclaim scenario applies or not)",
        "gfp_nowait_has_nowarn": "no GFP_NOWAIT charge meets a limit here",
        "v1_needs_config": "a build option: the guests' cgroup layout follows it",
        "stock_slots": "stock hits never reach the ring buffer", "stock_evict": "stock hits never reach the ring buffer",
        "stock_release_empty": "stock hits never reach the ring buffer",
        "oom_skip_bails": "the OOM victim (the holder) sleeps; no victim charges after the reaper is done",
        "limit_superseded_break": "the superseded write's episode ends where the break ends it; replayed without "
                                  "the break the model's signal oracle, answered from the observation (the episode "
                                  "ended), explains the stop: a recording cannot say that no signal came. The VM "
                                  "test tells the two apart live (test_probes_vm.py::test_superseded_limit_write)",
        "limit_dying_break": "no limit write races an rmdir (kernfs refuses writes to a removed cgroup's files)",
        "over_high_dying_bail": "no task is killed while throttled at memory.high here",
        "early_dying_force": "no dying task charges in the v2 workloads' episodes",
        "charge_batch": "every charge in it fails a 1-page attempt first (no batch attempt recorded)",
    },
    "report": {
        "charge_core": "the function's name: invisible in the end state",
        "nofail_forces_before_oom": "__GFP_NOFAIL charges are the kernel's own",
        "uncharge_clamps": "no scenario uncharges below zero",
        "has_gfp_atomic": "no GFP_ATOMIC charge in the scenarios", "force_on_gfp_atomic": "no GFP_ATOMIC charge",
        "nomem_forces_on_high": "no __GFP_HIGH charge", "early_dying_force": "max/failcnt tolerances are zero_iff",
        "forced_charge_raises_max": "max is compared zero_iff: the scenarios' limits are met by reclaiming "
                                    "charges too",
        "rejected_charge_raises_max": "only thp-rejected (v2, THP) tells it, on a v2 report",
        "sync_high_reclaim": "high-throttle's counters are compared with bounds that both admit",
        "sync_high_charge_gfp": "the gfp of a reclaim is not in the end state",
        "charge_move_wait": "no charge move", "charge_batch": "usage is compared within 4 MiB",
        "batch_is_nr_without_reclaim": "failcnt is compared zero_iff", "oom_dying_shortcut": "one OOM kill either way",
        "oom_returns_enum": "the kill count is the same", "local_watermark": "peak is compared within 8 MiB",
        "failcnt_counters": "v1 memsw.failcnt: a 6.18/7.2 profile on a v1 report; the 5.10/6.1 v1 kernels count it",
        "set_max_enlarge_ok": "no scenario raises a limit while over it",
        "nonblock_limit_writes": "no O_NONBLOCK write", "reclaim_signature": "not in the end state",
        "memory_events_keys": "a v1 report has no memory.events", "has_peak": "v1 reports read max_usage_in_bytes",
        "has_swap_peak": "no scenario reads memory.swap.peak", "peak_writable": "no scenario writes memory.peak",
        "has_memory_reclaim": "memory-reclaim is v2 only", "gfp_nowait_has_nowarn": "not in the end state",
        "v1_needs_config": "a build option", "stock_slots": "usage is compared within 4 MiB",
        "stock_evict": "usage is compared within 4 MiB", "stock_release_empty": "usage is compared within 4 MiB",
        "oom_skip_bails": "no victim charges again in the scenarios",
        "limit_superseded_break": "no scenario has two writers", "limit_dying_break": "no write races an rmdir",
        "over_high_dying_bail": "no task dies while throttled",
    },
}

#: the pinned non-clean cells: (artifact stem, profile) -> reasons or fields
DIVERGENT: dict[tuple[str, str], tuple] = json.loads((DATA / "discrimination.json").read_text()) \
    if (DATA / "discrimination.json").exists() else {}


def _key(path: Path, profile: str) -> str:
    return f"{path.stem} @ {profile}"


def table() -> dict[str, tuple]:
    return {_key(p, prof): cell(p, prof) for p in RECORDINGS + REPORTS for prof in NAMES}


# -- the tests --------------------------------------------------------------------------------

def test_there_is_a_matrix():
    guests = {p.stem.rsplit("-", 1)[0] for p in RECORDINGS}
    assert len(RECORDINGS) >= 2 * 7 and len(REPORTS) >= 7, (RECORDINGS, REPORTS)
    assert {p.stem for p in REPORTS} == guests


@pytest.mark.parametrize("path", RECORDINGS + REPORTS, ids=lambda p: p.stem)
def test_clean_under_its_own_profile(path):
    own = own_profile(path)
    if path.suffix == ".jsonl":
        assert header(path)["profile"] == own   # record chose what the resolver chooses
    assert cell(path, own) == (), cell(path, own)


def test_cells_are_pinned_and_clean_cells_explained():
    got = table()
    pinned = {k: tuple(v if isinstance(v, str) else tuple(v) for v in vs) for k, vs in DIVERGENT.items()}
    divergent = {k: v for k, v in got.items() if v}
    assert divergent == pinned, {k: (divergent.get(k), pinned.get(k)) for k in set(divergent) | set(pinned)
                                 if divergent.get(k) != pinned.get(k)}
    missing = []
    for p in RECORDINGS + REPORTS:
        kind = "recording" if p.suffix == ".jsonl" else "report"
        own = own_profile(p)
        for prof in NAMES:
            if got[_key(p, prof)] or prof == own:
                continue
            missing += [f"{kind} {p.stem} @ {prof}: {fact}" for fact in differing_facts(own, prof)
                        if fact not in UNREACHED[kind]]
    assert not missing, missing


def test_the_table_tells_the_families_apart():
    """Every profile but one other of its family (stable points the guests
    do not run) is told apart from each guest kernel by some artifact."""
    got = table()
    for stem in {p.stem.rsplit("-", 1)[0] for p in RECORDINGS}:
        arts = [p for p in RECORDINGS + REPORTS if p.stem.startswith(stem)]
        own = own_profile(arts[0])
        told = {prof for prof in NAMES for p in arts if got[_key(p, prof)]}
        family = own.split(".")[:2]
        untold = {prof for prof in NAMES if prof != own and prof not in told and prof.split(".")[:2] != family}
        assert not untold or stem in TOLD_APART_EXCEPT, (stem, sorted(untold))
        assert untold == set(TOLD_APART_EXCEPT.get(stem, ())), (stem, sorted(untold))


#: other families a guest's artifacts cannot tell apart from its own. Why,
#: for each: every fact in which the two profiles differ is one these
#: workloads do not reach (UNREACHED says why, fact by fact; the test above
#: holds it). The resolver tells them apart by the kernel's version; the
#: behaviour these guests show does not.
_6X_V2_SAME = ("6.6",)      # 6.6 differs from its neighbours only in unreached facts
TOLD_APART_EXCEPT: dict[str, tuple] = {
    # 5.15: try_charge_memcg's name, uncharge clamping and __GFP_NOFAIL before the OOM
    "debian-5.10-v1": ("5.15",),
    "debian-5.10-v2": ("5.15",),
    # v1: no 6.12+ kernel of Debian's has the v1 controller; its v1 facts
    # (memsw.failcnt: 6.18, 7.2.0) are the ones a v1 report shows
    "debian-6.1-v1": ("6.12", "6.12.0", "6.12.109", "6.18.50", "6.18.51", "6.6", "7.2", "7.2.4", "7.3", "7.3.0"),
    "debian-6.1-v2": ("6.12", "6.12.0", "6.12.109", "6.18", "6.18.36", "6.18.50", "6.18.51") + _6X_V2_SAME,
    "debian-6.12-v2": ("6.1", "6.1.0", "6.1.56", "6.18", "6.18.36", "6.18.50", "6.18.51") + _6X_V2_SAME,
    "debian-6.18-v2": ("6.1", "6.1.0", "6.1.56", "6.12", "6.12.0", "6.12.109") + _6X_V2_SAME,
}


def main() -> int:
    got = table()
    arts = RECORDINGS + REPORTS
    width = max(len(p.stem) for p in arts)
    print(" " * width, " ".join(f"{n:>7}" for n in NAMES))
    for p in arts:
        own = own_profile(p)
        row = []
        for prof in NAMES:
            v = got[_key(p, prof)]
            n = sum(c for _, c in v) if p.suffix == ".jsonl" else len(v)
            row.append(f"{'=' if prof == own else ''}{n if n else '.'}".rjust(7))
        print(p.stem.ljust(width), " ".join(row))
    if "--write" in sys.argv:
        out = {k: v for k, v in got.items() if v}
        (DATA / "discrimination.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {DATA / 'discrimination.json'}: {len(out)} divergent cells")
    else:
        for k, v in got.items():
            if v:
                print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
